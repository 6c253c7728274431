"""Small file helpers shared by the run-folder readers and writers; imports nothing of the package."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_writer(
    path: str | os.PathLike,
    mode: str = "w",
    newline: str | None = None,
    durable: bool = False,
    remove_stale: bool = False,
) -> Iterator[IO]:
    """Open ``.<name>.<pid>.tmp`` beside ``path`` for writing; on success it is renamed to ``path``.

    Readers see the old file or the whole new one, never half of it. On an error the temporary file is
    removed and ``path`` is left as it was. ``mode`` is ``"w"`` (text) or ``"wb"``. ``durable``: the file
    and the rename are synced to disk before returning. ``remove_stale``: first remove the temporary files
    that killed writers of ``path`` left (only where one process writes ``path``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp") if remove_stale else ():
        stale.unlink(missing_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, mode, newline=newline) as handle:
            yield handle
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    if durable:
        _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    with suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def write_json(path: str | os.PathLike, content: Any, indent: int | None = 1) -> None:
    """Write ``content`` as JSON (and a final newline) to ``path`` through :func:`atomic_writer`."""
    with atomic_writer(path) as handle:
        json.dump(content, handle, indent=indent)
        handle.write("\n")


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; empty when the file is missing, unreadable or not an object."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file with a header, as text (``""`` for blank cells); none when it is missing or
    unreadable."""
    try:
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def to_float(value: Any) -> float | None:
    """``float(value)``, or None for what is not a number (blanks, None, text)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def is_number(value: Any) -> bool:
    """Whether a JSON value is a number (``true``/``false`` are not)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def format_duration(seconds: float) -> str:
    """``5 s``, ``3 min 05 s`` or ``1 h 02 min``."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
