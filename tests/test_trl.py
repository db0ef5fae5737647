"""Q-Tuning inside TRL's `SFTTrainer`, with TRL's own settings: its defaults (bf16 autocast, the
``chunked_nll`` loss type), ``padding_free`` and ``packing`` (each packed sample triaged on its
own), and the loss types that are refused. References come from the model itself (plain
transformers and torch)."""

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from qtuning_plugin import QTuningConfig, QTuningTrainerMixin

from conftest import Selections, VOCAB, tiny_llama

SAMPLES = 8


class QTuningSFTTrainer(QTuningTrainerMixin, SFTTrainer):
    pass


@pytest.fixture(scope="module")
def tokenizer():
    """The tiny tokenizer: SFTTrainer wants one (pad and eos ids); the samples come tokenised."""
    from qtuning_plugin.tiny import build_tokenizer

    return build_tokenizer()


def samples(seed=0):
    """Tokenised prompt-completion samples of 6-13 tokens: ``input_ids`` and ``completion_mask``."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(SAMPLES):
        length = int(torch.randint(6, 14, (1,), generator=generator))
        prompt = int(torch.randint(2, 4, (1,), generator=generator))
        rows.append(
            {
                "input_ids": torch.randint(5, VOCAB, (length,), generator=generator).tolist(),
                "completion_mask": [0] * prompt + [1] * (length - prompt),
            }
        )
    return rows


def sft_config(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=SAMPLES,
        max_steps=1,
        completion_only_loss=True,
        train_sampling_strategy="sequential",
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
    )
    return SFTConfig(**{**settings, **overrides})


def trainer_for(tmp_path, tokenizer, qtuning, rows=None, **settings):
    return QTuningSFTTrainer(
        model=tiny_llama(seed=0),
        args=sft_config(tmp_path, **settings),
        train_dataset=Dataset.from_list(rows or samples()),
        processing_class=tokenizer,
        qtuning_config=QTuningConfig(**qtuning),
    )


def reference_ppl(rows):
    """Each sample alone through a fresh model: exp of its mean cross-entropy over the completion
    targets (plain `F.cross_entropy` on the logits)."""
    model = tiny_llama(seed=0)
    ppl = []
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor(row["input_ids"])
            labels = torch.where(torch.tensor(row["completion_mask"]) == 1, ids, -100)
            logits = model(input_ids=ids[None]).logits[0, :-1].double()
            ppl.append(float(F.cross_entropy(logits, labels[1:], ignore_index=-100).exp()))
    return ppl


def logged(trainer):
    return next(entry for entry in trainer.state.log_history if "loss" in entry)


def test_defaults_train_under_bf16_autocast_on_the_models_own_loss(tmp_path, tokenizer):
    """TRL's SFTConfig defaults (bf16 on, so CPU autocast; loss_type chunked_nll); with both keep
    ratios at 1 the loss is the model's own loss under the same autocast."""
    trainer = trainer_for(tmp_path, tokenizer, {"sample_keep_ratio": 1.0, "token_keep_ratio": 1.0})
    assert trainer.args.bf16 and trainer.args.loss_type == "chunked_nll"
    batch = next(iter(trainer.get_train_dataloader()))
    model = tiny_llama(seed=0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(**batch).loss.item()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert logged(trainer)["loss"] == pytest.approx(expected, rel=2e-2)
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed and len(changed) == len(before)


@pytest.mark.parametrize(
    "settings",
    [{"padding_free": True, "max_length": None}, {"packing": True, "max_length": 48}],
    ids=["padding_free", "packing"],
)
def test_packed_samples_are_triaged_one_by_one(tmp_path, tokenizer, settings):
    """Several samples per row (position_ids restart): each is a sample of the triage, with the
    perplexity it has alone; BFD packing reorders them, so the multiset is compared."""
    rows = samples(seed=1)
    trainer = trainer_for(
        tmp_path, tokenizer, {"sample_keep_ratio": 0.5, "token_keep_ratio": 0.5}, rows, bf16=False, **settings
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] < SAMPLES  # really packed
    events = Selections.of(trainer)
    trainer.train()
    selection = events.last
    valid = ~torch.isnan(selection.ppl)
    assert int(valid.sum()) == SAMPLES
    got = sorted(selection.ppl[valid].tolist())
    assert got == pytest.approx(sorted(reference_ppl(rows)), rel=1e-4)
    entry = logged(trainer)
    assert sum(entry[f"qtuning/samples_{q}"] for q in ("q1", "q2", "q3", "q4", "middle")) == SAMPLES
    assert entry["qtuning/kept_sample_frac"] == pytest.approx(0.5)


def test_dft_loss_is_refused_at_start_up(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"loss_type: 'dft': replaces the cross-entropy loss.*use loss_type='nll'"):
        trainer_for(tmp_path, tokenizer, {}, loss_type="dft", bf16=False)


def test_wrapped_packing_is_refused_at_start_up(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"packing_strategy: 'wrapped'"):
        trainer_for(tmp_path, tokenizer, {}, packing=True, packing_strategy="wrapped", max_length=48, bf16=False)



def test_labels_over_whole_samples_are_warned_about(tmp_path, tokenizer, caplog):
    """TRL trains on every token of a sample without a completion or assistant mask (its default on
    conversational data): PPL and Ent then describe the prompt too, which the user is told once."""
    import logging

    from qtuning_plugin._logging import LOG

    whole = [{"input_ids": row["input_ids"]} for row in samples()]
    for rows, completion_only_loss, warned in ((whole, None, True), (None, True, False)):
        trainer = trainer_for(tmp_path, tokenizer, {}, rows, bf16=False, completion_only_loss=completion_only_loss,
                              max_steps=2, per_device_train_batch_size=SAMPLES // 2)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOG.logger.name):
            trainer.train()
        assert caplog.text.count("the labels cover the prompts too") == int(warned), caplog.text
