"""`qtuning-build-tiny` without its optional dependencies: a clear message, and no folder left behind."""

import importlib.util

import pytest

from qtuning_plugin import tiny


def test_build_tiny_without_tokenizers_says_what_to_install_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tokenizers" else find_spec(name, *a))
    target = tmp_path / "tiny-model"
    with pytest.raises(SystemExit) as exit_info:
        tiny.main([str(target)])
    assert exit_info.value.code == 1
    assert "needs tokenizers: pip install 'qtuning-plugin[hf]'" in capsys.readouterr().err
    assert not target.exists()
