"""`modeling.head_forward`: statistics and loss computed in place of the LM head, inside the forward."""

import pytest
import torch

from qtuning_plugin.modeling import final_hidden_states, head_forward, lm_head_parameters, unwrap_causal_lm

from conftest import random_batch


def test_fn_sees_the_full_hidden_states_and_the_head_parameters(model):
    inputs = random_batch(seed=1)
    expected = final_hidden_states(model, inputs)
    weight, bias = lm_head_parameters(unwrap_causal_lm(model))
    seen = {}

    def fn(hidden, w, b):
        seen.update(hidden=hidden, weight=w, bias=b)
        return (hidden @ w.T).sum()

    result = head_forward(model, inputs, fn)
    torch.testing.assert_close(seen["hidden"], expected)
    assert seen["weight"] is weight and seen["bias"] is bias
    torch.testing.assert_close(result, (expected @ weight.T).sum())
    result.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_the_head_is_restored_even_when_fn_fails(model):
    inputs = random_batch(seed=2)
    head = unwrap_causal_lm(model).get_output_embeddings()
    with pytest.raises(ZeroDivisionError):
        head_forward(model, inputs, lambda h, w, b: 1 / 0)
    assert "forward" not in head.__dict__
    assert model(**inputs).logits.shape[-1] == head.weight.shape[0]


def test_non_tensor_results_and_post_processed_logits(model):
    """A model that transforms its logits (soft-capping) must not transform fn's result."""
    causal_lm = unwrap_causal_lm(model)
    original = type(causal_lm).forward

    def softcapped(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out.logits = torch.tanh(out.logits / 30.0) * 30.0
        return out

    inputs = random_batch(seed=3)
    causal_lm.forward = softcapped.__get__(causal_lm)
    try:
        masks = head_forward(model, inputs, lambda h, w, b: (h.shape, w.shape))
        value = head_forward(model, inputs, lambda h, w, b: h.new_tensor(100.0))
    finally:
        del causal_lm.forward
    assert masks == ((8, 16, 32), (101, 32))
    assert value.item() == 100.0


def test_a_forward_that_never_calls_the_head_falls_back_to_after_the_forward(model):
    causal_lm = unwrap_causal_lm(model)

    def headless(self, input_ids=None, attention_mask=None, **kwargs):
        self.model(input_ids=input_ids, attention_mask=attention_mask)
        return None

    inputs = random_batch(seed=4)
    causal_lm.forward = headless.__get__(causal_lm)
    try:
        shape = head_forward(model, inputs, lambda h, w, b: tuple(h.shape))
    finally:
        del causal_lm.forward
    assert shape == (8, 16, 32)


class _BackwardMarker(torch.autograd.Function):
    """Identity whose backward records ``label``: how DeepSpeed ZeRO-3 hooks a module's output
    (re-gather its parameters before its backward) and its input (release them after)."""

    @staticmethod
    def forward(ctx, tensor, log, label):
        ctx.log, ctx.label = log, label
        return tensor.detach()

    @staticmethod
    def backward(ctx, grad):
        ctx.log.append(ctx.label)
        return grad, None, None


def test_the_loss_backpropagates_through_the_hooks_on_the_head_output_and_input(model):
    """fn's loss is returned as the head's output after its forward hooks, and fn gets the head's
    own input: a backward hook attached to either (as ZeRO-3 does) runs, output first."""
    head = unwrap_causal_lm(model).get_output_embeddings()
    log = []
    handles = [
        head.register_forward_pre_hook(lambda _m, args: (_BackwardMarker.apply(args[0], log, "input"), *args[1:])),
        head.register_forward_hook(lambda _m, _args, output: _BackwardMarker.apply(output, log, "output")),
    ]
    try:
        loss = head_forward(model, random_batch(seed=5), lambda h, w, b: (h @ w.T).logsumexp(dim=-1).mean())
    finally:
        for handle in handles:
            handle.remove()
    loss.backward()
    assert log == ["output", "input"]


def test_lora_on_the_lm_head_is_refused():
    """A LoRA head's output is not ``hidden @ weight.T``: the fused ops would silently drop the adapter."""
    from peft import LoraConfig, get_peft_model

    from conftest import tiny_llama

    model = get_peft_model(tiny_llama(lora=False), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="LoRA on the LM head is not supported"):
        head_forward(model, random_batch(seed=5), lambda h, w, b: h.sum())
