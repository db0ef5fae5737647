"""``qtuning-llamafactory train``: one process, or torchrun over the ranks, each running `train`.

The run's arguments are read as LLaMA-Factory reads them (``hparams.read_args``: a YAML or JSON
file, then OmegaConf ``key=value`` overrides, ``qtuning.<key>=...`` included). The ``qtuning:``
section is taken out and validated by `QTuningConfig`; the rest goes to
``llamafactory.train.tuner.run_exp(args=...)``, LLaMA-Factory's own entry, whose parser checks
every other key. Before it runs, three names that LLaMA-Factory looks up at call time are
swapped for this run (and restored after it):

* ``train.sft.workflow.CustomSeq2SeqTrainer``: the same class with `QTuningTrainerMixin` first;
* ``train.tuner.LogCallback``: the same callback, whose ``trainer_log.jsonl`` lines (LlamaBoard)
  also carry the ``qtuning/`` metrics;
* ``train.tuner.get_train_args``: the same parser, followed by the start-up refusals of
  `qtuning_plugin.llamafactory.rules`, before the tokenizer, the data or the model load.

Several processes start under the rules of ``llamafactory-cli train`` (its ``launcher.py``,
0.9.5): ``FORCE_TORCHRUN=1``, or more than one accelerator without Ray or KTransformers, runs
torchrun with ``NNODES``, ``NODE_RANK``, ``NPROC_PER_NODE``, ``MASTER_ADDR``, ``MASTER_PORT``
(or, with ``RDZV_ID``, an elastic launch with ``MIN_NNODES``, ``MAX_NNODES``, ``MAX_RESTARTS``),
but each rank runs this module's `train`, so every rank trains with Q-Tuning.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator, Optional, Sequence, Union

from qtuning_plugin._logging import LOG, log_through_llamafactory
from qtuning_plugin.config import SECTION, QTuningConfig, validate_section
from qtuning_plugin.llamafactory.rules import LlamaFactoryArgs, check_arguments, check_environment
from qtuning_plugin.rules import QTuningSettingsError

# What torchrun starts on every rank: this module's `__main__`.
WORKER_MODULE = "qtuning_plugin.llamafactory.launcher"
TESTED_RELEASE = "0.9.5"

Args = Union[dict[str, Any], list[str]]


def read_run_args(argv: Sequence[str]) -> Args:
    """The arguments of ``train ARGV`` as LLaMA-Factory reads them: a dict from a YAML or JSON file
    and its ``key=value`` overrides, else the ``--key value`` list as given."""
    from llamafactory.hparams import read_args

    saved = sys.argv
    sys.argv = [saved[0], *argv]  # read_args reads sys.argv, as under `llamafactory-cli train`
    try:
        return read_args()
    finally:
        sys.argv = saved


def pop_section(args: Args) -> Optional[QTuningConfig]:
    """Take the ``qtuning:`` section out of ``args`` and validate it.

    Returns None where there is no section (``--key value`` arguments have none); an empty
    section enables Q-Tuning with every default.

    Raises:
        QTuningSettingsError: naming ``qtuning.<key>`` for an unknown key or a bad value.
    """
    if not isinstance(args, dict) or SECTION not in args:
        return None
    return validate_section(args.pop(SECTION))


# ---------------------------------------------------------------- one process
def train(args: Args, config: Optional[QTuningConfig]) -> None:
    """LLaMA-Factory's ``run_exp`` in this process: with Q-Tuning when ``config`` enables it, else
    exactly as ``llamafactory-cli train`` runs it."""
    from llamafactory.train import tuner

    if config is None or not config.enabled:
        why = "no `qtuning:` section" if config is None else "`qtuning.enabled: false`"
        LOG.warning("Q-Tuning is not enabled (%s): plain LLaMA-Factory training", why)
        tuner.run_exp(args=args)
        return
    from llamafactory.train.sft import workflow

    from qtuning_plugin.llamafactory.trainer import qtuning_log_callback_class, qtuning_trainer_class

    _check_hooks(tuner, workflow)
    trainer = qtuning_trainer_class(workflow.CustomSeq2SeqTrainer, config)
    with ExitStack() as swaps:
        swaps.enter_context(_swapped(workflow, "CustomSeq2SeqTrainer", trainer))
        swaps.enter_context(_swapped(tuner, "LogCallback", qtuning_log_callback_class(tuner.LogCallback)))
        swaps.enter_context(_swapped(tuner, "get_train_args", _with_refusals(tuner.get_train_args)))
        tuner.run_exp(args=args)


def _with_refusals(get_train_args):
    def get_train_args_then_refusals(args=None):
        parsed = get_train_args(args)
        check_arguments(LlamaFactoryArgs(*parsed))
        return parsed

    return get_train_args_then_refusals


@contextmanager
def _swapped(module: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def _check_hooks(tuner: Any, workflow: Any) -> None:
    """Stop with a clear message where this LLaMA-Factory lacks a name the launcher swaps."""
    missing = [
        f"{module.__name__}.{name}"
        for module, name in (
            (workflow, "CustomSeq2SeqTrainer"),
            (tuner, "LogCallback"),
            (tuner, "get_train_args"),
            (tuner, "run_exp"),
        )
        if not hasattr(module, name)
    ]
    if not hasattr(getattr(tuner, "LogCallback", None), "_write_log"):
        missing.append("llamafactory.train.callbacks.LogCallback._write_log")
    if missing:
        import llamafactory

        raise RuntimeError(
            f"qtuning-llamafactory: LLaMA-Factory {llamafactory.__version__} lacks {', '.join(missing)}, "
            f"which Q-Tuning hooks into (tested with LLaMA-Factory {TESTED_RELEASE})"
        )


# -------------------------------------------------------------- several ranks
def uses_torchrun() -> bool:
    """``llamafactory-cli train``'s choice (launcher.py, 0.9.5)."""
    from llamafactory.extras.misc import get_device_count, is_env_enabled, use_kt, use_ray

    return is_env_enabled("FORCE_TORCHRUN") or (get_device_count() > 1 and not use_ray() and not use_kt())


def torchrun_command(argv: Sequence[str]) -> list[str]:
    """torchrun as ``llamafactory-cli train`` builds it, starting `WORKER_MODULE` with ``argv``."""
    from llamafactory.extras.misc import find_available_port, get_device_count

    nnodes = os.getenv("NNODES", "1")
    nproc_per_node = os.getenv("NPROC_PER_NODE", str(get_device_count()))
    master_addr = os.getenv("MASTER_ADDR", "127.0.0.1")
    master_port = os.getenv("MASTER_PORT", str(find_available_port()))
    LOG.info("Initializing %s distributed tasks at: %s:%s", nproc_per_node, master_addr, master_port)
    if int(nnodes) > 1:
        LOG.info("Multi-node training enabled: num nodes: %s, node rank: %s", nnodes, os.getenv("NODE_RANK", "0"))
    command = [sys.executable, "-m", "torch.distributed.run"]
    rdzv_id = os.getenv("RDZV_ID")
    if rdzv_id is not None:  # elastic launch; MIN_NNODES:MAX_NNODES when both are set
        min_nnodes, max_nnodes = os.getenv("MIN_NNODES"), os.getenv("MAX_NNODES")
        rdzv_nnodes = f"{min_nnodes}:{max_nnodes}" if min_nnodes is not None and max_nnodes is not None else nnodes
        command += [
            "--nnodes", rdzv_nnodes, "--nproc-per-node", nproc_per_node, "--rdzv-id", rdzv_id,
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{master_addr}:{master_port}",
            "--max-restarts", os.getenv("MAX_RESTARTS", "0"),
        ]
    else:
        command += [
            "--nnodes", nnodes, "--node_rank", os.getenv("NODE_RANK", "0"), "--nproc_per_node", nproc_per_node,
            "--master_addr", master_addr, "--master_port", master_port,
        ]
    return command + ["-m", WORKER_MODULE, *argv]


def torchrun_environment() -> dict[str, str]:
    """The workers' environment, as ``llamafactory-cli train`` sets it (``OPTIM_TORCH``, on by default)."""
    from llamafactory.extras.misc import is_env_enabled

    env = dict(os.environ)
    if is_env_enabled("OPTIM_TORCH", "1"):
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        env["TORCH_NCCL_AVOID_RECORD_STREAMS"] = "1"
    return env


# ------------------------------------------------------------------- entries
def launch(argv: Sequence[str]) -> int:
    """``train ARGV``: validated here, then trained in this process or by torchrun; the exit status."""
    log_through_llamafactory()
    check_environment(os.environ)
    args = read_run_args(argv)
    config = pop_section(args)
    if not uses_torchrun():
        train(args, config)
        return 0
    return subprocess.run(torchrun_command(argv), env=torchrun_environment()).returncode


def worker_main() -> None:
    """One rank under torchrun: ``python -m qtuning_plugin.llamafactory.launcher ARGV``."""
    log_through_llamafactory()
    try:
        check_environment(os.environ)
        args = read_run_args(sys.argv[1:])
        train(args, pop_section(args))
        # The trainer's reference cycles still hold the DDP model, and through it gloo's process
        # group, after run_exp has destroyed the group; freed at interpreter shutdown, gloo's
        # threads can abort the rank (SIGABRT) after a finished run. Free them while all is alive.
        gc.collect()
    except QTuningSettingsError as error:
        sys.exit(f"qtuning-llamafactory: {error}")


if __name__ == "__main__":
    worker_main()
