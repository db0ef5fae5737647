"""Files that a killed process never leaves half-written.

Every file the plugin writes goes through here:

* `atomic_write` (and `write_text`, `write_json`): the content goes to a temporary file in the
  target's folder, is flushed and synced to disk, then renamed over the target (`os.replace`,
  atomic on POSIX and Windows). A kill at any moment leaves the old file or the new one, never
  a mix; a failure while writing removes the temporary file and leaves the old file as it was.
* `append_jsonl` and `read_jsonl`: a JSON Lines log grown a few records at a time. The records of
  one call are one ``write`` of whole lines, synced to disk, so that a kill can cut at most the last line;
  `read_jsonl` drops such a cut line (one without its newline), and the next `append_jsonl`
  removes it before appending. A line that ends in a newline but is not JSON cannot come from a
  kill: reading it raises `JsonlError` naming the file and the line.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from typing import IO, Any, Iterator, Optional


@contextlib.contextmanager
def atomic_write(
    path: str, mode: str = "w", *, encoding: Optional[str] = "utf-8", newline: Optional[str] = None
) -> Iterator[IO]:
    """Open a temporary file next to ``path`` for writing (``mode`` ``"w"`` or ``"wb"``); when the
    block ends without an exception, sync it and rename it to ``path``.

    The temporary file is ``.NAME.<random>.tmp`` in the same folder (a rename across file systems
    would not be atomic), made with the permissions `open` would give ``path``.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    folder, name = os.path.split(os.path.abspath(path))
    temp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        if mode == "wb":
            handle = os.fdopen(fd, "wb")
        else:
            handle = os.fdopen(fd, "w", encoding=encoding, newline=newline)
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _sync_folder(folder)


def _sync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (where the platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: str, text: str) -> str:
    """``text`` into ``path`` (UTF-8), atomically; returns ``path``."""
    with atomic_write(path) as handle:
        handle.write(text)
    return path


def write_json(path: str, obj: Any, **dump_kwargs: Any) -> str:
    """``json.dump(obj, **dump_kwargs)`` into ``path``, atomically; returns ``path``."""
    with atomic_write(path) as handle:
        json.dump(obj, handle, **dump_kwargs)
    return path


# ------------------------------------------------------------------ JSON Lines
class JsonlError(ValueError):
    """A JSON Lines file with a complete line that is not JSON (not something a kill leaves)."""


def append_jsonl(path: str, *records: Any) -> None:
    """Append each of ``records`` to ``path`` as one JSON line: a single write of the whole lines, synced.

    A line cut short by an earlier kill (the file not ending in a newline) is removed first, so
    that it never ends up in the middle of the file.
    """
    lines = "".join(json.dumps(record) + "\n" for record in records).encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            os.ftruncate(fd, _complete_length(fd, size))
        written = os.write(fd, lines)
        while written < len(lines):  # only on a full disk or a signal; the reader drops a cut line
            written += os.write(fd, lines[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


def _complete_length(fd: int, size: int) -> int:
    """The length of the file's complete lines: up to and with its last newline (0 if none)."""
    end = size
    while end > 0:
        start = max(0, end - 65536)
        block = os.pread(fd, end - start, start)
        cut = block.rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        end = start
    return 0


def read_jsonl(path: str) -> list[Any]:
    """The records of a JSON Lines file, in order, without a last line cut short (one without its
    newline, which `append_jsonl` never leaves complete).

    Raises:
        JsonlError: a complete line is not JSON (naming the file and the line number).
    """
    with open(path, "rb") as handle:
        data = handle.read()
    lines = data.split(b"\n")[:-1]  # the part after the last newline is empty, or a cut line
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except ValueError as error:  # UnicodeDecodeError included
            raise JsonlError(f"{path}, line {number} of {len(lines)}: not JSON ({error})") from None
    return records
