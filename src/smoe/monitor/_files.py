"""Atomic writes for the monitor's files (references, reports).

Uses ``smoe._io`` (the project's one atomic-write module) when it exists; the fallback below is
the same recipe (temporary file in the same folder, fsync, rename) for trees that predate it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes"]

try:
    from smoe._io import atomic_write_bytes
except ImportError:  # pragma: no cover - depends on the branch this is merged with
    def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
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
        return path
