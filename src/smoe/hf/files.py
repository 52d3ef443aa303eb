"""The files of a conversion: safetensors and JSON read with one-line errors, and an output
folder written atomically.

Every reader here turns what a damaged or foreign file raises (``SafetensorError``,
``JSONDecodeError``, ``OSError``, a ``KeyError`` on a missing field) into one ``ValueError``
that names the file and the problem, because a converter's user can fix a file but not read a
traceback. :func:`read_safetensors` is the one to use wherever smoe loads a safetensors file a
user handed it (a run's checkpoint included).

Writes: :func:`begin_output` makes a temporary folder beside ``out_dir``; :func:`finish_output`
fsyncs it and renames it into place; :func:`abandon_output` removes it (and the parent folders
``begin_output`` created), so a failed command leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from smoe._io import open_safetensors, read_safetensors  # noqa: F401 (re-exported)

__all__ = ["read_json", "read_safetensors", "open_safetensors", "check_output",
           "begin_output", "finish_output", "abandon_output", "write_error", "write_safetensors",
           "HFTensors"]


# -- reading ----------------------------------------------------------------------------------
def read_json(path: Path, what: str = "file") -> dict[str, Any]:
    """The JSON object in ``path``; ``ValueError`` naming the file if it is unreadable, not
    JSON, or not an object."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{str(path)!r} is not a UTF-8 text {what}: {e.reason}") from None
    except OSError as e:
        raise ValueError(f"{str(path)!r} cannot be read: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e.msg} at line {e.lineno} "
                         f"column {e.colno}): fix or replace the {what}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} holds a JSON {type(data).__name__}, not an object: "
                         f"not a {what}")
    return data


class HFTensors:
    """The tensors of an HF folder (``model.safetensors``, or shards listed by
    ``model.safetensors.index.json``), read lazily. Every file is opened (so checked) first:
    a damaged shard, an index naming a missing file, or an index listing tensors its files do
    not hold is a ``ValueError`` naming the file before anything is converted."""

    def __init__(self, hf_dir: Path) -> None:
        index = hf_dir / "model.safetensors.index.json"
        single = hf_dir / "model.safetensors"
        if index.is_file():
            data = read_json(index, "safetensors index")
            weight_map = data.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map or not all(
                    isinstance(v, str) for v in weight_map.values()):
                raise ValueError(f"{str(index)!r} has no weight_map of tensor names to shard "
                                 "files: fix or remove the index")
            files = sorted(set(weight_map.values()))
            absent = [f for f in files if not (hf_dir / f).is_file()]
            if absent:
                raise ValueError(f"{str(index)!r} names shard(s) that are not in the folder: "
                                 f"{', '.join(absent[:4])}{' ...' if len(absent) > 4 else ''}")
        elif single.is_file():
            files, weight_map = ["model.safetensors"], None
        else:
            pickles = sorted(p.name for pat in ("*.bin", "*.pt", "*.pth", "*.ckpt")
                             for p in hf_dir.glob(pat))
            extra = (f" (found {', '.join(pickles[:3])}: smoe never reads pickle checkpoints; "
                     "convert them to safetensors first)") if pickles else ""
            raise FileNotFoundError(f"{str(hf_dir)!r} has no model.safetensors or "
                                    f"model.safetensors.index.json{extra}")
        self._handles = {}
        self._where: dict[str, str] = {}
        for name in files:
            h = open_safetensors(hf_dir / name)
            self._handles[name] = h
            for key in h.keys():
                self._where[key] = name
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self._where))
            if missing:
                raise ValueError(f"{str(index)!r} lists tensors its shards do not hold: "
                                 f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        self.keys = frozenset(self._where)
        self.hf_dir = hf_dir

    def get(self, key: str) -> torch.Tensor:
        name = self._where[key]
        try:
            return self._handles[name].get_tensor(key)
        except Exception as e:
            raise ValueError(f"{str(self.hf_dir / name)!r}: tensor {key!r} cannot be read "
                             f"({e})") from None

    def dtypes(self) -> dict[torch.dtype, int]:
        """Bytes per floating dtype over all tensors (read from the headers, no data)."""
        out: dict[torch.dtype, int] = {}
        for key in self.keys:
            t = self._handles[self._where[key]].get_slice(key)
            dtype = _ST_DTYPES.get(t.get_dtype())
            if dtype is not None:
                n = 1
                for s in t.get_shape():
                    n *= s
                out[dtype] = out.get(dtype, 0) + n * torch.empty((), dtype=dtype).element_size()
        return out


#: safetensors' dtype names of the floating types smoe can hold.
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
              "F64": torch.float64}


# -- writing ----------------------------------------------------------------------------------
def check_output(out_dir: Path) -> None:
    """``out_dir`` must be missing or an empty folder, with no file in the way of its
    parents (checked first, and again at the end)."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{str(out_dir)!r} exists and is not a folder: choose another "
                                  "output folder")
        if any(out_dir.iterdir()):
            raise FileExistsError(f"{str(out_dir)!r} is not empty: nothing was written; choose a "
                                  "new or empty output folder")
        return
    for parent in out_dir.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise FileExistsError(f"{str(parent)!r} is a file, so {str(out_dir)!r} cannot "
                                      "be created: choose another output folder")
            break


def begin_output(out_dir: Path) -> tuple[Path, list[Path]]:
    """A fresh temporary folder beside ``out_dir`` (which must be missing or empty), and the
    parent folders created for it (removed by :func:`abandon_output`)."""
    check_output(out_dir)
    created = [p for p in reversed(out_dir.absolute().parents) if not p.exists()]
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as e:
        abandon_output(tmp, created)
        raise write_error(out_dir, e) from None
    return tmp, created


def write_error(out_dir: Path, e: OSError) -> ValueError:
    """The one-line error of a write that failed (no permission, disk full, ...)."""
    return ValueError(f"writing {str(out_dir)!r} failed ({e.strerror or e}): nothing was "
                      "written; free space or choose a folder you can write to")


def finish_output(tmp: Path, out_dir: Path) -> None:
    """fsync every file of ``tmp`` and rename it to ``out_dir``."""
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if out_dir.exists():
        try:
            out_dir.rmdir()
        except OSError:
            raise FileExistsError(f"{str(out_dir)!r} was filled while writing: nothing was "
                                  "written; choose a new or empty output folder") from None
    os.rename(tmp, out_dir)
    try:  # make the rename durable too
        fd = os.open(out_dir.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # some filesystems (and Windows) cannot fsync a folder


def abandon_output(tmp: Path, created: list[Path]) -> None:
    """Remove the temporary folder and the parents :func:`begin_output` created."""
    shutil.rmtree(tmp, ignore_errors=True)
    for parent in reversed(created):
        try:
            parent.rmdir()
        except OSError:
            break


def write_safetensors(items, tmp: Path, max_shard_bytes: int) -> tuple[list[str], int, int]:
    """Write (key, tensor) pairs as ``model.safetensors``, or as shards with an index above
    ``max_shard_bytes``. Returns (files, tensor count, bytes)."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = count = total = 0
    names: list[str] = []

    def flush() -> None:
        name = f"shard-{len(names):05d}.tmp"
        save_file(shards[-1], str(tmp / name), metadata={"format": "pt"})
        names.append(name)
        shards[-1] = {}

    weight_map: dict[str, int] = {}
    for key, value in items:
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        shards[-1][key] = value
        weight_map[key] = len(names)
        size += nbytes
        total += nbytes
        count += 1
    if shards[-1] or not names:
        flush()
    if len(names) == 1:
        os.rename(tmp / names[0], tmp / "model.safetensors")
        return ["model.safetensors"], count, total
    final = [f"model-{k + 1:05d}-of-{len(names):05d}.safetensors" for k in range(len(names))]
    for old, new in zip(names, final):
        os.rename(tmp / old, tmp / new)
    index = {"metadata": {"total_size": total},
             "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n",
                                                      encoding="utf-8")
    return final + ["model.safetensors.index.json"], count, total
