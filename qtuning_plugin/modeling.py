"""Reach into a (wrapped) causal LM: its decoder body, LM head and final hidden states.

Works through DDP / FSDP / DeepSpeed wrappers, PEFT (`PeftModel`,
`ModulesToSaveWrapper`) and tied embeddings. The forward pass always goes
through the outermost wrapper, so that data-parallel gradient hooks, gradient
checkpointing and other plugins' patched forwards (Liger's `lce_forward`,
Cut Cross Entropy) all stay in effect; the final hidden states are captured
with a forward hook on the decoder body.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from qtuning_plugin.rules import lora_on_lm_head

# Inputs the model does not get: the labels (it must compute no loss), and the keywords we set.
NOT_MODEL_INPUTS = ("labels", "shift_labels", "use_cache", "logits_to_keep")


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
        raise ValueError(f"qtuning: {lora_on_lm_head('the LM head', type(head).__name__)}")
    return head.weight, getattr(head, "bias", None)


def _accepts_logits_to_keep(causal_lm: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(causal_lm.forward).parameters


def final_hidden_states(model: nn.Module, inputs: dict[str, Any]) -> Tensor:
    """Run ``model`` on ``inputs`` and return the decoder's final hidden states ``[B, T, H]``.

    The LM head runs on the last position only (``logits_to_keep=1``) where the
    model supports it, so the ``[B, T, V]`` logits are never built. Gradient
    mode is the caller's: wrap in `torch.no_grad()` for a scoring pass.
    """
    return _run(model, inputs, None)


def head_forward(model: nn.Module, inputs: dict[str, Any], fn: Callable[[Tensor, Tensor, Optional[Tensor]], Any]) -> Any:
    """Run ``model`` on ``inputs`` with ``fn(hidden, weight, bias)`` in place of its LM head; return fn's result.

    ``hidden`` is the decoder's final hidden states ``[B, T, H]`` (every
    position; the head's own input where the model passes it whole),
    ``weight``/``bias`` the LM head's parameters (`lm_head_parameters`) as they
    are while the head runs. Computing the statistics and the loss there,
    rather than after the forward, is what makes sharded training work (the
    approach of Liger's ``lce_maybe_trainable_lm_head``): FSDP1, FSDP2 and
    DeepSpeed ZeRO-3 hold the head's full weight only inside the forward
    (FSDP2 frees the root's parameters after it when ``reshard_after_forward``
    is set, ZeRO-3 those of every module). A tensor result is returned as the
    head's output after the head's forward hooks: ZeRO-3 replaces a module's
    output (and input) by a new tensor whose backward re-gathers (releases)
    the module's parameters, so the loss must flow through those tensors.

    If the model's forward never calls its LM head module (a custom forward),
    ``fn`` runs after the forward on the parameters as they are then, which
    is right without sharding and under DDP.
    """
    return _run(model, inputs, fn)


@contextlib.contextmanager
def _checkpointing_off_without_grad(model: nn.Module) -> Iterator[None]:
    """Gradient checkpointing off for a forward without gradient, back on after it.

    Without gradient there is nothing to recompute, and torch's reentrant
    checkpoint warns "None of the inputs have requires_grad=True" at every
    layer. transformers' layers (and older models' decoders) checkpoint when
    their ``gradient_checkpointing`` attribute is True.
    """
    if torch.is_grad_enabled():
        yield
        return
    modules = [module for module in model.modules() if getattr(module, "gradient_checkpointing", False) is True]
    for module in modules:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module in modules:
            module.gradient_checkpointing = True


def _run(model: nn.Module, inputs: dict[str, Any], fn: Optional[Callable]) -> Any:
    causal_lm = unwrap_causal_lm(model)
    captured: list[Tensor] = []
    results: list[Any] = []
    head_outputs: list[Any] = []

    def capture(_module: nn.Module, _args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state)

    def head(*args: Any, **_kwargs: Any) -> Any:
        if len(captured) != 1:
            raise RuntimeError(f"qtuning: expected one decoder forward before the LM head, saw {len(captured)}")
        # The head's own input where it is the whole final hidden states: ZeRO-3 attaches its
        # release-after-backward hook to it.
        hidden = args[0] if args and torch.is_tensor(args[0]) and args[0].shape == captured[0].shape else captured[0]
        result = fn(hidden, *lm_head_parameters(causal_lm))
        results.append(result)
        # The model may post-process its logits (e.g. soft-capping): the caller gets the
        # result itself, and a non-tensor one is replaced by a placeholder in the output.
        return result if torch.is_tensor(result) else captured[0].new_zeros(())

    def keep_head_output(_module: nn.Module, _args: Any, output: Any) -> None:
        head_outputs.append(output)

    # Every input but the labels, as `Trainer.compute_loss` passes them (model-specific extras included).
    model_inputs = {key: value for key, value in inputs.items() if key not in NOT_MODEL_INPUTS and value is not None}
    # Without fn only the hidden states are wanted (the head runs on the last position); fn gets every position.
    extra = {"logits_to_keep": 1} if fn is None and _accepts_logits_to_keep(causal_lm) else {}
    outer_head = causal_lm.get_output_embeddings()
    # Under FSDP1 a separately wrapped head is a wrapper: patch the module it wraps.
    head_module = getattr(outer_head, "_fsdp_wrapped_module", outer_head)
    previous = head_module.__dict__.get("forward")  # an instance-level forward, if some patch set one
    handles = [causal_lm.get_decoder().register_forward_hook(capture)]
    if fn is not None:
        head_module.forward = head
        # Registered after the wrappers' own hooks, so it sees the output as they left it.
        handles.append(outer_head.register_forward_hook(keep_head_output))
    try:
        with _checkpointing_off_without_grad(model):
            model(**model_inputs, use_cache=False, **extra)
    finally:
        for handle in handles:
            handle.remove()
        if fn is not None:
            if previous is None:
                del head_module.forward  # back to the class's forward
            else:
                head_module.forward = previous
    if len(captured) != 1:
        raise RuntimeError(f"qtuning: expected one decoder forward, saw {len(captured)}")
    if fn is None:
        return captured[0]
    if not results:  # the forward did not call the head module
        return fn(captured[0], *lm_head_parameters(causal_lm))
    # A tensor result is returned as the head's output: ZeRO-3 wraps that output in a new
    # tensor whose backward re-gathers the head's weight, and only that tensor carries the hook.
    if torch.is_tensor(results[0]) and head_outputs and torch.is_tensor(head_outputs[0]):
        return head_outputs[0]
    return results[0]


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
