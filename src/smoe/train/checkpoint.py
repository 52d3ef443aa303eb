"""Checkpoints: safetensors for tensors, JSON for everything else, swapped in atomically.

Layout of ``RUN_DIR/checkpoint/``::

    model.safetensors       the model's state dict (parameters and persistent buffers)
    optimizer.safetensors   the optimizer's per-parameter tensors, "<param name>/<key>"
    state.json              step, configs, optimizer hyperparameters, RNG states, the data
                            batcher's position, the schedule

Writing (:func:`save_checkpoint`): everything goes into ``checkpoint.tmp-<pid>`` next to it,
each file and the folder are fsynced, then ``checkpoint`` is renamed to ``checkpoint.old``,
the new folder to ``checkpoint``, and ``checkpoint.old`` is removed. A crash at any point
leaves either ``checkpoint`` or ``checkpoint.old`` complete; :func:`checkpoint_dir` finds it.
Loading reads safetensors and JSON only, never pickle.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["CHECKPOINT", "FORMAT", "save_checkpoint", "checkpoint_dir", "read_state",
           "load_model_weights", "load_optimizer_state", "rng_state", "set_rng_state",
           "save_tensors"]

CHECKPOINT = "checkpoint"
FORMAT = "smoe-checkpoint"
_VERSION = 1
MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", "state.json"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open a folder
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``safetensors`` save of CPU, contiguous copies (the one place tensors are written)."""
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


def save_checkpoint(run_dir: str | Path, model_tensors: dict[str, torch.Tensor],
                    optimizer_tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Write a checkpoint atomically (see the module docstring); returns its folder."""
    run_dir = Path(run_dir)
    final, old = run_dir / CHECKPOINT, run_dir / f"{CHECKPOINT}.old"
    tmp = run_dir / f"{CHECKPOINT}.tmp-{os.getpid()}"
    for stale in run_dir.glob(f"{CHECKPOINT}.tmp-*"):  # left by a crashed writer
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_tensors(model_tensors, tmp / MODEL_FILE)
        save_tensors(optimizer_tensors, tmp / OPTIMIZER_FILE)
        state = {"format": FORMAT, "version": _VERSION, **state}
        (tmp / STATE_FILE).write_text(json.dumps(state) + "\n", encoding="utf-8")
        for name in (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE):
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # The swap: at every moment `checkpoint` or `checkpoint.old` is a complete checkpoint.
    if final.exists():
        if old.exists():  # a stale .old beside a complete checkpoint: left by a crash
            shutil.rmtree(old)
        os.rename(final, old)
        _fsync_dir(run_dir)
    os.rename(tmp, final)
    _fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _complete(folder: Path) -> bool:
    return all((folder / n).is_file() for n in (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE))


def checkpoint_dir(run_dir: str | Path) -> Path | None:
    """The run's latest complete checkpoint folder: ``checkpoint``, else ``checkpoint.old``
    (a crash between the two renames of a save), else ``None``."""
    run_dir = Path(run_dir)
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):
        if _complete(run_dir / name):
            return run_dir / name
    return None


def read_state(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"checkpoint state {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not an smoe checkpoint state")
    return state


def load_model_weights(folder: str | Path, device: torch.device | str = "cpu"
                       ) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / MODEL_FILE), device=str(device))


def load_optimizer_state(folder: str | Path, device: torch.device | str = "cpu"
                         ) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / OPTIMIZER_FILE), device=str(device))
