"""Scoring a step's micro-batches in shared forwards (`qtuning_plugin.engine.scoring`,
``qtuning.scoring_batch_tokens``).

The reference is each micro-batch (each packed sample) run alone through the model's own forward:
its full ``[T, V]`` logits, `torch.log_softmax`, the NLL of the target and the entropy.
"""

import pytest
import torch
from pydantic import ValidationError

from qtuning_plugin import QTuningConfig, QTuningEngine
from qtuning_plugin.engine import MicroBatch
from qtuning_plugin.engine.scoring import backward_budget, scoring_groups
from qtuning_plugin.modeling import unwrap_causal_lm

from conftest import random_batch, tiny_llama
from test_trainer import _packed

# float32 on CPU: a padded batch runs SDPA with an explicit mask where a lone row runs it causal,
# and the matmuls see other shapes; the differences measured here are ~1e-6 nats.
ATOL = 1e-4


def reference_stats(model, inputs):
    """``(nll, entropy)`` ``[B, T]`` from the model's full logits, 0 where the next label is -100."""
    with torch.no_grad():
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        logits = model(**model_inputs).logits.float()
    targets = torch.full_like(inputs["labels"], -100)
    targets[:, :-1] = inputs["labels"][:, 1:]
    if "position_ids" in inputs:  # a packed sample's first token is predicted from another sample
        targets[:, :-1] = targets[:, :-1].masked_fill(inputs["position_ids"][:, 1:] == 0, -100)
    logp = torch.log_softmax(logits, dim=-1)
    valid = targets != -100
    nll = -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return torch.where(valid, nll, 0.0), torch.where(valid, entropy, 0.0)


def scoring_forwards(model):
    """A list that grows by the batch size of every forward without gradient."""
    seen = []
    unwrap_causal_lm(model).get_decoder().register_forward_hook(
        lambda _m, _a, out: seen.append(tuple(out[0].shape[:2])) if not torch.is_grad_enabled() else None)
    return seen


def trimmed_rows(rows):
    """Each row of a right-padded batch as a micro-batch of one, its padding cut (the collator at mbs 1)."""
    out = []
    for b in range(rows["input_ids"].shape[0]):
        used = int(rows["attention_mask"][b].sum())
        out.append({key: value[b : b + 1, :used] for key, value in rows.items()})
    return out


def score(model, micro_batches, tokens):
    engine = QTuningEngine(QTuningConfig(triage_scope="step", scoring_batch_tokens=tokens, backend="torch"),
                           data_parallel=False)
    batches = [MicroBatch.prepare(inputs) for inputs in micro_batches]
    return engine.triage(model, batches, step=1), batches


def assert_scores_match(event, batches, references):
    """The selection's per-sample statistics are those of the reference's per-token statistics."""
    selection = event.selection
    row = 0
    for batch, (nll, entropy) in zip(batches, references):
        mask = batch.per_sample(batch.mask, False)
        nll, entropy = batch.per_sample(nll), batch.per_sample(entropy)
        for s in range(mask.shape[0]):
            count = int(mask[s].sum())
            if count:
                ppl = torch.exp(nll[s][mask[s]].double().mean())
                ent = entropy[s][mask[s]].double().mean()
                torch.testing.assert_close(selection.ppl[row], ppl, atol=ATOL, rtol=ATOL)
                torch.testing.assert_close(selection.ent[row], ent, atol=ATOL, rtol=ATOL)
            row += 1


def test_rows_of_micro_batch_size_one_share_forwards_within_the_budget():
    model = tiny_llama()
    model.eval()
    micro_batches = trimmed_rows(random_batch(batch=6, length=16, seed=41))
    widths = [m["input_ids"].shape[1] for m in micro_batches]
    forwards = scoring_forwards(model)
    event, batches = score(model, micro_batches, tokens=3 * 16)
    # Widest first, each forward holds rows while rows x widest <= 48: worked out by hand from the widths.
    expected, current = [], []
    for width in sorted(widths, reverse=True):
        if current and (len(current) + 1) * current[0] > 48:
            expected.append((len(current), current[0]))
            current = []
        current.append(width)
    expected.append((len(current), current[0]))
    assert sorted(forwards) == sorted(expected) and len(forwards) < len(micro_batches)
    assert_scores_match(event, batches, [reference_stats(model, m) for m in micro_batches])


def test_padded_micro_batches_in_one_forward_score_as_alone():
    model = tiny_llama()
    rows = random_batch(batch=8, length=16, seed=42)
    micro_batches = [{key: value[i : i + 2] for key, value in rows.items()} for i in range(0, 8, 2)]
    forwards = scoring_forwards(model)
    event, batches = score(model, micro_batches, tokens=8 * 16)
    assert forwards == [(8, 16)]
    assert_scores_match(event, batches, [reference_stats(model, m) for m in micro_batches])


def test_packed_rows_without_attention_mask_are_laid_end_to_end():
    """Padding-free packing: attention reads position_ids, so rows go end to end in one row."""
    model = tiny_llama()
    rows = random_batch(batch=6, length=16, seed=43)
    micro_batches = [_packed(rows, [[0, 1]]), _packed(rows, [[2, 3, 4]]), _packed(rows, [[5]])]
    forwards = scoring_forwards(model)
    event, batches = score(model, micro_batches, tokens=10_000)
    assert forwards == [(1, sum(m["input_ids"].shape[1] for m in micro_batches))]
    # Reference: every sample alone, unpacked, placed where it lies in its packed row.
    references = []
    for packed_row, samples in zip(micro_batches, [[0, 1], [2, 3, 4], [5]]):
        nll = torch.zeros(packed_row["labels"].shape)
        entropy = torch.zeros_like(nll)
        start = 0
        for b in samples:
            used = int(rows["attention_mask"][b].sum())
            alone = {key: value[b : b + 1, :used] for key, value in rows.items()}
            part_nll, part_entropy = reference_stats(model, alone)
            nll[:, start : start + used], entropy[:, start : start + used] = part_nll, part_entropy
            start += used
        references.append((nll, entropy))
    assert_scores_match(event, batches, references)


def test_inputs_that_are_not_rows_score_one_micro_batch_per_forward():
    model = tiny_llama()
    micro_batches = trimmed_rows(random_batch(batch=3, length=12, seed=44))
    # An extra input that is not [B, T] (the model passes unknown keywords on to its attention, unused).
    extra = [{**m, "cross_attention_states": torch.zeros(1, 2, 3)} for m in micro_batches]
    forwards = scoring_forwards(model)
    event, batches = score(model, extra, tokens=10_000)
    assert forwards == [(1, m["input_ids"].shape[1]) for m in micro_batches]
    assert_scores_match(event, batches, [reference_stats(model, m) for m in micro_batches])


def test_groups_are_split_to_the_count_another_rank_runs():
    rows = random_batch(batch=8, length=16, seed=45)
    batches = [MicroBatch.prepare({k: v[i : i + 1] for k, v in rows.items()}) for i in range(8)]
    groups = scoring_groups(batches, "rows", budget=10_000)
    assert [len(g) for g in groups] == [8]
    split = scoring_groups(batches, "rows", budget=10_000, count=3)
    assert sorted(len(g) for g in split) == [2, 2, 4]
    assert sorted(i for g in split for i in g) == list(range(8))


def test_the_default_budget_is_the_activation_memory_of_a_training_backward():
    """Tiny Llama: L 2, H 32, I 64, 4 heads of 8, 2 KV heads: a layer keeps S = 6*32 + 2*16 + 4*64 = 480
    values per token; a no-grad forward holds H + S = 512, a backward L*S = 960 (checkpointing:
    L*H + S = 544)."""
    model = tiny_llama()
    assert backward_budget(model, 100) == 100 * 960 // 512
    unwrap_causal_lm(model).gradient_checkpointing_enable()
    assert backward_budget(model, 100) == 100 * 544 // 512


@pytest.mark.parametrize("value", [0, -5, "many"])
def test_scoring_batch_tokens_is_validated_naming_the_key(value):
    with pytest.raises(ValidationError, match="scoring_batch_tokens"):
        QTuningConfig(scoring_batch_tokens=value)


def test_scoring_batch_tokens_needs_step_scope():
    with pytest.raises(ValidationError, match="scoring_batch_tokens.*triage_scope: step"):
        QTuningConfig(triage_scope="micro_batch", scoring_batch_tokens=4096)
    assert QTuningConfig(scoring_batch_tokens=1).scoring_batch_tokens == 1


def _agreed_count_worker(rank, init_file, results):
    import torch.distributed as dist

    from qtuning_plugin.engine.scoring import agreed_count

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results[rank] = agreed_count([1, 3][rank], torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def test_every_rank_runs_as_many_scoring_forwards_as_the_rank_that_needs_most(tmp_path):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_agreed_count_worker, args=(str(tmp_path / "init"), results), nprocs=2)
        assert dict(results) == {0: 3, 1: 3}


def test_a_shared_forward_chunks_its_statistics_as_one_micro_batch_would():
    """The torch op's default chunk grows with the targets it is given (up to 64 MiB of logits): a
    forward over several micro-batches must not hold larger chunks than one of them did."""
    from qtuning_plugin.ops.backends import TORCH

    chunks = []

    class Recording:
        name, description = TORCH.name, TORCH.description
        linear_cross_entropy = staticmethod(TORCH.linear_cross_entropy)

        @staticmethod
        def token_stats(*args, chunk_size=None, **kwargs):
            chunks.append(chunk_size)
            return TORCH.token_stats(*args, chunk_size=chunk_size, **kwargs)

    model = tiny_llama()
    micro_batches = trimmed_rows(random_batch(batch=4, length=16, seed=46))
    engine = QTuningEngine(QTuningConfig(scoring_batch_tokens=10_000), data_parallel=False, backend=Recording())
    engine.triage(model, [MicroBatch.prepare(m) for m in micro_batches], step=1)
    # The tiny vocabulary's budget is far above a row's targets: the chunk is one row's targets.
    most_targets = max(int((m["labels"][0, 1:] != -100).sum()) for m in micro_batches)
    assert chunks == [most_targets]
