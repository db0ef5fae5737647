"""The wrapped trainer's settings that Q-Tuning cannot honour, refused once at start-up.

Q-Tuning replaces the training loss of a `transformers.Trainer` (TRL's `SFTTrainer`, Axolotl's
trainer) by its own: the cross-entropy over the kept tokens of the kept samples, through a fused
LM-head op that never builds the logits. A setting of the wrapped trainer that changes that loss
is either honoured by the fused op (``label_smoothing_factor``) or refused here, by name, before
the first step; never silently dropped. Each refusal is listed in the README.
"""

from __future__ import annotations

from typing import Any

from qtuning_plugin.config import QTuningConfig
from qtuning_plugin.modeling import unwrap_causal_lm

# TRL's loss types that are the plain cross-entropy Q-Tuning computes anyway.
CROSS_ENTROPY_LOSS_TYPES = (None, "nll", "chunked_nll")


def packing_declared(trainer: Any) -> bool:
    """Whether the trainer's settings put several samples in a row (Axolotl ``sample_packing``,
    TRL ``padding_free`` or BFD ``packing``)."""
    args = trainer.args
    return bool(getattr(args, "sample_packing", False) or getattr(trainer, "padding_free", False))


def _refusals(trainer: Any, qtuning: QTuningConfig) -> list[str]:
    args = trainer.args
    refusals = []
    loss_type = getattr(args, "loss_type", None)
    if loss_type not in CROSS_ENTROPY_LOSS_TYPES:
        refusals.append(
            f"loss_type={loss_type!r}: Q-Tuning trains on the cross-entropy of the kept tokens; "
            "use loss_type='nll' or 'chunked_nll' (the same loss)"
        )
    elif getattr(trainer, "compute_loss_func", None) is not None:
        refusals.append(
            "compute_loss_func: Q-Tuning computes its own loss (cross-entropy over the kept tokens, "
            "without the logits a custom loss function needs); remove compute_loss_func"
        )
    smoothing = getattr(args, "label_smoothing_factor", 0.0)
    if not 0.0 <= smoothing <= 1.0:
        refusals.append(f"label_smoothing_factor={smoothing}: must be in [0, 1]")
    config = getattr(unwrap_causal_lm(trainer.model), "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text_config, "output_router_logits", False):
        refusals.append(
            "output_router_logits (TRL: router_aux_loss_coef): the MoE router's auxiliary loss is not added "
            "to Q-Tuning's loss; set router_aux_loss_coef=0 (TRL) or output_router_logits=False"
        )
    if getattr(args, "packing", False) and getattr(args, "packing_strategy", None) == "wrapped":
        refusals.append(
            "packing_strategy='wrapped': its rows are cut from concatenated samples without position_ids "
            "restarts, so Q-Tuning cannot tell the samples apart; use packing_strategy='bfd'"
        )
    if qtuning.scoring == "two_pass" and qtuning.triage_scope == "micro_batch" and packing_declared(trainer):
        refusals.append(
            "qtuning.scoring=two_pass with triage_scope=micro_batch needs one sample per row; with sample "
            "packing or padding_free use single_pass or auto, or triage_scope=step"
        )
    if getattr(args, "orpo_alpha", None):
        refusals.append("orpo_alpha: Q-Tuning is for supervised fine-tuning only")
    parallelism = getattr(getattr(trainer, "accelerator", None), "parallelism_config", None)
    if parallelism is not None and (parallelism.cp_enabled or parallelism.sp_enabled):
        refusals.append(
            "parallelism_config cp_size/sp_size > 1: context/sequence parallelism splits each sample "
            "across ranks, and Q-Tuning needs whole samples to score them"
        )
    return refusals


def check_trainer_settings(trainer: Any, qtuning: QTuningConfig) -> None:
    """Raise `ValueError` naming every setting of ``trainer`` that Q-Tuning would silently change.

    Args:
        trainer: the `transformers.Trainer` (after its ``__init__``).
        qtuning: the Q-Tuning settings.
    """
    refusals = _refusals(trainer, qtuning)
    if refusals:
        raise ValueError("qtuning: settings Q-Tuning cannot honour:\n  - " + "\n  - ".join(refusals))
