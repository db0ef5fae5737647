"""Scoring an optimizer step's micro-batches in as few gradient-free forwards as fit
(``triage_scope: step``, ``qtuning.scoring_batch_tokens``).

Users pick a small ``micro_batch_size`` for the memory of the backward; the scoring forward
keeps no activations for a backward, so it can take several micro-batches at once. The
micro-batches of a step are put together as the host's collator would have put their rows
together at a larger micro-batch (`collate`), grouped so that each forward holds at most a
budget of positions (`scoring_groups`, `scoring_budget`), and each forward's per-token
statistics are cut back into the micro-batches they came from.

Putting rows together changes nothing a causal model computes for a token: padding is added
only after a row's last token (masked where the batch has an attention mask), and packed rows
without an attention mask (padding-free packing, where attention reads ``position_ids``) are
laid end to end in one row, each micro-batch a new packed sample. The numbers can still differ
by float rounding (another kernel or reduction order for a padded batch).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from qtuning_plugin.distributed import world_size
from qtuning_plugin.engine.micro_batch import MicroBatch
from qtuning_plugin.modeling import unwrap_causal_lm

# Padding values past a row's last token (0 for the other channels).
_PAD = {"labels": -100, "attention_mask": 0}


def collatable(batches: Sequence[MicroBatch]) -> Optional[str]:
    """How ``batches`` go into one forward: ``"rows"`` (stacked, right-padded to the widest),
    ``"end_to_end"`` (packed rows without an attention mask, one row each, concatenated along
    the sequence), or None where an input is not a ``[B, T]`` tensor of its micro-batch (a
    4-D mask, pixel values): those are scored one micro-batch per forward."""
    keys = set(batches[0].inputs)
    for batch in batches:
        if set(batch.inputs) != keys:
            return None
        for value in batch.inputs.values():
            if value is not None and not (torch.is_tensor(value) and value.shape == batch.targets.shape):
                return None
    if "attention_mask" not in keys and any(b.packed for b in batches):
        return "end_to_end" if all(b.targets.shape[0] == 1 for b in batches) else None
    return "rows"


def _pad_right(key: str, value: Tensor, width: int) -> Tensor:
    """``value [B, T]`` with ``width - T`` positions appended: position ids go on counting past
    the row's last one (so that no packed sample opens there), labels -100, everything else 0."""
    extra = width - value.shape[1]
    if extra == 0:
        return value
    if key == "position_ids":
        steps = torch.arange(1, extra + 1, device=value.device, dtype=value.dtype)
        tail = value[:, -1:] + steps
    else:
        tail = value.new_full((value.shape[0], extra), _PAD.get(key, 0))
    return torch.cat([value, tail], dim=1)


def collate(batches: Sequence[MicroBatch], mode: str) -> MicroBatch:
    """One micro-batch holding the rows of ``batches`` (`collatable`'s ``mode``); its ``targets``
    are theirs, laid out the same way (-100 on the added positions). Segments are not computed:
    scoring needs none."""
    keys = [key for key, value in batches[0].inputs.items() if value is not None]
    if mode == "end_to_end":
        inputs = {key: torch.cat([b.inputs[key] for b in batches], dim=1) for key in keys}
        return MicroBatch(inputs, torch.cat([b.targets for b in batches], dim=1), None)
    width = max(b.targets.shape[1] for b in batches)
    inputs = {key: torch.cat([_pad_right(key, b.inputs[key], width) for b in batches]) for key in keys}
    targets = torch.cat([_pad_right("labels", b.targets, width) for b in batches])
    return MicroBatch(inputs, targets, None)


def split(batches: Sequence[MicroBatch], mode: str, values: Tensor) -> list[Tensor]:
    """``values`` of the `collate` d micro-batch cut back into one ``[B_i, T_i]`` tensor per batch."""
    parts, start = [], 0
    for batch in batches:
        rows, width = batch.targets.shape
        if mode == "end_to_end":
            parts.append(values[:, start : start + width])
            start += width
        else:
            parts.append(values[start : start + rows, :width])
            start += rows
    return parts


def positions(batches: Sequence[MicroBatch], mode: str) -> int:
    """The positions one forward over ``batches`` computes (padding included)."""
    if mode == "end_to_end":
        return sum(b.targets.shape[1] for b in batches)
    return sum(b.targets.shape[0] for b in batches) * max(b.targets.shape[1] for b in batches)


def scoring_groups(batches: Sequence[MicroBatch], mode: str, budget: int, count: Optional[int] = None) -> list[list[int]]:
    """The micro-batches of each scoring forward, as indices into ``batches``.

    Widest first (so that rows of like length share a forward and pad little), each forward
    takes micro-batches while it stays within ``budget`` positions; one micro-batch over the
    budget is a forward of its own. With ``count`` (the number of forwards another rank runs,
    at least ours and at most ``len(batches)``), the largest groups are halved until there are
    ``count``.
    """
    order = sorted(range(len(batches)), key=lambda i: -batches[i].targets.shape[1])
    groups: list[list[int]] = []
    for index in order:
        if groups and positions([batches[i] for i in groups[-1] + [index]], mode) <= budget:
            groups[-1].append(index)
        else:
            groups.append([index])
    while count is not None and len(groups) < count and any(len(g) > 1 for g in groups):
        largest = max(range(len(groups)), key=lambda g: len(groups[g]))
        group = groups.pop(largest)
        half = (len(group) + 1) // 2
        groups[largest:largest] = [group[:half], group[half:]]
    return groups


def _layer_sizes(causal_lm: nn.Module) -> Optional[tuple[int, int, int]]:
    """``(layers L, hidden H, S)``: S the values per token one decoder layer keeps for its backward
    (norm inputs and outputs, q/k/v/o inputs and outputs, the MLP's gate, up, activation and
    product: about ``6 H + 2 H_kv + 4 I`` for a Llama-style layer); None where the config does
    not say."""
    config = getattr(causal_lm, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        layers, hidden = int(config.num_hidden_layers), int(config.hidden_size)
        intermediate = int(getattr(config, "intermediate_size", None) or 4 * hidden)
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
        kv = int(getattr(config, "num_key_value_heads", None) or heads) * head_dim
    except (AttributeError, TypeError, ValueError):
        return None
    return layers, hidden, 6 * hidden + 2 * kv + 4 * intermediate


def backward_budget(model: nn.Module, micro_batch_positions: int) -> int:
    """Positions whose gradient-free forward holds no more activation memory than the backward of
    one training micro-batch of ``micro_batch_positions`` positions.

    Per token, a forward with gradient keeps every layer's saved activations, ``L x S`` values
    (with gradient checkpointing, every layer's input, ``L x H``, plus the one layer it
    recomputes, ``S``); a forward without gradient holds the residual stream and at most one
    layer's intermediates at a time, ``H + S``. So ``micro_batch_positions x backward / forward``
    positions fit where one micro-batch's backward did. Both sides leave out the LM head (the
    statistics and our loss are chunked) and the weights.
    """
    causal_lm = unwrap_causal_lm(model)
    sizes = _layer_sizes(causal_lm)
    if sizes is None:
        return micro_batch_positions
    layers, hidden, saved = sizes
    checkpointing = bool(getattr(causal_lm, "is_gradient_checkpointing", False))
    backward = layers * hidden + saved if checkpointing else layers * saved
    return max(micro_batch_positions, micro_batch_positions * backward // (hidden + saved))


def free_memory_budget(model: nn.Module, device: torch.device) -> int:
    """CUDA: positions whose gradient-free forward fits in half the memory free now (free on the
    device plus what the caching allocator holds unused); the other half is left for
    fragmentation and the estimate's error. 0 elsewhere, or where the config does not say."""
    causal_lm = unwrap_causal_lm(model)
    sizes = _layer_sizes(causal_lm)
    if device.type != "cuda" or sizes is None:
        return 0
    _, hidden, saved = sizes
    activation_bytes = causal_lm.get_input_embeddings().weight.element_size()
    head_bytes = causal_lm.get_output_embeddings().weight.element_size()
    # A layer's intermediates and the residual stream, plus the final hidden states cast to the
    # head's dtype and the two float32 statistics for the chunked head.
    per_position = (hidden + saved) * activation_bytes + hidden * head_bytes + 8
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return (free + cached) // 2 // per_position


def scoring_budget(model: nn.Module, batches: Sequence[MicroBatch], tokens: Optional[int]) -> int:
    """Positions per scoring forward: ``qtuning.scoring_batch_tokens`` where set, else the larger of
    `backward_budget` (of the step's largest micro-batch) and, on CUDA, `free_memory_budget`."""
    if tokens is not None:
        return tokens
    largest = max(b.targets.numel() for b in batches)
    return max(backward_budget(model, largest), free_memory_budget(model, batches[0].targets.device))


def agreed_count(local: int, device: torch.device) -> int:
    """The most scoring forwards any rank runs (a collective in data-parallel training), so that
    every rank runs as many: a sharded model (FSDP, ZeRO-3) gathers its weights in each forward."""
    if world_size() == 1:
        return local
    count = torch.tensor([local], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count)


def plan(model: nn.Module, batches: Sequence[MicroBatch], tokens: Optional[int], data_parallel: bool) -> tuple[Optional[str], list[list[int]]]:
    """``(mode, groups)``: how the micro-batches are collated (`collatable`) and which share a forward."""
    mode = collatable(batches)
    if mode is None:
        groups = [[i] for i in range(len(batches))]
    else:
        budget = scoring_budget(model, batches, tokens)
        groups = scoring_groups(batches, mode, budget)
    if data_parallel:
        count = agreed_count(len(groups), batches[0].targets.device)
        if count > len(groups):  # mode is set: without one every micro-batch is a forward already
            groups = scoring_groups(batches, mode, budget, count)
    return mode, groups


def score_in_groups(score: Callable[..., tuple[Tensor, Tensor]], model: nn.Module,
                    batches: Sequence[MicroBatch], tokens: Optional[int], data_parallel: bool) -> list[tuple[Tensor, Tensor]]:
    """Each micro-batch's ``(nll, entropy)``, ``[B_i, T_i]`` each, from ``score(model, micro_batch)``
    run once per group of `plan` (once per micro-batch where there is one); a shared forward gets
    ``chunk_targets``, the most targets of one micro-batch (`QTuningEngine.token_stats`)."""
    if len(batches) == 1:
        return [score(model, batches[0])]
    mode, groups = plan(model, batches, tokens, data_parallel)
    # The statistics of a shared forward are chunked as those of the micro-batch with most targets.
    chunk_targets = max(int(batch.mask.sum()) for batch in batches)
    results: list[tuple[Tensor, Tensor]] = [None] * len(batches)  # type: ignore[list-item]
    for group in groups:
        members = [batches[i] for i in group]
        if len(members) == 1:
            results[group[0]] = score(model, members[0])
            continue
        nll, entropy = score(model, collate(members, mode), chunk_targets)
        for i, part_nll, part_entropy in zip(group, split(members, mode, nll), split(members, mode, entropy)):
            results[i] = (part_nll, part_entropy)
    return results
