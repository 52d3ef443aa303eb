"""Checkpoints: safetensors for tensors, JSON for everything else, swapped in atomically, the
last few kept, each verified before it is used.

Layout in a run folder::

    checkpoint/                       the latest checkpoint
        model.safetensors             the model's state dict (parameters, persistent buffers)
        optimizer.safetensors         the optimizer's per-parameter tensors, "<param name>/<key>"
        state.json                    step, configs, optimizer hyperparameters, RNG states, the
                                      data batcher's position, the schedule
    previous-checkpoints/
        step-000400/ ...              older checkpoints, newest kept (``keep`` in all)

Writing (:func:`save_checkpoint`): everything goes into ``checkpoint.tmp-<pid>``, each file and
the folder are fsynced; then ``checkpoint`` is renamed to ``previous-checkpoints/step-N`` and
the new folder to ``checkpoint``; then the oldest previous ones beyond ``keep`` are removed. A
crash at any moment leaves a complete checkpoint under one of these names.

Reading (:func:`checkpoint_dir`): every candidate (``checkpoint``, ``previous-checkpoints/*``
and ``checkpoint.old`` of runs written before) is verified without loading its tensors: the
three files exist, ``state.json`` is an smoe checkpoint state, and each safetensors file's
header parses and its size is exactly what the header says (a truncated or empty file fails).
The newest sound one is used; each damaged one is named in a one-line warning on stderr.
Loading reads safetensors and JSON only, never pickle.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import sys
from pathlib import Path
from typing import Any

import torch

from smoe._io import fsync_dir, fsync_file, read_json

__all__ = ["CHECKPOINT", "PREVIOUS", "FORMAT", "MODEL_FILE", "OPTIMIZER_FILE", "STATE_FILE",
           "save_checkpoint", "checkpoint_dir", "list_checkpoints", "verify_checkpoint",
           "read_state", "load_model_weights", "load_optimizer_state", "rng_state",
           "set_rng_state", "save_tensors", "safetensors_problem"]

CHECKPOINT = "checkpoint"
PREVIOUS = "previous-checkpoints"
FORMAT = "smoe-checkpoint"
_VERSION = 1
MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", "state.json"
_FILES = (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``safetensors`` save of CPU, contiguous copies (the one place tensors are written)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt"})


def rng_state() -> dict[str, Any]:
    """The global RNG states as JSON (``torch`` as a list of byte values)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state().tolist()}
    py = random.getstate()
    state["python"] = [py[0], list(py[1]), py[2]]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "python" in state:
        v, internal, gauss = state["python"]
        random.setstate((v, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _step_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(run_dir: str | Path, model_tensors: dict[str, torch.Tensor],
                    optimizer_tensors: dict[str, torch.Tensor], state: dict[str, Any],
                    *, keep: int = 2) -> Path:
    """Write a checkpoint atomically and keep the newest ``keep`` (see the module docstring);
    returns its folder (``RUN_DIR/checkpoint``)."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep={keep!r} must be an integer >= 1")
    run_dir = Path(run_dir)
    final, previous = run_dir / CHECKPOINT, run_dir / PREVIOUS
    tmp = run_dir / f"{CHECKPOINT}.tmp-{os.getpid()}"
    for stale in run_dir.glob(f"{CHECKPOINT}.tmp-*"):  # left by a crashed writer
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_tensors(model_tensors, tmp / MODEL_FILE)
        save_tensors(optimizer_tensors, tmp / OPTIMIZER_FILE)
        state = {"format": FORMAT, "version": _VERSION, **state}
        (tmp / STATE_FILE).write_text(json.dumps(state) + "\n", encoding="utf-8")
        for name in _FILES:
            fsync_file(tmp / name)
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # The swap: at every moment `checkpoint` or `previous-checkpoints/step-N` is complete.
    if final.exists():
        old_step = _state_step(final)
        if old_step is None:  # a damaged latest checkpoint: not worth keeping
            shutil.rmtree(final)
        else:
            previous.mkdir(exist_ok=True)
            target = previous / _step_name(old_step)
            if target.exists():  # the same step saved twice (e.g. a stop right after a save)
                shutil.rmtree(target)
            os.rename(final, target)
            fsync_dir(previous)
        fsync_dir(run_dir)
    os.rename(tmp, final)
    fsync_dir(run_dir)
    legacy = run_dir / f"{CHECKPOINT}.old"  # a crash between renames of an older smoe
    if legacy.exists():
        shutil.rmtree(legacy, ignore_errors=True)
    if previous.is_dir():
        for old in sorted(previous.iterdir(), key=lambda p: p.name, reverse=True)[keep - 1:]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _state_step(folder: Path) -> int | None:
    try:
        return int(read_state(folder)["step"])
    except (ValueError, KeyError, TypeError, OSError):
        return None


def safetensors_problem(path: str | Path) -> str | None:
    """What is wrong with a safetensors file, read from its header alone (``None``: nothing).

    The format is an 8-byte little-endian header length, a JSON header whose entries give
    each tensor's byte range, then the data: a truncated file is shorter than the largest
    range end, which this catches without reading the tensors.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is empty or truncated ({size} bytes)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                return f"{path.name} is truncated (its header needs {n} bytes)"
            header = json.loads(f.read(n).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{path.name} is unreadable ({type(e).__name__})"
    if not isinstance(header, dict):
        return f"{path.name} has a malformed header"
    end = 0
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(meta["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            return f"{path.name} has a malformed header entry {key!r}"
    if 8 + n + end != size:
        return (f"{path.name} is {size} bytes where its header describes {8 + n + end} "
                "(truncated or damaged)")
    return None


def verify_checkpoint(folder: str | Path) -> str | None:
    """What is wrong with a checkpoint folder (``None``: it is sound); reads no tensors."""
    folder = Path(folder)
    missing = [n for n in _FILES if not (folder / n).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        read_state(folder)
    except (ValueError, OSError) as e:
        return str(e)
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        problem = safetensors_problem(folder / name)
        if problem:
            return problem
    return None


def list_checkpoints(run_dir: str | Path) -> list[tuple[Path, int | None, str | None]]:
    """Every checkpoint candidate of a run as ``(folder, step, problem)``, newest first
    (``step`` ``None`` where the state cannot be read; ``problem`` ``None`` where sound)."""
    run_dir = Path(run_dir)
    folders = [run_dir / CHECKPOINT, run_dir / f"{CHECKPOINT}.old"]
    if (run_dir / PREVIOUS).is_dir():
        folders += sorted((p for p in (run_dir / PREVIOUS).iterdir() if p.is_dir()),
                          key=lambda p: p.name, reverse=True)
    out = []
    for folder in folders:
        if not folder.is_dir():
            continue
        step = _state_step(folder)
        if step is None and folder.name.startswith("step-"):
            try:
                step = int(folder.name[5:])
            except ValueError:
                pass
        out.append((folder, step, verify_checkpoint(folder)))
    # Newest first; at equal steps `checkpoint` (listed first) stays first (a stable sort).
    return sorted(out, key=lambda c: -1 if c[1] is None else c[1], reverse=True)


def checkpoint_dir(run_dir: str | Path, *, warn: bool = True) -> Path | None:
    """The run's newest sound checkpoint folder, or ``None`` when it has none. With ``warn``
    each damaged checkpoint newer than the one used is named on stderr (one line each)."""
    for folder, step, problem in list_checkpoints(run_dir):
        if problem is None:
            return folder
        if warn:
            at = f" (step {step})" if step is not None else ""
            print(f"smoe: warning: checkpoint {str(folder)!r}{at} is damaged ({problem}); "
                  "using an earlier one", file=sys.stderr)
    return None


def read_state(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / STATE_FILE
    state = read_json(path, "checkpoint state")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not an smoe checkpoint state")
    return state


def load_model_weights(folder: str | Path, device: torch.device | str = "cpu"
                       ) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / MODEL_FILE), device=str(device))


def load_optimizer_state(folder: str | Path, device: torch.device | str = "cpu"
                         ) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / OPTIMIZER_FILE), device=str(device))

