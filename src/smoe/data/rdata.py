"""Read R's lazy-load data bases (``data/Rdata.rdx`` + ``Rdata.rdb``) without R.

Just enough of R's serialization format (XDR, versions 2 and 3) to read the plain vectors that
data packages ship: character, logical, integer and double vectors, lists and pairlists, with
their ``names``. Anything else (environments, closures, ALTREP) raises ``ValueError``: this is a
reader for text data, not a general R unpickler.

The format: ``R Internals``, section 1.8 "Serialization formats", and ``src/main/serialize.c``.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from pathlib import Path
from typing import Any

__all__ = ["read_lazyload_db", "unserialize"]

# SEXP types (src/include/Rinternals.h) and the special codes of serialize.c.
_SYMSXP, _LISTSXP, _LANGSXP, _CHARSXP = 1, 2, 6, 9
_LGLSXP, _INTSXP, _REALSXP, _STRSXP, _VECSXP, _EXPRSXP = 10, 13, 14, 16, 19, 20
_REFSXP, _NILVALUE = 255, 254
_EMPTY_LIKE = {253, 252, 251, 250, 242, 241}  # globalenv, unbound, missing, base ns, envs
_NA_INTEGER = -(2**31)
_LATIN1, _UTF8, _ASCII = 1 << 2, 1 << 3, 1 << 6


class _Reader:
    """A cursor over one serialized R object."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("R serialized data ends early")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints
            upper, lower = self.int(), self.int()
            n = (upper << 32) + lower
        return n

    def header(self) -> None:
        if self.take(2) != b"X\n":
            raise ValueError("not R XDR serialized data (expected the 'X\\n' header)")
        version = self.int()
        self.int(), self.int()  # writer's and minimal reader's R versions
        if version == 3:
            self.take(self.int())  # native encoding name
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")

    def item(self) -> Any:
        flags = self.int()
        kind, levels = flags & 0xFF, flags >> 12
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind == _NILVALUE or kind in _EMPTY_LIKE:
            return None
        if kind == _REFSXP:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == _SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind in (_LISTSXP, _LANGSXP):
            return self._pairlist(has_attr, has_tag)
        if kind == _CHARSXP:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            raw = self.take(n)
            encoding = "latin-1" if levels & _LATIN1 else "utf-8"
            return raw.decode(encoding, errors="replace")
        if kind in (_LGLSXP, _INTSXP):
            n = self.length()
            values = struct.unpack(f">{n}i", self.take(4 * n))
            value: Any = [None if v == _NA_INTEGER else v for v in values]
            if kind == _LGLSXP:
                value = [None if v is None else bool(v) for v in value]
        elif kind == _REALSXP:
            n = self.length()
            value = list(struct.unpack(f">{n}d", self.take(8 * n)))
        elif kind == _STRSXP:
            value = [self.item() for _ in range(self.length())]
        elif kind in (_VECSXP, _EXPRSXP):
            value = [self.item() for _ in range(self.length())]
        else:
            raise ValueError(f"unsupported R object type {kind} (only plain vectors are read)")
        if has_attr:
            names = dict(self.item() or []).get("names")
            if names is not None and kind in (_VECSXP, _EXPRSXP):
                return dict(zip(names, value))
        return value

    def _pairlist(self, has_attr: bool, has_tag: bool) -> list[tuple[Any, Any]]:
        """A pairlist as ``[(tag, value), ...]``, read iteratively along its CDR chain."""
        out: list[tuple[Any, Any]] = []
        while True:
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            out.append((tag, self.item()))
            flags = self.int()
            kind = flags & 0xFF
            if kind != _LISTSXP:
                self.pos -= 4
                if self.item() is not None:
                    raise ValueError("dotted pairlists are not supported")
                return out
            has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))


def unserialize(data: bytes) -> Any:
    """One R object from XDR serialized bytes (as written by ``serialize()``/``saveRDS``)."""
    reader = _Reader(data)
    reader.header()
    return reader.item()


def _decompress_entry(blob: bytes, compressed: int) -> bytes:
    """One lazy-load entry: a 4-byte big-endian length, then the compressed payload."""
    size = struct.unpack(">I", blob[:4])[0]
    if compressed in (0, False):
        return blob[4:]
    if compressed in (1, True):
        out = zlib.decompress(blob[4:])
    else:  # compressed == 2 or 3: a type byte, then bzip2 / xz / stored bytes
        method, payload = blob[4:5], blob[5:]
        if method == b"2":
            out = bz2.decompress(payload)
        elif method == b"Z":
            out = lzma.decompress(payload)
        elif method == b"0":
            out = payload
        else:
            raise ValueError(f"unknown lazy-load compression type {method!r}")
    if len(out) != size:
        raise ValueError("lazy-load entry has the wrong length after decompression")
    return out


def read_lazyload_db(prefix: str | Path) -> dict[str, Any]:
    """All variables of a lazy-load data base, given its path without ``.rdx``/``.rdb``.

    For an installed R data package that is ``<library>/<package>/data/Rdata``.
    """
    prefix = Path(prefix)
    rdx, rdb = prefix.with_suffix(".rdx"), prefix.with_suffix(".rdb")
    for path in (rdx, rdb):
        if not path.is_file():
            raise FileNotFoundError(f"R lazy-load data base file {path} does not exist")
    raw_index = rdx.read_bytes()
    if raw_index[:2] == b"\x1f\x8b":
        raw_index = gzip.decompress(raw_index)
    index = unserialize(raw_index)
    if not isinstance(index, dict) or "variables" not in index:
        raise ValueError(f"{rdx} is not a lazy-load index (no 'variables')")
    compressed = (index.get("compressed") or [True])[0]
    variables = index["variables"] or {}
    blob = rdb.read_bytes()
    out: dict[str, Any] = {}
    for name, (offset, size) in variables.items():
        out[name] = unserialize(_decompress_entry(blob[offset : offset + size], compressed))
    return out
