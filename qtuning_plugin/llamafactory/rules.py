"""Settings of a LLaMA-Factory run that Q-Tuning cannot honour, refused at start-up by name.

Each rule is a small function that returns the message of its refusal, or None:

* `ENVIRONMENT_RULES` take the environment: the variables that send ``llamafactory-cli train``
  down another road than ``run_sft`` (checked before the config is parsed);
* `ARGUMENT_RULES` take the parsed LLaMA-Factory arguments (`LlamaFactoryArgs`), after
  LLaMA-Factory's own checks and before the tokenizer, the data or the model load.

The transformers-level rules (`qtuning_plugin.hf.rules`) apply too, through the trainer mixin,
once the trainer is built; what several hosts refuse is stated once in `qtuning_plugin.rules`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, NamedTuple, Optional

from qtuning_plugin.rules import Rule, not_supervised, refuse, replaces_loss

if TYPE_CHECKING:
    from llamafactory.hparams import (
        DataArguments,
        FinetuningArguments,
        GeneratingArguments,
        ModelArguments,
        TrainingArguments,
    )

# FinetuningArguments flags of LLaMA-Factory 0.9.5 that swap the SFT loss for another one.
LOSS_REPLACEMENTS = ("use_dft_loss", "use_eaft_loss", "use_asft_loss")


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


ENVIRONMENT_RULES: tuple[Rule, ...] = (use_v1, use_ray, use_mca)


# -------------------------------------------------------------------- arguments
def stage_is_sft(args: LlamaFactoryArgs) -> Optional[str]:
    stage = args.finetuning.stage
    return None if stage == "sft" else not_supervised("stage", stage)


def replaced_loss(args: LlamaFactoryArgs) -> Optional[str]:
    names = [name for name in LOSS_REPLACEMENTS if getattr(args.finetuning, name, False)]
    return replaces_loss(", ".join(names), True, f"remove {' and '.join(names)}") if names else None


def moe_aux_loss(args: LlamaFactoryArgs) -> Optional[str]:
    coefficient = args.model.moe_aux_loss_coef
    if coefficient:
        return (
            f"moe_aux_loss_coef={coefficient}: the MoE router's auxiliary loss is not added to Q-Tuning's "
            "loss; remove moe_aux_loss_coef"
        )
    return None


def hyper_parallel(args: LlamaFactoryArgs) -> Optional[str]:
    if getattr(args.finetuning, "use_hyper_parallel", False):
        return (
            "use_hyper_parallel: the HyperParallel trainer is not the SFT trainer Q-Tuning wraps; "
            "remove use_hyper_parallel"
        )
    return None


def neat_packing(args: LlamaFactoryArgs) -> Optional[str]:
    if args.data.neat_packing:
        return (
            "neat_packing: its rows keep their samples apart by a block-diagonal attention mask ([B, 1, T, T] "
            "without flash-attention), which Q-Tuning cannot carry over when it regroups the kept samples; "
            "use `packing: true` (its rows mark each sample by restarting position_ids, and each is triaged "
            "on its own) or no packing"
        )
    return None


ARGUMENT_RULES: tuple[Rule, ...] = (stage_is_sft, replaced_loss, moe_aux_loss, hyper_parallel, neat_packing)


def check_environment(environ: Mapping[str, str]) -> None:
    refuse(ENVIRONMENT_RULES, environ)


def check_arguments(args: LlamaFactoryArgs) -> None:
    refuse(ARGUMENT_RULES, args)
