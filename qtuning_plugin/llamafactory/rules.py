"""Settings of a LLaMA-Factory run that Q-Tuning cannot honour, refused at start-up by name.

Each rule is a small function that returns the message of its refusal, or None:

* `ENVIRONMENT_RULES` take the environment: the variables that send ``llamafactory-cli train``
  down another road than ``run_sft`` (checked before the config is parsed);
* `ARGUMENT_RULES` take the parsed LLaMA-Factory arguments (`LlamaFactoryArgs`) and the
  Q-Tuning settings, after LLaMA-Factory's own checks and before the tokenizer, the data or the
  model load.

The transformers-level refusals (`qtuning_plugin.trainer_checks`) apply too, through the
trainer mixin, once the trainer is built. The messages say what to change, as those do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping, NamedTuple, Optional

from qtuning_plugin.config import QTuningConfig

if TYPE_CHECKING:
    from llamafactory.hparams import (
        DataArguments,
        FinetuningArguments,
        GeneratingArguments,
        ModelArguments,
        TrainingArguments,
    )

SFT_ONLY = "Q-Tuning is for supervised fine-tuning only"
# FinetuningArguments flags of LLaMA-Factory 0.9.5 that swap the SFT loss for another one.
LOSS_REPLACEMENTS = ("use_dft_loss", "use_eaft_loss", "use_asft_loss")


class QTuningSettingsError(ValueError):
    """A ``qtuning:`` section, or a LLaMA-Factory setting, that stops the run before the model loads."""


class LlamaFactoryArgs(NamedTuple):
    """What LLaMA-Factory's ``get_train_args`` returns, by name."""

    model: "ModelArguments"
    data: "DataArguments"
    training: "TrainingArguments"
    finetuning: "FinetuningArguments"
    generating: "GeneratingArguments"


def _enabled(environ: Mapping[str, str], name: str) -> bool:
    """LLaMA-Factory's reading of a switch variable (``extras.misc.is_env_enabled``)."""
    return environ.get(name, "0").lower() in ("true", "y", "1")


# ------------------------------------------------------------------ environment
def use_v1(environ: Mapping[str, str]) -> Optional[str]:
    if _enabled(environ, "USE_V1"):
        return (
            "USE_V1: LLaMA-Factory's v1 trainer is not wrapped by qtuning-llamafactory (only v0's "
            "`stage: sft`); unset USE_V1"
        )
    return None


def use_ray(environ: Mapping[str, str]) -> Optional[str]:
    if _enabled(environ, "USE_RAY"):
        return (
            "USE_RAY: Ray starts its own training workers, which would run plain SFT; unset USE_RAY "
            "and launch the ranks with torchrun (FORCE_TORCHRUN=1, NNODES, NPROC_PER_NODE, ...)"
        )
    return None


def use_mca(environ: Mapping[str, str]) -> Optional[str]:
    if _enabled(environ, "USE_MCA"):
        return "USE_MCA: the Megatron-Core trainer is not a transformers Trainer that Q-Tuning can wrap; unset USE_MCA"
    return None


ENVIRONMENT_RULES: tuple[Callable[[Mapping[str, str]], Optional[str]], ...] = (use_v1, use_ray, use_mca)


# -------------------------------------------------------------------- arguments
def stage_is_sft(args: LlamaFactoryArgs, qtuning: QTuningConfig) -> Optional[str]:
    stage = args.finetuning.stage
    if stage != "sft":
        return f"stage={stage!r}: {SFT_ONLY}; use `stage: sft`, or remove `qtuning:`"
    return None


def replaced_loss(args: LlamaFactoryArgs, qtuning: QTuningConfig) -> Optional[str]:
    names = [name for name in LOSS_REPLACEMENTS if getattr(args.finetuning, name, False)]
    if names:
        return (
            f"{', '.join(names)}: another loss than cross-entropy; Q-Tuning trains on the cross-entropy "
            f"of the kept tokens; remove {' and '.join(names)}"
        )
    return None


def moe_aux_loss(args: LlamaFactoryArgs, qtuning: QTuningConfig) -> Optional[str]:
    coefficient = args.model.moe_aux_loss_coef
    if coefficient:
        return (
            f"moe_aux_loss_coef={coefficient}: the MoE router's auxiliary loss is not added to Q-Tuning's "
            "loss; remove moe_aux_loss_coef"
        )
    return None


def hyper_parallel(args: LlamaFactoryArgs, qtuning: QTuningConfig) -> Optional[str]:
    if getattr(args.finetuning, "use_hyper_parallel", False):
        return (
            "use_hyper_parallel: the HyperParallel trainer is not the SFT trainer Q-Tuning wraps; "
            "remove use_hyper_parallel"
        )
    return None


def neat_packing(args: LlamaFactoryArgs, qtuning: QTuningConfig) -> Optional[str]:
    if args.data.neat_packing:
        return (
            "neat_packing: its rows keep their samples apart by a block-diagonal attention mask ([B, 1, T, T] "
            "without flash-attention), which Q-Tuning cannot carry over when it regroups the kept samples; "
            "use `packing: true` (its rows mark each sample by restarting position_ids, and each is triaged "
            "on its own) or no packing"
        )
    return None


def two_pass_with_packing(args: LlamaFactoryArgs, qtuning: QTuningConfig) -> Optional[str]:
    if args.data.packing and qtuning.scoring == "two_pass" and qtuning.triage_scope == "micro_batch":
        return (
            "qtuning.scoring=two_pass with triage_scope=micro_batch needs one sample per row; with "
            "`packing: true` use single_pass or auto, or triage_scope=step"
        )
    return None


ARGUMENT_RULES: tuple[Callable[[LlamaFactoryArgs, QTuningConfig], Optional[str]], ...] = (
    stage_is_sft,
    replaced_loss,
    moe_aux_loss,
    hyper_parallel,
    neat_packing,
    two_pass_with_packing,
)


def refuse(messages: list[str]) -> None:
    """Raise `QTuningSettingsError` listing ``messages``, if any."""
    if messages:
        raise QTuningSettingsError("qtuning: settings Q-Tuning cannot honour:\n  - " + "\n  - ".join(messages))


def check_environment(environ: Mapping[str, str]) -> None:
    refuse([message for rule in ENVIRONMENT_RULES if (message := rule(environ))])


def check_arguments(args: LlamaFactoryArgs, qtuning: QTuningConfig) -> None:
    refuse([message for rule in ARGUMENT_RULES if (message := rule(args, qtuning))])
