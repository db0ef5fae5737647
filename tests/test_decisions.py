"""``log_decisions``: ``qtuning_decisions.jsonl`` holds every triaged sample with the decision SPEC
makes from its logged PPL and Ent, keyed by the sample's own tokens (packed samples included), and a
restart keeps the lines of the steps already trained. The file across ranks is checked in
`test_distributed.py`, across a resume in `test_resume.py`."""

import json

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from qtuning_plugin import QTuningConfig, QTuningTrainerMixin
from qtuning_plugin.atomic_files import read_jsonl
from qtuning_plugin.decisions import DECISIONS_NAME, DecisionLog
from qtuning_plugin.sample_key import sample_key

from conftest import Rows, Selections, random_batch, tiny_llama
from reference import check_decision_lines, check_same_decisions
from test_trainer import _packed

SAMPLE_KEEP, TOKEN_KEEP = 0.25, 0.5
MICRO_BATCH, ACCUMULATION, STEPS = 4, 2, 4


class QTuningTrainer(QTuningTrainerMixin, Trainer):
    pass


def row_keys(batch: dict) -> dict[str, tuple[int, int]]:
    """``{sample_key of a row's unpadded tokens: (row, its trainable positions)}``."""
    keys = {}
    for row, (ids, mask, labels) in enumerate(zip(batch["input_ids"], batch["attention_mask"], batch["labels"])):
        keys[sample_key(ids[mask != 0])] = (row, int((labels[1:] != -100).sum()))
    return keys


def test_a_training_run_logs_every_triaged_sample_as_spec_decides_it(tmp_path):
    rows = random_batch(batch=MICRO_BATCH * ACCUMULATION * STEPS, length=16, seed=11)
    rows["labels"][3] = -100  # a sample without a trainable token takes no part and gets no line
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=ACCUMULATION,
        max_steps=STEPS, report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-2, seed=3,
    )
    config = QTuningConfig(sample_keep_ratio=SAMPLE_KEEP, token_keep_ratio=TOKEN_KEEP, log_decisions=True)
    trainer = QTuningTrainer(model=tiny_llama(), args=args, train_dataset=Rows(rows), qtuning_config=config)
    events = Selections.of(trainer)
    trainer.train()

    lines = read_jsonl(str(tmp_path / DECISIONS_NAME))
    keys = row_keys(rows)
    # One epoch: every row once, each under its own key, but the one without a trainable token.
    assert sorted(keys[line["key"]][0] for line in lines) == [row for row in range(len(keys)) if row != 3]
    assert all(line["trainable_tokens"] == keys[line["key"]][1] for line in lines)
    check_decision_lines(lines, SAMPLE_KEEP, TOKEN_KEEP)
    assert {line["quadrant"] for line in lines} >= {"Q1", "Q2", "Q3", "Q4"}
    # The engine's statistics, as they were triaged.
    assert len(events) == STEPS
    for event in events:
        samples = ~torch.isnan(event.selection.ppl)
        got = [(line["ppl"], line["ent"]) for line in lines if line["step"] == event.step]
        assert got == list(zip(event.selection.ppl[samples].tolist(), event.selection.ent[samples].tolist()))


@pytest.mark.parametrize("numbered_attention_mask", [False, True], ids=["position_ids", "numbered_mask"])
def test_each_packed_sample_is_keyed_by_its_own_tokens(tmp_path, numbered_attention_mask):
    rows = random_batch(batch=6, seed=3)
    packed = _packed(rows, [[0, 1, 2], [3, 4], [5]], numbered_attention_mask)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, report_to=[], use_cpu=True)
    config = QTuningConfig(triage_scope="micro_batch", sample_keep_ratio=0.5, log_decisions=True)
    model = tiny_llama()
    trainer = QTuningTrainer(model=model, args=args, qtuning_config=config)
    model.train()
    trainer.compute_loss(model, packed)
    lines = read_jsonl(str(tmp_path / DECISIONS_NAME))
    assert [line["key"] for line in lines] == list(row_keys(rows))  # segments in row order, padding left out
    assert [line["trainable_tokens"] for line in lines] == [length for _, length in row_keys(rows).values()]
    assert {line["step"] for line in lines} == {1}


def test_a_run_resumed_from_an_earlier_checkpoint_rewrites_the_file_it_had(tmp_path):
    """A run that saved every step, resumed in its own folder from checkpoint-1: the lines of step 1
    stay, those of steps 2-3 are dropped and written again, as the same decisions."""
    def trainer():
        args = TrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=3, save_steps=1, report_to=[],
            use_cpu=True, learning_rate=1e-2, seed=3, data_seed=3,
        )
        config = QTuningConfig(triage_scope="micro_batch", sample_keep_ratio=0.5, log_decisions=True)
        return QTuningTrainer(model=tiny_llama(), args=args, train_dataset=Rows(random_batch(batch=24, seed=7)),
                              qtuning_config=config)

    trainer().train()
    uninterrupted = read_jsonl(str(tmp_path / DECISIONS_NAME))
    assert [line["step"] for line in uninterrupted] == [1] * 8 + [2] * 8 + [3] * 8
    resumed = trainer()
    at_start = FileAtStart(tmp_path / DECISIONS_NAME)
    resumed.add_callback(at_start)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert at_start.lines == uninterrupted[:8]
    check_same_decisions(read_jsonl(str(tmp_path / DECISIONS_NAME)), uninterrupted)


class FileAtStart(TrainerCallback):
    """The lines of a decision log when training starts (after the Q-Tuning callbacks' start)."""

    def __init__(self, path):
        self.path, self.lines = path, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.lines = read_jsonl(str(self.path))


def test_restart_keeps_the_lines_of_the_steps_already_trained(tmp_path):
    path = tmp_path / DECISIONS_NAME
    written = [{"step": step, "key": f"{step:016x}"} for step in (1, 1, 2, 3, 3)]
    path.write_text("".join(json.dumps(line) + "\n" for line in written) + '{"step": 4, "ke')  # a kill's cut line
    DecisionLog(str(tmp_path), main_process=False).restart(1)
    assert len(read_jsonl(str(path))) == 5  # another rank's process leaves the file alone
    log = DecisionLog(str(tmp_path), main_process=True)
    log.restart(2)
    assert path.read_text() == "".join(json.dumps(line) + "\n" for line in written[:3])
    log.restart(0)  # a run started afresh
    assert not path.exists()
    log.restart(0)  # and none to start from
