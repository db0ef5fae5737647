"""End to end: the real `axolotl train` (subprocess, CPU, offline) on the tiny example.

Six runs, about 100 s of CPU time in all, nearly all of it start-up (`axolotl` -> `accelerate
launch` -> the training process): the training steps themselves take well under a second each,
and half of the runs stop in config validation. Each run carries every check that its
configuration allows: the plugin's module path rides on the QLoRA run, both errors of a bad
section on one run. That `qtuning: {enabled: false}` trains exactly as plain Axolotl is checked
on SmolLM2 (test_axolotl_smollm2.py), where the two runs are seeded alike.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import axolotl
import pytest
from packaging.version import Version
from safetensors.torch import load_file

from axolotl_run import Run, run_axolotl_train, tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import (  # noqa: E402  (SPEC sections 4-5, shared with the unit tests)
    check_decision_keys,
    check_decision_lines,
    check_decisions_of_selections,
    check_selection_records,
)

pytestmark = pytest.mark.integration

# Of the tested releases (0.19, 0.21), 0.21 is the first that loads every `axolotl.plugins`
# entry point on each run, and stops on a `plugins:` entry it cannot import.
LOADS_ENTRY_POINTS = Version(axolotl.__version__) >= Version("0.21")

STEPS = 12
MICRO_BATCH = 8
SAMPLE_KEEP, TOKEN_KEEP = 0.5, 0.5
STORAGE_BYTES = {"torch.uint8": 1, "torch.bfloat16": 2, "torch.float16": 2, "torch.float32": 4}
PROBE = ["qtuning_plugin.QTuningPlugin", "qtuning_probe.ProbePlugin"]
# The plugin's class by its module path, as users may write it instead of the README's name.
MODULE_PATH = "qtuning_plugin.axolotl.plugin.QTuningPlugin"
MISSING_PLUGIN = "has not loaded the Q-Tuning plugin"  # qtuning_plugin/axolotl/guard.py


@pytest.fixture(scope="module")
def qtuning_run(tiny_model, tmp_path_factory) -> Run:
    config = tiny_config(
        tmp_path_factory.mktemp("qtuning"),
        tiny_model,
        steps=STEPS,
        plugins=PROBE,
        qtuning={"sample_keep_ratio": SAMPLE_KEEP, "token_keep_ratio": TOKEN_KEEP, "log_decisions": True},
    )
    return run_axolotl_train(config)


def check_finished(run: Run) -> None:
    assert run.returncode == 0, f"axolotl train failed ({run.returncode}):\n{run.tail()}"
    adapter = run.output_dir / "adapter_model.safetensors"
    assert adapter.is_file(), f"no adapter saved in {run.output_dir}: {sorted(p.name for p in run.output_dir.iterdir())}"


def check_loss_falls(run: Run, *, evaluated: bool = True) -> list[float]:
    logs = run.train_logs()
    assert len(logs) == STEPS, [sorted(entry) for entry in logs]
    losses = [entry["loss"] for entry in logs]
    assert all(math.isfinite(loss) for loss in losses), losses
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.2, f"training loss did not fall clearly: {losses}"
    if not evaluated:
        return losses
    # the held-out loss (plain cross-entropy, before training and at the last step) falls too
    evals = [entry["eval_loss"] for entry in run.trainer_state()["log_history"] if "eval_loss" in entry]
    assert len(evals) == 2 and evals[1] < evals[0], evals
    return losses


def test_qtuning_trains_and_saves_adapter(qtuning_run):
    check_finished(qtuning_run)
    assert "Q-Tuning is active" in qtuning_run.output
    probe = qtuning_run.probe()
    assert probe["trainer_cls"] == "qtuning_plugin.axolotl.trainer.AxolotlQTuningTrainer"
    # LoRA B starts at zero: non-zero B in the saved adapter means training changed it
    weights = load_file(str(qtuning_run.output_dir / "adapter_model.safetensors"))
    lora_b = {name: w for name, w in weights.items() if "lora_B" in name}
    assert lora_b and all(float(w.abs().max()) > 0 for w in lora_b.values()), sorted(lora_b)


def check_active_once(run: Run, steps: int) -> None:
    """One "Q-Tuning is active" line, and one set of `qtuning/` metrics per logging step (logging_steps 1)."""
    check_finished(run)
    assert run.output.count("Q-Tuning is active") == 1, run.tail()
    with_metrics = [entry for entry in run.trainer_state()["log_history"] if any(k.startswith("qtuning/") for k in entry)]
    assert with_metrics == run.train_logs() and len(with_metrics) == steps, with_metrics


def test_plugin_named_as_in_the_readme_is_active_once(qtuning_run):
    check_active_once(qtuning_run, STEPS)


def test_no_plugins_line(tiny_model, tmp_path):
    """The README's name is `qtuning_run`'s, the class's module path the QLoRA run's; here none."""
    steps = 3
    config = tiny_config(tmp_path, tiny_model, steps=steps, plugins=None, val_set_size=0, eval_steps=None)
    run = run_axolotl_train(config)
    if not LOADS_ENTRY_POINTS:
        # 0.19 loads no plugin without the line and would ignore `qtuning:` (plain SFT): it stops
        # instead, in config validation, naming the lines to add
        assert run.returncode != 0 and MISSING_PLUGIN in run.output, run.tail()
        assert "plugins:\n  - qtuning_plugin.QTuningPlugin\n" in run.output, run.tail()
        assert "axolotl.loaders" not in run.output and not run.output_dir.exists(), run.tail()
        return
    check_active_once(run, steps)


def test_qtuning_loss_is_finite_and_falls(qtuning_run):
    check_finished(qtuning_run)
    check_loss_falls(qtuning_run)


def test_qtuning_metrics_logged_within_spec(qtuning_run):
    check_finished(qtuning_run)
    logs = qtuning_run.train_logs()
    target = max(1, round(SAMPLE_KEEP * MICRO_BATCH))
    for entry in logs:
        for key in ("samples_q1", "samples_q2", "samples_q3", "samples_q4", "kept_sample_frac", "kept_token_frac"):
            assert f"qtuning/{key}" in entry, (key, sorted(entry))
        q1, q2, q3, q4 = (entry[f"qtuning/samples_q{i}"] for i in range(1, 5))
        valid = MICRO_BATCH - entry["qtuning/samples_without_target"]
        assert q1 + q2 + q3 + q4 + entry["qtuning/samples_middle"] == pytest.approx(valid)
        # kept = Q2 + Q4: at least K = max(1, round(r * B)) (fill-up), more only if the bisection overshot
        frac = entry["qtuning/kept_sample_frac"]
        assert frac == pytest.approx((q2 + q4) / valid)
        assert target / valid - 1e-9 <= frac <= 1.0
        # tokens: Q2 samples keep max(1, floor(r_token * L)) <= r_token * L (L >= 2 here), Q4 samples all L
        token_frac, kept_tokens = entry["qtuning/kept_token_frac"], entry["qtuning/tokens_kept"]
        assert kept_tokens <= entry["qtuning/tokens_trainable"]
        in_kept_samples = kept_tokens / token_frac
        assert token_frac <= 1.0 + 1e-9
        assert token_frac >= TOKEN_KEEP - q2 / (2 * in_kept_samples) - 1e-9
        if q4 == 0:
            assert token_frac <= TOKEN_KEEP + 1e-9
        if q2 == 0:
            assert token_frac == pytest.approx(1.0)
    # pruning happened: on average about half the samples, and fewer tokens than offered
    mean_frac = sum(entry["qtuning/kept_sample_frac"] for entry in logs) / len(logs)
    assert mean_frac <= SAMPLE_KEEP + 0.25, mean_frac
    assert sum(entry["qtuning/tokens_kept"] for entry in logs) < sum(entry["qtuning/tokens_trainable"] for entry in logs)


def check_selections_match_spec(run: Run) -> None:
    """Redo each micro-batch's triage from the recorded per-sample (PPL, Ent), as SPEC sections 4-5 say."""
    selections = run.probe()["selections"]
    assert len(selections) == STEPS  # one scoring per micro-batch, none during evaluation
    check_records_match_spec(selections)


def check_records_match_spec(
    selections: list[dict], sample_keep: float = SAMPLE_KEEP, token_keep: float = TOKEN_KEEP
) -> None:
    """Each `qtuning_probe` selection record is SPEC's triage and token budget of its (PPL, Ent)."""
    check_selection_records(selections, sample_keep, token_keep)


def test_qtuning_selection_matches_spec(qtuning_run):
    check_finished(qtuning_run)
    check_selections_match_spec(qtuning_run)


def test_decision_log_holds_every_triaged_sample_keyed_by_its_dataset_row(qtuning_run):
    """``log_decisions``: the triaged samples of every step, as the probe saw them, as SPEC triages
    their logged statistics, each keyed by the tokens of a row of Axolotl's prepared dataset."""
    from datasets import load_from_disk

    from qtuning_plugin.atomic_files import read_jsonl
    from qtuning_plugin.decisions import DECISIONS_NAME

    check_finished(qtuning_run)
    lines = read_jsonl(str(qtuning_run.output_dir / DECISIONS_NAME))
    check_decisions_of_selections(lines, qtuning_run.probe()["selections"])
    check_decision_lines(lines, SAMPLE_KEEP, TOKEN_KEEP)
    (prepared,) = (qtuning_run.output_dir.parent / "prepared").glob("*/dataset_info.json")
    check_decision_keys(lines, load_from_disk(str(prepared.parent)))


def test_position_ids_absent_in_unpacked_batches(qtuning_run):
    """What the trainer receives without sample packing: right padding, no position_ids."""
    check_finished(qtuning_run)
    batch = qtuning_run.probe()["batch"]
    assert {"input_ids", "labels", "attention_mask"} <= set(batch["keys"])
    mask = batch["row_attention_mask"]
    length = batch["row_length"]
    assert mask == [1] * length + [0] * (len(mask) - length)  # right-padded
    assert all(label == -100 for label in batch["row_labels"][length:])


def test_qlora_trains_with_4bit_layers(tiny_model, tmp_path):
    """QLoRA, with the plugin named by its module path: active once, as under the README's name."""
    config = tiny_config(
        tmp_path,
        tiny_model,
        steps=STEPS,
        plugins=[MODULE_PATH, "qtuning_probe.ProbePlugin"],
        adapter="qlora",
        load_in_4bit=True,
        # No evaluation: on CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight for
        # inference the first time it runs in eval mode without grad (Axolotl evaluates before
        # training), and the repacked kernel (gemv_4bit) has no autograd: later training steps
        # would backpropagate through it with a warning. Plain Axolotl QLoRA does the same.
        val_set_size=0,
        eval_steps=None,
    )
    run = run_axolotl_train(config)
    check_active_once(run, STEPS)
    probe = run.probe()
    assert probe["trainer_cls"] == "qtuning_plugin.axolotl.trainer.AxolotlQTuningTrainer"
    # every linear layer of the 2 decoder layers (q, k, v, o, gate, up, down) is a bnb Linear4bit
    layers = probe["linear4bit"]
    assert len(layers) == 2 * 7, [layer["name"] for layer in layers]
    for layer in layers:
        assert layer["weight_cls"] == "Params4bit" and layer["quant_type"] == "nf4", layer
        packed_bytes = math.prod(layer["weight_shape"]) * STORAGE_BYTES[layer["weight_dtype"]]
        assert packed_bytes * 2 == math.prod(layer["logical_shape"]), layer  # two 4-bit values a byte
    # the LoRA weights changed (B starts at zero) and the base layers did not get LoRA'd away
    lora = probe["lora"]
    assert lora and all(v["change"] > 0 for v in lora.values()), lora
    assert all(v["norm_after"] > 0 for k, v in lora.items() if "lora_B" in k)
    assert "gemv_4bit: an autograd kernel was not registered" not in run.output
    check_loss_falls(run, evaluated=False)
    assert all("qtuning/kept_sample_frac" in entry for entry in run.train_logs())
    # the quantised model goes through the same scoring and selection as the unquantised one
    assert "scoring two_pass" in run.output, run.tail()
    check_selections_match_spec(run)


# One section with two errors: config validation reports every one of them, each on its own line.
BAD_SECTION = {"sample_keep_ratio": 1.5, "samples_keep_ratio": 0.5}
BAD_SECTION_ERRORS = [
    "qtuning.sample_keep_ratio: Input should be less than or equal to 1",
    "qtuning.samples_keep_ratio: unknown key; the keys are enabled, sample_keep_ratio,",
]


@pytest.mark.parametrize("plugins_line", [True, False], ids=["plugins-line", "no-plugins-line"])
def test_bad_qtuning_section_fails_before_model_load(tmp_path, plugins_line):
    missing_model = tmp_path / "no-such-model"  # reaching the model loader would fail differently
    overrides = {} if plugins_line else {"plugins": None}
    config = tiny_config(tmp_path, missing_model, steps=STEPS, qtuning=BAD_SECTION, **overrides)
    run = run_axolotl_train(config, timeout=300)
    assert run.returncode != 0
    if not plugins_line and not LOADS_ENTRY_POINTS:
        # 0.19 without the line would ignore `qtuning:`: the run stops, naming the lines to add
        assert MISSING_PLUGIN in run.output and "plugins:\n  - qtuning_plugin.QTuningPlugin\n" in run.output, run.tail()
    else:
        assert "ValidationError" in run.output, run.tail()
        for error in BAD_SECTION_ERRORS:
            assert error in run.output, (error, run.tail())
    # it stopped in config validation: no plugin pre_model_load, no model loader, no mention of the model path
    assert "Q-Tuning is active" not in run.output
    assert "axolotl.loaders" not in run.output
    assert str(missing_model) not in run.output


def test_plugins_entry_that_cannot_be_imported(tmp_path):
    """Both releases stop before the model loads: 0.21 on the name; 0.19 logs it and goes on, without
    the plugin, and then stops on the `qtuning:` section it would ignore."""
    missing_model = tmp_path / "no-such-model"
    config = tiny_config(tmp_path, missing_model, steps=STEPS, plugins=["qtuning_plugin_not_installed.QTuningPlugin"])
    run = run_axolotl_train(config, timeout=300)
    assert run.returncode != 0
    assert "No module named 'qtuning_plugin_not_installed'" in run.output, run.tail()
    if LOADS_ENTRY_POINTS:
        assert "Could not load required plugin 'qtuning_plugin_not_installed.QTuningPlugin'" in run.output
    else:
        assert "Failed to load plugin: qtuning_plugin_not_installed.QTuningPlugin" in run.output
        assert MISSING_PLUGIN in run.output and "  - qtuning_plugin.QTuningPlugin\n" in run.output, run.tail()
    assert str(missing_model) not in run.output, run.tail()
