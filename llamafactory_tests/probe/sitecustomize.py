"""Test-only probe of the LLaMA-Factory runs: records every Q-Tuning selection of a process.

`lf_run` puts this folder on ``PYTHONPATH`` and sets ``QTUNING_PROBE_DIR`` for the runs that
are probed; Python imports ``sitecustomize`` at start-up in the launcher, in torchrun and in
each rank it starts. Each call of `qtuning_plugin.core.select` made by the trainer appends one
JSON line to ``QTUNING_PROBE_DIR/selections.rank<RANK>.jsonl``: every sample's PPL, Ent,
trainable-token count L, kept-token count and kept/Q2 flags (this rank's rows of the
mini-batch), and the selection's logged statistics, so that a test can redo the SPEC's triage
and token budget independently (as ``integration_tests/qtuning_probe.py`` does for Axolotl).
"""

import json
import os

PROBE_DIR = os.environ.get("QTUNING_PROBE_DIR")


def _install() -> None:
    import qtuning_plugin.trainer as qtuning_trainer

    original = qtuning_trainer.select
    path = os.path.join(PROBE_DIR, f"selections.rank{os.environ.get('RANK', '0')}.jsonl")

    def recording_select(nll, entropy, mask, config, **kwargs):
        selection = original(nll, entropy, mask, config, **kwargs)
        record = {
            "ppl": selection.ppl.tolist(),
            "ent": selection.ent.tolist(),
            "trainable": mask.sum(dim=1).tolist(),
            "kept_tokens": selection.token_mask.sum(dim=1).tolist(),
            "keep": selection.sample_mask.tolist(),
            "q2": selection.q2.tolist(),
            "stats": selection.stats,
        }
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        return selection

    qtuning_trainer.select = recording_select


if PROBE_DIR:
    _install()
