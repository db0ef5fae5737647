"""QTuningConfig: defaults, ranges and unknown keys."""

import pytest
from pydantic import ValidationError

from qtuning_plugin import QTuningConfig

pytestmark = pytest.mark.env_independent  # pydantic and Python only: `make test` only


def test_paper_defaults():
    config = QTuningConfig()
    assert config.enabled
    assert (config.sample_keep_ratio, config.token_keep_ratio, config.context_weight) == (0.25, 0.5, 0.5)
    assert (config.max_bisect_iters, config.bisect_tolerance) == (10, 0.01)
    assert (config.scoring, config.backend, config.warmup_steps) == ("auto", "auto", 0)
    assert not config.log_decisions
    assert (config.triage_window, config.hold_budget, config.holds_budget) == (1, None, False)


@pytest.mark.parametrize(
    "key, value",
    [
        ("sample_keep_ratio", 0.0),
        ("sample_keep_ratio", 1.01),
        ("token_keep_ratio", -0.1),
        ("token_keep_ratio", 2),
        ("context_weight", 1.5),
        ("context_weight", -0.01),
        ("max_bisect_iters", 0),
        ("bisect_tolerance", 0.0),
        ("warmup_steps", -1),
        ("chunk_size", 0),
        ("triage_window", 0),
        ("triage_window", -3),
        ("hold_budget", "sometimes"),
        ("scoring", "three_pass"),
        ("backend", "cuda"),
        ("sample_keep_ratio", "a quarter"),
        ("log_decisions", "every step"),
    ],
)
def test_out_of_range_values_name_the_key(key, value):
    with pytest.raises(ValidationError) as error:
        QTuningConfig(**{key: value})
    assert key in str(error.value)


@pytest.mark.parametrize("key, value", [("sample_keep_ratio", 1.0), ("token_keep_ratio", 1.0), ("context_weight", 0.0)])
def test_range_ends_that_are_allowed(key, value):
    assert getattr(QTuningConfig(**{key: value}), key) == value


def test_unknown_key_is_rejected():
    with pytest.raises(ValidationError, match="samples_keep_ratio"):
        QTuningConfig.model_validate({"samples_keep_ratio": 0.5})


def test_describe_lists_every_setting():
    line = QTuningConfig(sample_keep_ratio=0.125).describe()
    assert "sample_keep_ratio=0.125" in line and "token_keep_ratio=0.5" in line


@pytest.mark.parametrize("scope, expected", [("step", 2 * 8 * 4), ("micro_batch", 2 * 4)])
def test_triage_batch_size(scope, expected):
    """micro_batch_size 2, gradient_accumulation_steps 8, 4 ranks: the step scope triages all 64."""
    assert QTuningConfig(triage_scope=scope).triage_batch_size(2, 8, 4) == expected


# Every key of the `qtuning:` section, in the order of the schema, written out here.
KEYS = (
    "enabled, sample_keep_ratio, token_keep_ratio, context_weight, prune_highest_scores, max_bisect_iters, "
    "bisect_tolerance, triage_window, hold_budget, triage_scope, scoring, warmup_steps, backend, chunk_size, scoring_batch_tokens, "
    "plot_every_n_steps, log_decisions"
)


def test_a_section_is_validated_with_one_line_per_problem_naming_the_key():
    """`validate_section`: what both Axolotl and LLaMA-Factory report for a bad `qtuning:` section."""
    from qtuning_plugin.config import validate_section
    from qtuning_plugin.rules import QTuningSettingsError

    assert validate_section(None) == QTuningConfig()  # an empty section: every default
    with pytest.raises(QTuningSettingsError) as info:
        validate_section({"sample_keep_rati": 0.3, "token_keep_ratio": 2})
    assert str(info.value).splitlines() == [
        "qtuning.token_keep_ratio: Input should be less than or equal to 1",
        f"qtuning.sample_keep_rati: unknown key; the keys are {KEYS}",
    ]
    with pytest.raises(QTuningSettingsError, match=r"^qtuning: expected a mapping of settings \(key: value\), got 0\.5$"):
        validate_section(0.5)


def test_a_window_below_one_step_is_refused_naming_the_key_and_its_range():
    from qtuning_plugin.config import validate_section
    from qtuning_plugin.rules import QTuningSettingsError

    with pytest.raises(QTuningSettingsError) as info:
        validate_section({"triage_window": 0})
    assert str(info.value) == "qtuning.triage_window: Input should be greater than or equal to 1"


@pytest.mark.parametrize(
    "section, holds", [({}, False), ({"triage_window": 4}, True), ({"hold_budget": True}, True),
                       ({"triage_window": 2, "hold_budget": True}, True), ({"hold_budget": False}, False)],
)
def test_a_window_holds_the_budget_and_one_step_follows_hold_budget(section, holds):
    config = QTuningConfig(**section)
    assert config.holds_budget is holds
    assert QTuningConfig.model_validate(config.model_dump()) == config  # how the trainer mixin takes it


@pytest.mark.parametrize(
    "section, message",
    [
        ({"triage_window": 4, "triage_scope": "micro_batch"}, "qtuning.triage_window: 4 pools the samples of whole"),
        ({"triage_window": 2, "hold_budget": False}, "qtuning.hold_budget: false keeps every sample"),
    ],
)
def test_a_window_refuses_micro_batch_scope_and_an_unheld_budget(section, message):
    from qtuning_plugin.config import validate_section
    from qtuning_plugin.rules import QTuningSettingsError

    with pytest.raises(QTuningSettingsError, match=message):
        validate_section(section)
