"""`axolotl qtuning examples DIR`: the shipped configs, written with paths that work from anywhere,
and the shipped SmolLM2 datasets. (The same from an installed wheel: `integration_tests/test_wheel_install.py`.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from qtuning_plugin.example_files import dataset_path, example_configs, write_examples

REPO = Path(__file__).resolve().parents[1]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}


def repo_examples() -> list[Path]:
    """The repository's example configs (not the model folders built next to them)."""
    return sorted([*(REPO / "examples").glob("*.yml"), *(REPO / "examples").glob("*.yaml")])


def test_the_package_ships_the_repository_examples():
    """One home: the package's examples are the repository's examples/*.yml and *.yaml themselves."""
    shipped = {path.name: path.read_bytes() for path in example_configs()}
    assert shipped == {path.name: path.read_bytes() for path in repo_examples()}
    assert {"smollm2-135m-qtuning.yml", "tiny-cpu-qtuning.yml", "llama3-qtuning.yml"} <= set(shipped)
    assert "llamafactory-qtuning.yaml" in shipped


# Words for a clone of the repository, wrong in a copy written by `axolotl qtuning examples DIR`.
CLONE_ONLY = ("repository root", "repo root", "make demo", "relative to the repo")


@pytest.mark.parametrize("config", repo_examples(), ids=lambda path: path.name)
def test_each_example_says_how_to_get_and_run_it_and_nothing_only_a_clone_has(config, tmp_path):
    (written,) = write_examples(tmp_path, config.name)
    text = written.read_text(encoding="utf-8")
    header = text[: text.index("\n\n")]  # the opening comment block
    runner = "qtuning-llamafactory train" if config.suffix == ".yaml" else "axolotl train"
    writer = "qtuning-llamafactory examples DIR" if config.suffix == ".yaml" else "axolotl qtuning examples DIR"
    assert writer in header and f"{runner} DIR/{config.name}" in header, header
    assert header.index(writer) < header.index(f"{runner} DIR/{config.name}")
    lowered = text.lower()
    assert not [words for words in CLONE_ONLY if words in lowered], text


def local_paths(cfg: dict) -> list[str]:
    """The dataset paths of a config that name files (not hub datasets)."""
    entries = cfg.get("datasets", []) + (cfg.get("test_datasets") or [])
    return [entry["path"] for entry in entries if entry["path"].endswith(".jsonl")]


def test_written_examples_point_at_the_model_folder_beside_them_and_the_shipped_data(tmp_path):
    target = tmp_path / "my examples"
    written = write_examples(target)
    assert sorted(path.name for path in written) == sorted(path.name for path in example_configs())
    configs = {path.name: yaml.safe_load(path.read_text(encoding="utf-8")) for path in written}

    smol = configs["smollm2-135m-qtuning.yml"]
    assert smol["base_model"] == str(target / "smollm2-135m-instruct")
    shipped = [str(dataset_path(name)) for name in ("smollm2_instruct.jsonl", "smollm2_instruct_eval.jsonl")]
    assert local_paths(smol) == shipped
    tiny = configs["tiny-cpu-qtuning.yml"]
    assert tiny["base_model"] == str(target / "tiny-model")
    assert local_paths(tiny) == [str(dataset_path("tiny_instruct.jsonl"))]
    for name, cfg in configs.items():
        for path in local_paths(cfg):
            assert Path(path).is_absolute() and Path(path).is_file(), (name, path)
    # the commands quoted in the comments name the same folder
    text = (target / "smollm2-135m-qtuning.yml").read_text(encoding="utf-8")
    assert f"qtuning-fetch-smollm2 {target}/smollm2-135m-instruct" in text
    for path in written:
        assert "examples/" not in path.read_text(encoding="utf-8").replace(f"{target}/", ""), path.name


def test_qtuning_llamafactory_examples_writes_the_llamafactory_config_only(tmp_path):
    """Without LLaMA-Factory (or Axolotl) installed: it only writes a file."""
    proc = subprocess.run(
        [sys.executable, "-m", "qtuning_plugin.llamafactory", "examples", str(tmp_path / "ex")],
        env={**os.environ, **OFFLINE_ENV}, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == f"wrote {tmp_path / 'ex' / 'llamafactory-qtuning.yaml'}\n"
    written = yaml.safe_load((tmp_path / "ex" / "llamafactory-qtuning.yaml").read_text(encoding="utf-8"))
    assert written["stage"] == "sft" and written["qtuning"]["sample_keep_ratio"] == 0.25
    assert sorted(path.name for path in (tmp_path / "ex").iterdir()) == ["llamafactory-qtuning.yaml"]


@pytest.mark.axolotl
def test_axolotl_qtuning_examples_writes_them(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "axolotl.cli.main", "qtuning", "examples", str(tmp_path / "ex")],
        env={**os.environ, **OFFLINE_ENV},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for config in example_configs():
        assert f"wrote {tmp_path / 'ex' / config.name}" in proc.stdout
        assert (tmp_path / "ex" / config.name).is_file()


def read_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in dataset_path(name).read_text(encoding="utf-8").splitlines()]


def test_smollm2_datasets_are_single_turn_chats_with_a_quarter_of_bad_answers():
    train, held_out = read_rows("smollm2_instruct.jsonl"), read_rows("smollm2_instruct_eval.jsonl")
    assert (len(train), len(held_out)) == (480, 24)
    for row in train + held_out:
        assert [message["role"] for message in row["messages"]] == ["user", "assistant"]
        assert all(message["content"].strip() for message in row["messages"])
    questions = [row["messages"][0]["content"] for row in train]
    assert len(set(questions)) == len(questions)
    assert not set(questions) & {row["messages"][0]["content"] for row in held_out}  # held out
    assert {row["answer"] for row in held_out} == {"correct"}
    answers = Counter(row["answer"] for row in train)
    assert 0.2 <= (answers["wrong"] + answers["off_topic"]) / len(train) <= 0.3, answers
    assert Counter(row["task"] for row in train).keys() == {"arithmetic", "facts", "rewrite"}


def test_smollm2_arithmetic_answers_are_right_unless_marked_wrong():
    """The worked arithmetic in each reply ("a + b = c", "a x b = c", ...) checked by hand-rolled eval."""
    import re

    checked = Counter()
    for row in read_rows("smollm2_instruct.jsonl") + read_rows("smollm2_instruct_eval.jsonl"):
        if row["task"] != "arithmetic" or row["answer"] == "off_topic":
            continue
        reply = row["messages"][1]["content"]
        sums = re.findall(r"(\d+) ([-+x/]) (\d+) = (\d+)", reply)
        right = all({"+": a + b, "-": a - b, "x": a * b, "/": a / b}[op] == c
                    for a, op, b, c in ((int(a), op, int(b), int(c)) for a, op, b, c in sums))
        if sums:
            checked[row["answer"], right] += 1
    assert checked[("correct", False)] == 0, checked
    assert checked[("correct", True)] > 100 and checked[("wrong", True)] < checked[("wrong", False)], checked
