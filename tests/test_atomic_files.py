"""`qtuning_plugin.atomic_files`: whole files or the old ones, and JSON Lines cut only at a line."""

import json
import os

import pytest

from qtuning_plugin.atomic_files import JsonlError, append_jsonl, atomic_write, read_jsonl, write_json, write_text


def listing(folder):
    return sorted(os.listdir(folder))


def test_a_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")
    write_json(str(path), {"a": [1, 2]}, indent=1)
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert listing(tmp_path) == ["state.json"]


@pytest.mark.parametrize("mode", ["w", "wb"])
def test_a_failure_mid_write_leaves_the_old_file_and_no_temporary_file(tmp_path, mode):
    path = tmp_path / "plot.png"
    path.write_bytes(b"old content")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_write(str(path), mode) as handle:
            handle.write("new, half" if mode == "w" else b"new, half")
            handle.flush()
            assert len(listing(tmp_path)) == 2  # the temporary file, next to the target
            raise RuntimeError("killed")
    assert path.read_bytes() == b"old content"
    assert listing(tmp_path) == ["plot.png"]


def test_a_failed_sync_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    path.write_text("{}")

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        write_text(str(path), '{"new": true}')
    assert path.read_text() == "{}" and listing(tmp_path) == ["summary.json"]


def test_the_content_is_synced_before_the_rename(tmp_path, monkeypatch):
    """A rename before the data reaches the disk can leave an empty file after a power cut."""
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("replace") or replace(a, b))
    write_text(str(tmp_path / "a.txt"), "text")
    assert events[:2] == ["fsync", "replace"]


def test_a_new_file_gets_the_permissions_open_would_give(tmp_path):
    with open(tmp_path / "by_open", "w") as handle:
        handle.write("x")
    write_text(str(tmp_path / "atomic"), "x")
    assert os.stat(tmp_path / "atomic").st_mode == os.stat(tmp_path / "by_open").st_mode


def test_csv_newlines_pass_through(tmp_path):
    with atomic_write(str(tmp_path / "rows.csv"), newline="") as handle:
        handle.write("a,b\r\n1,2\r\n")
    assert (tmp_path / "rows.csv").read_bytes() == b"a,b\r\n1,2\r\n"


def test_a_figure_that_fails_to_save_leaves_the_old_png(tmp_path):
    pytest.importorskip("matplotlib")
    from qtuning_plugin.plots import save_figure

    class BrokenFigure:
        def savefig(self, target, **kwargs):
            handle = open(target, "wb") if isinstance(target, str) else target
            handle.write(b"\x89PNG half")
            handle.flush()
            raise MemoryError

    path = tmp_path / "qtuning_eu_plane.png"
    path.write_bytes(b"old png")
    with pytest.raises(MemoryError):
        save_figure(BrokenFigure(), str(path))
    assert path.read_bytes() == b"old png" and listing(tmp_path) == ["qtuning_eu_plane.png"]


# ------------------------------------------------------------------ JSON Lines
RECORDS = [{"step": 1, "ppl": 2.5}, {"step": 2, "quadrant": "Q2"}, {"step": 3, "note": "é"}]


def test_appended_records_read_back_in_order(tmp_path):
    path = str(tmp_path / "samples.jsonl")
    for record in RECORDS:
        append_jsonl(path, record)
    assert read_jsonl(path) == RECORDS
    assert open(path, "rb").read().count(b"\n") == 3


def test_several_records_of_one_append_are_one_line_each(tmp_path, monkeypatch):
    path = str(tmp_path / "samples.jsonl")
    append_jsonl(path, RECORDS[0])
    writes = []
    write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(data) or write(fd, data))
    append_jsonl(path, *RECORDS[1:])
    assert len(writes) == 1 and writes[0].count(b"\n") == 2  # one write of whole lines
    assert read_jsonl(path) == RECORDS


@pytest.mark.parametrize("cut", [1, 5, 12])
def test_a_cut_last_line_is_dropped_and_removed_by_the_next_append(tmp_path, cut):
    path = tmp_path / "samples.jsonl"
    for record in RECORDS:
        append_jsonl(str(path), record)
    data = path.read_bytes()
    path.write_bytes(data[:-cut])  # a kill inside the last write
    assert read_jsonl(str(path)) == RECORDS[:2]
    append_jsonl(str(path), {"step": 4})
    assert read_jsonl(str(path)) == [*RECORDS[:2], {"step": 4}]
    assert path.read_bytes().endswith(b'{"step": 4}\n')


def test_a_file_whose_only_line_is_cut_reads_empty_and_is_restarted(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_bytes(b'{"step": 1, "pp')
    assert read_jsonl(str(path)) == []
    append_jsonl(str(path), {"step": 1})
    assert path.read_bytes() == b'{"step": 1}\n'


def test_a_cut_line_longer_than_a_read_block_is_removed_whole(tmp_path):
    path = tmp_path / "samples.jsonl"
    append_jsonl(str(path), {"step": 1})
    with open(path, "ab") as handle:
        handle.write(b'{"text": "' + b"x" * 200_000)
    append_jsonl(str(path), {"step": 2})
    assert read_jsonl(str(path)) == [{"step": 1}, {"step": 2}]


def test_a_broken_middle_line_is_an_error_naming_the_file_and_line(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2, "pp\n{"step": 3}\n')
    with pytest.raises(JsonlError, match=r"samples\.jsonl, line 2 of 3: not JSON"):
        read_jsonl(str(path))


def test_an_empty_file_has_no_records(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert read_jsonl(str(tmp_path / "empty.jsonl")) == []
