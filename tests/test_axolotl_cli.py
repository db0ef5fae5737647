"""`axolotl qtuning analyze` and `select`: the one-line errors that need no model. The end-to-end
runs on the tiny example are in `integration_tests/test_axolotl_analyze.py`."""

import pytest
from click.testing import CliRunner

from qtuning_plugin.axolotl.cli import qtuning

pytestmark = pytest.mark.axolotl


def _one_line_error(result, code):
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    return lines[-1]


def test_a_missing_config_file_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(qtuning, ["analyze", str(tmp_path / "nope.yml")])
    assert "does not exist" in _one_line_error(result, 2)


def test_a_config_without_a_qtuning_section_is_an_error(tmp_path):
    config = tmp_path / "plain.yml"
    config.write_text("base_model: some/model\nmicro_batch_size: 2\n")
    result = CliRunner().invoke(qtuning, ["analyze", str(config)])
    line = _one_line_error(result, 1)
    assert line.startswith("Error: ") and "has no `qtuning:` section" in line


@pytest.mark.parametrize(
    "setting, message",
    [
        ("sample_keep_ratio: 2.0", "qtuning.sample_keep_ratio: Input should be less than or equal to 1"),
        ("sample_keep_rati: 0.3", "qtuning.sample_keep_rati: unknown key; the keys are enabled, sample_keep_ratio,"),
    ],
)
def test_an_invalid_qtuning_section_is_an_error_naming_the_key(tmp_path, setting, message):
    config = tmp_path / "bad.yml"
    config.write_text(f"base_model: some/model\nqtuning:\n  {setting}\n")
    line = _one_line_error(CliRunner().invoke(qtuning, ["analyze", str(config)]), 1)
    assert line.startswith("Error: invalid `qtuning:` section") and message in line, line


def test_max_samples_must_be_positive(tmp_path):
    config = tmp_path / "c.yml"
    config.write_text("qtuning: {}\n")
    result = CliRunner().invoke(qtuning, ["analyze", str(config), "--max-samples", "0"])
    assert result.exit_code == 2


def test_select_on_a_config_without_datasets_is_an_error_naming_the_key(tmp_path):
    config = tmp_path / "c.yml"
    config.write_text("base_model: some/model\nqtuning: {}\n")
    result = CliRunner().invoke(qtuning, ["select", str(config), "--out", str(tmp_path / "sel")])
    line = _one_line_error(result, 1)
    assert line.startswith("Error: ") and "has no `datasets:`" in line, line


def test_select_into_a_folder_that_is_not_empty_needs_overwrite(tmp_path):
    config = tmp_path / "c.yml"
    config.write_text("base_model: some/model\ndatasets:\n  - path: rows.jsonl\nqtuning: {}\n")
    out = tmp_path / "sel"
    out.mkdir()
    (out / "report.csv").write_text("index\n")
    result = CliRunner().invoke(qtuning, ["select", str(config), "--out", str(out)])
    line = _one_line_error(result, 1)
    assert line.startswith("Error: ") and "exists and is not empty" in line and "--overwrite" in line, line


def test_select_window_below_one_is_a_usage_error_naming_the_option(tmp_path):
    config = tmp_path / "c.yml"
    config.write_text("qtuning: {}\n")
    result = CliRunner().invoke(qtuning, ["select", str(config), "--out", str(tmp_path / "sel"), "--window", "0"])
    assert "Invalid value for '--window'" in _one_line_error(result, 2)
