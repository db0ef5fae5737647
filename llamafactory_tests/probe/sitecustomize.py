"""Test-only probe of the LLaMA-Factory runs: records every Q-Tuning triage of a process.

`lf_run` puts this folder and tests/ on ``PYTHONPATH`` and sets ``QTUNING_PROBE_DIR`` for the
runs that are probed; Python imports ``sitecustomize`` at start-up in the launcher, in torchrun
and in each rank it starts. Every Q-Tuning trainer built in the process gets a listener on its
engine (the public selection hook), which appends one JSON line per triage to
``QTUNING_PROBE_DIR/selections.rank<RANK>.jsonl``: `reference.selection_record`, so that a test
can redo the algorithm's triage and token budget independently (as
``integration_tests/qtuning_probe.py`` does for Axolotl), and in one process, where a triage
spans several micro-batches, `reference.scored_alone` under ``alone``. With
``QTUNING_KILL_AT_SELECTION=N`` it also kills the process with SIGKILL at its N-th triage (after
the scoring pass of that step, before its training passes): the fault-injection test,
``test_kill_resume.py``. On a rank of a distributed run it writes, at exit before the interpreter
shuts down, how many DDP models are still alive to ``QTUNING_PROBE_DIR/alive_at_exit.rank<RANK>.json``
(one that is, and its process group, would be torn down during interpreter shutdown).
"""

import atexit
import gc
import json
import os
import signal

PROBE_DIR = os.environ.get("QTUNING_PROBE_DIR")
KILL_AT_SELECTION = int(os.environ.get("QTUNING_KILL_AT_SELECTION", "0"))


def _install() -> None:
    from reference import scored_alone, selection_record

    from qtuning_plugin.hf.trainer import QTuningTrainerMixin

    path = os.path.join(PROBE_DIR, f"selections.rank{os.environ.get('RANK', '0')}.jsonl")
    init = QTuningTrainerMixin.__init__
    alone = int(os.environ.get("WORLD_SIZE", "1")) == 1
    seen = [0]

    def recorder(trainer):
        def record(event) -> None:
            if event.selection is not None:
                line = selection_record(event)
                if alone and len(event.micro_batches) > 1:
                    line["alone"] = scored_alone(trainer.qtuning_engine, trainer.model_wrapped, event)
                with open(path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(line) + "\n")
                seen[0] += 1
                if seen[0] == KILL_AT_SELECTION:
                    os.kill(os.getpid(), signal.SIGKILL)

        return record

    def probed_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.qtuning_engine.listeners.append(recorder(self))

    QTuningTrainerMixin.__init__ = probed_init


def _count_ddp_models_at_exit() -> None:
    from torch.nn.parallel import DistributedDataParallel

    alive = sum(isinstance(thing, DistributedDataParallel) for thing in gc.get_objects())
    with open(os.path.join(PROBE_DIR, f"alive_at_exit.rank{os.environ['RANK']}.json"), "w", encoding="utf-8") as handle:
        json.dump({"ddp_models": alive}, handle)


if PROBE_DIR:
    _install()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
        atexit.register(_count_ddp_models_at_exit)
