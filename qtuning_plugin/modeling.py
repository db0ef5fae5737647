"""Reach into a (wrapped) causal LM: its decoder body, LM head and final hidden states.

Works through DDP / FSDP / DeepSpeed wrappers, PEFT (`PeftModel`,
`ModulesToSaveWrapper`) and tied embeddings. The forward pass always goes
through the outermost wrapper, so that data-parallel gradient hooks, gradient
checkpointing and other plugins' patched forwards (Liger's `lce_forward`,
Cut Cross Entropy) all stay in effect; the final hidden states are captured
with a forward hook on the decoder body.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from torch import Tensor, nn

# Inputs the decoder needs; labels are left out so that the model computes no loss.
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "token_type_ids")


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The `PreTrainedModel` with an LM head inside DDP/FSDP/DeepSpeed/PEFT wrappers."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def lm_head_parameters(causal_lm: nn.Module) -> tuple[Tensor, Optional[Tensor]]:
    """The LM head's ``weight [V, H]`` and ``bias [V]`` (or None).

    A PEFT `ModulesToSaveWrapper` resolves to the active adapter's copy; tied
    embeddings share the embedding's weight, which is what the head uses.
    """
    head = causal_lm.get_output_embeddings()
    if head is None:
        raise ValueError(f"qtuning: {type(causal_lm).__name__} has no LM head (get_output_embeddings() is None)")
    if hasattr(head, "lora_A"):
        raise ValueError(
            "qtuning: LoRA on the LM head is not supported; train it with `lora_modules_to_save: [lm_head]` "
            "or leave it out of `lora_target_modules`"
        )
    return head.weight, getattr(head, "bias", None)


def _accepts_logits_to_keep(causal_lm: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(causal_lm.forward).parameters


def final_hidden_states(model: nn.Module, inputs: dict[str, Any]) -> Tensor:
    """Run ``model`` on ``inputs`` and return the decoder's final hidden states ``[B, T, H]``.

    The LM head runs on the last position only (``logits_to_keep=1``) where the
    model supports it, so the ``[B, T, V]`` logits are never built. Gradient
    mode is the caller's: wrap in `torch.no_grad()` for a scoring pass.
    """
    causal_lm = unwrap_causal_lm(model)
    captured: list[Tensor] = []

    def capture(_module: nn.Module, _args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state)

    model_inputs = {key: inputs[key] for key in MODEL_INPUT_KEYS if inputs.get(key) is not None}
    extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(causal_lm) else {}
    handle = causal_lm.get_decoder().register_forward_hook(capture)
    try:
        model(**model_inputs, use_cache=False, **extra)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"qtuning: expected one decoder forward, saw {len(captured)}")
    return captured[0]


def shifted_targets(labels: Tensor, position_ids: Optional[Tensor] = None, ignore_index: int = -100) -> Tensor:
    """Targets aligned with the hidden states: ``targets[:, t] = labels[:, t + 1]``.

    Args:
        labels: ``[B, T]`` int64 with ``ignore_index`` at untrained positions.
        position_ids: ``[B, T]`` for packed rows; a target whose position id is
            0 opens a new sample and is predicted from the previous sample's
            context, so it is ignored (as it would be unpacked).

    Returns:
        ``[B, T]`` int64, ``ignore_index`` in the last column.
    """
    targets = torch.full_like(labels, ignore_index)
    targets[:, :-1] = labels[:, 1:]
    if position_ids is not None:
        starts = torch.zeros_like(targets, dtype=torch.bool)
        starts[:, :-1] = position_ids[:, 1:] == 0
        targets = targets.masked_fill(starts, ignore_index)
    return targets
