"""The settings of a transformers `Trainer` (TRL's `SFTTrainer` included) that Q-Tuning cannot
honour, each one rule, checked once on the trainer after its ``__init__`` (`check_trainer`).

Q-Tuning replaces the training loss by its own: the cross-entropy over the kept tokens of the
kept samples, through a fused LM-head op that never builds the logits. A setting that changes
that loss is either honoured by the fused op (``label_smoothing_factor``) or refused here, by
name; never silently dropped. Each refusal is listed in the README.
"""

from __future__ import annotations

from typing import Any, Optional

from qtuning_plugin.modeling import unwrap_causal_lm
from qtuning_plugin.rules import refuse, replaces_loss, splits_samples

# TRL's loss types that are the plain cross-entropy Q-Tuning computes anyway.
CROSS_ENTROPY_LOSS_TYPES = (None, "nll", "chunked_nll")


# ------------------------------------------------------------------ transformers
def compute_loss_func(trainer: Any) -> Optional[str]:
    if getattr(trainer, "compute_loss_func", None) is None or getattr(trainer.args, "loss_type", None) not in CROSS_ENTROPY_LOSS_TYPES:
        return None  # a loss_type that sets one is refused by its own name
    return replaces_loss("compute_loss_func", trainer.compute_loss_func, "remove compute_loss_func")


def label_smoothing_factor(trainer: Any) -> Optional[str]:
    smoothing = getattr(trainer.args, "label_smoothing_factor", 0.0)
    return None if 0.0 <= smoothing <= 1.0 else f"label_smoothing_factor: {smoothing}: must be in [0, 1]"


def output_router_logits(trainer: Any) -> Optional[str]:
    config = getattr(unwrap_causal_lm(trainer.model), "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text_config, "output_router_logits", False):
        return None
    return (
        "output_router_logits (TRL: router_aux_loss_coef): the MoE router's auxiliary loss is not added "
        "to Q-Tuning's loss; set router_aux_loss_coef=0 (TRL) or output_router_logits=False"
    )


# -------------------------------------------------------------------- accelerate
def parallelism_config(trainer: Any) -> Optional[str]:
    parallelism = getattr(getattr(trainer, "accelerator", None), "parallelism_config", None)
    if parallelism is None or not (parallelism.cp_enabled or parallelism.sp_enabled):
        return None
    return splits_samples("parallelism_config cp_size/sp_size", f"{parallelism.cp_size}/{parallelism.sp_size}")


# --------------------------------------------------------------------------- TRL
def loss_type(trainer: Any) -> Optional[str]:
    value = getattr(trainer.args, "loss_type", None)
    return None if value in CROSS_ENTROPY_LOSS_TYPES else replaces_loss("loss_type", value, "use loss_type='nll'")


def packing_strategy(trainer: Any) -> Optional[str]:
    args = trainer.args
    if not (getattr(args, "packing", False) and getattr(args, "packing_strategy", None) == "wrapped"):
        return None
    return (
        "packing_strategy: 'wrapped': its rows are cut from concatenated samples without position_ids "
        "restarts, so Q-Tuning cannot tell the samples apart; use packing_strategy='bfd'"
    )


RULES = (compute_loss_func, label_smoothing_factor, output_router_logits, parallelism_config, loss_type, packing_strategy)


def check_trainer(trainer: Any) -> None:
    """Raise `ValueError` naming every setting of ``trainer`` that Q-Tuning would silently change."""
    refuse(RULES, trainer)

