"""Private file helpers: atomic writes and JSON reading that fails in one line.

Atomic write: the bytes go to a temporary file in the same folder (same file system, so the
rename is atomic), which is flushed and fsynced, made world-readable (``mkstemp`` creates
0600), then renamed over the target and the folder fsynced. A crash at any moment leaves the
old file or the new one, never a mix; an exception removes the temporary file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "read_json",
           "fsync_dir", "fsync_file"]


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """fsync a folder (makes a rename in it durable); a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any, *, indent: int | None = 2) -> Path:
    """:func:`atomic_write_text` of ``data`` as JSON (a trailing newline)."""
    return atomic_write_text(path, json.dumps(data, indent=indent) + "\n")


def read_json(path: str | Path, what: str) -> Any:
    """The JSON value in ``path``; ``what`` names the file in errors ("run config", ...).

    Raises ``FileNotFoundError`` when the file is missing and ``ValueError`` (one line, naming
    the file and the position) when it is not readable UTF-8 JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {str(path)!r} is not UTF-8 text ({e.reason} at byte "
                         f"{e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON: {e.msg} at line {e.lineno} "
                         f"column {e.colno}") from None
