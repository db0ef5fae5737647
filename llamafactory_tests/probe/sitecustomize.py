"""Test-only probe of the LLaMA-Factory runs: records every Q-Tuning triage of a process.

`lf_run` puts this folder and tests/ on ``PYTHONPATH`` and sets ``QTUNING_PROBE_DIR`` for the
runs that are probed; Python imports ``sitecustomize`` at start-up in the launcher, in torchrun
and in each rank it starts. Every Q-Tuning trainer built in the process gets a listener on its
engine (the public selection hook), which appends one JSON line per triage to
``QTUNING_PROBE_DIR/selections.rank<RANK>.jsonl``: `reference.selection_record`, so that a test
can redo the algorithm's triage and token budget independently (as
``integration_tests/qtuning_probe.py`` does for Axolotl).
"""

import json
import os

PROBE_DIR = os.environ.get("QTUNING_PROBE_DIR")


def _install() -> None:
    from reference import selection_record

    from qtuning_plugin.hf.trainer import QTuningTrainerMixin

    path = os.path.join(PROBE_DIR, f"selections.rank{os.environ.get('RANK', '0')}.jsonl")
    init = QTuningTrainerMixin.__init__

    def record(event) -> None:
        if event.selection is not None:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(selection_record(event)) + "\n")

    def probed_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.qtuning_engine.listeners.append(record)

    QTuningTrainerMixin.__init__ = probed_init


if PROBE_DIR:
    _install()
