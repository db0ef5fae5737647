"""QTuningConfig: defaults, ranges and unknown keys."""

import pytest
from pydantic import ValidationError

from qtuning_plugin import QTuningConfig


def test_paper_defaults():
    config = QTuningConfig()
    assert config.enabled
    assert (config.sample_keep_ratio, config.token_keep_ratio, config.context_weight) == (0.25, 0.5, 0.5)
    assert (config.max_bisect_iters, config.bisect_tolerance) == (10, 0.01)
    assert (config.scoring, config.backend, config.warmup_steps) == ("auto", "auto", 0)


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
        ("scoring", "three_pass"),
        ("backend", "cuda"),
        ("sample_keep_ratio", "a quarter"),
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
