"""Run folders for everything that is not training: read one, find its checkpoint, load its model.

A run folder (written by ``smoe train`` or ``smoe import``) holds ``config.json`` (``format``
``"smoe-run"``: the model config, and for trained runs the train and data configs),
``tokenizer.json``, and checkpoints (:mod:`smoe.checkpoint`). This module is what a server, an
evaluation or an exporter uses; it imports nothing from ``smoe.train``.

:func:`load_run` builds the model in one fixed order, so that every caller gets the same thing:

1. read ``config.json`` and the newest sound checkpoint's state (its model config wins);
2. build the model on the ``meta`` device (no memory, no random init);
3. ``transforms(model)``: the caller's runtime changes that alter parameters' names or
   shapes (quantized or offloaded experts, a swapped dispatcher), before any weight exists;
4. load the weights with ``assign=True`` (the loaded tensors become the parameters);
5. move to ``device`` and cast floating tensors to ``dtype``; eval mode.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from smoe._io import read_json
from smoe.checkpoint import checkpoint_dir, load_model_weights, read_state
from smoe.config import ModelConfig

__all__ = ["RUN_CONFIG", "RUN_FORMAT", "DTYPES", "LoadedRun", "read_run_config", "is_smoe_run",
           "latest_checkpoint", "trained_seq_len", "resolve_device", "resolve_dtype",
           "set_threads", "load_run", "generate_text"]

RUN_CONFIG = "config.json"
RUN_FORMAT = "smoe-run"
#: The dtypes a model may run in, by the names the command line uses.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedRun:
    run_dir: Path
    model: torch.nn.Module
    tokenizer: Any
    config: dict[str, Any]
    step: int
    #: where the checkpoint came from (``None`` for a model handed over in memory)
    checkpoint: Path | None = field(default=None)


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The run's ``config.json``; one-line errors for a missing folder, bad JSON or a file that
    is not an smoe run config."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not an smoe run (no {RUN_CONFIG})")
    data = read_json(path, "run config")
    if not isinstance(data, dict) or data.get("format") != RUN_FORMAT:
        raise ValueError(f"{str(path)!r} is not an smoe run config")
    if not isinstance(data.get("model"), dict):
        raise ValueError(f"{str(path)!r} has no model config: the run folder is damaged")
    return data


def is_smoe_run(run_dir: str | Path) -> bool:
    try:
        read_run_config(run_dir)
    except (FileNotFoundError, ValueError):
        return False
    return True


def latest_checkpoint(run_dir: str | Path) -> tuple[dict[str, Any], Path, dict[str, Any],
                                                     ModelConfig]:
    """(run config, checkpoint folder, checkpoint state, model config) of a run's newest sound
    checkpoint (damaged newer ones are named on stderr). Raises ``FileNotFoundError`` when the
    run has none."""
    run_dir = Path(run_dir)
    run_cfg = read_run_config(run_dir)
    folder = checkpoint_dir(run_dir)
    if folder is None:
        raise FileNotFoundError(f"{str(run_dir)!r} has no usable checkpoint: train it first "
                                "(smoe train ... --out RUN_DIR)")
    state = read_state(folder)
    return run_cfg, folder, state, ModelConfig.from_dict(state.get("model_config")
                                                          or run_cfg["model"])


def trained_seq_len(run_config: dict[str, Any]) -> int | None:
    """The sequence length a run was trained at (``None`` for an imported model)."""
    train = run_config.get("train")
    if isinstance(train, dict) and isinstance(train.get("seq_len"), int):
        return int(train["seq_len"])
    return None


# -- where and how a model runs ---------------------------------------------------------------
def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (CUDA, else MPS, else CPU); a device
    that is not available raises a one-line ``ValueError`` saying what is."""
    spec = "auto" if spec is None else str(spec)
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"device={spec!r} is not a device: give cpu, cuda, cuda:N, mps or "
                         "auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={spec!r}: CUDA is not available here (this torch "
                             f"{'has no CUDA' if torch.version.cuda is None else 'sees no GPU'}"
                             "); use --device cpu or auto")
        n = torch.cuda.device_count()
        if device.index is not None and device.index >= n:
            raise ValueError(f"device={spec!r}: there {'is' if n == 1 else 'are'} {n} CUDA "
                             f"device{'' if n == 1 else 's'} (cuda:0..cuda:{n - 1})")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device={spec!r}: MPS is not available here; use --device cpu or "
                             "auto")
    elif device.type != "cpu":
        raise ValueError(f"device={spec!r} is not supported: give cpu, cuda, cuda:N, mps or auto")
    return device


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``float32`` / ``bfloat16`` / ``float16`` (or a torch dtype; ``None`` keeps the weights')."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is not supported: give one of {', '.join(DTYPES)}")
    return DTYPES[name]


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads`` with a checked value (``None`` keeps torch's default)."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads={threads!r} must be an integer >= 1")
    torch.set_num_threads(threads)


# -- loading ------------------------------------------------------------------------------------
def load_run(run_dir: str | Path, device: torch.device | str = "cpu",
             dtype: torch.dtype | str | None = None,
             transforms: Callable[[torch.nn.Module], torch.nn.Module | None] | None = None
             ) -> LoadedRun:
    """The run's model (newest sound checkpoint, eval mode) and tokenizer, built in the order
    of the module docstring: safetensors and JSON only."""
    from smoe.data import load_tokenizer
    from smoe.model import SMoETransformer

    run_dir = Path(run_dir)
    device = resolve_device(device) if isinstance(device, str) else device
    dtype = resolve_dtype(dtype)
    run_cfg, folder, state, model_cfg = latest_checkpoint(run_dir)
    with torch.device("meta"):
        model = SMoETransformer(model_cfg)
    if transforms is not None:
        model = transforms(model) or model
    weights = load_model_weights(folder, "cpu")
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:2])[:300]
        raise ValueError(f"the weights in {str(folder)!r} do not fit the model config of "
                         f"{str(run_dir)!r}: {detail}") from None
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.eval()
    return LoadedRun(run_dir, model, load_tokenizer(run_dir), run_cfg, int(state["step"]),
                     folder)


# -- generating ---------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised from the streaming hook when a stop string appeared: ends ``generate`` early."""


def _stable(text: str) -> str:
    """``text`` without a trailing replacement character (an incomplete UTF-8 sequence of a
    byte tokenizer, completed by the next token)."""
    return text[:-1] if text.endswith("\ufffd") else text


def generate_text(run: LoadedRun | str | Path, prompt: str, max_new_tokens: int = 200,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, *,
                  top_k: int | None = None, stop: Sequence[str] = (),
                  on_text: Callable[[str], None] | None = None,
                  log: Callable[[str], None] | None = None) -> str:
    """The continuation of ``prompt`` by a run's model (the new text only).

    It stops at the tokenizer's end-of-document token, at the first of the ``stop`` strings
    (not included), or at the model's context: ``max_new_tokens`` is cut to what fits after
    the prompt, and ``log`` (when given) is told so in one line, as it is when the text goes
    past the sequence length the run was trained at (positions the model never learned).
    ``top_k`` keeps the ``k`` most likely tokens before temperature and top-p.
    ``on_text`` receives the text as it is produced (streaming), in pieces whose concatenation
    is the returned text.
    """
    from smoe.inference import generate

    if not isinstance(run, LoadedRun):
        run = load_run(run)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be an integer >= 1")
    stop = tuple(stop)
    if any(not isinstance(s, str) or not s for s in stop):
        raise ValueError("stop strings must be non-empty")
    tok, model = run.tokenizer, run.model
    ids = tok.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty: give some text to continue")
    limit = model.config.max_seq_len
    if len(ids) >= limit:
        raise ValueError(f"the prompt is {len(ids)} tokens; the model's context is {limit}: "
                         "give a shorter prompt")
    if len(ids) + max_new_tokens > limit:
        if log is not None:
            log(f"note: the context is {limit} tokens and the prompt takes {len(ids)}: "
                f"generating at most {limit - len(ids)} new tokens, not {max_new_tokens}")
        max_new_tokens = limit - len(ids)
    trained = trained_seq_len(run.config)
    if trained is not None and trained < len(ids) + max_new_tokens and log is not None:
        log(f"warning: the model was trained on sequences of {trained} tokens; text past "
            f"position {trained} was never trained for and degrades (keep the prompt plus "
            f"--max-new-tokens within {trained})")

    new: list[int] = []
    streamed = [""]  # text handed to on_text so far
    held = max((len(s) for s in stop), default=1) - 1  # a stop string may still be completing

    def emit(final: bool) -> bool:
        """Stream what is certain; True when a stop string appeared."""
        text = tok.decode(new)
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        if cut >= 0:
            text, final = text[:cut], True
        ready = text if final else _stable(text)[: max(len(_stable(text)) - held, 0)]
        if on_text is not None and len(ready) > len(streamed[0]):
            on_text(ready[len(streamed[0]):])
            streamed[0] = ready
        return cut >= 0

    def pre_hook(module, args, kwargs):
        idx_BT = args[0] if args else kwargs["idx_BT"]
        if pre_hook.calls:  # after the prefill each forward's last input is a new token
            token = int(idx_BT[0, -1])
            if tok.eos_id is None or token != tok.eos_id:
                new.append(token)
                if (stop or on_text is not None) and emit(final=False):
                    raise _Stop
        pre_hook.calls += 1
    pre_hook.calls = 0

    def top_k_hook(module, args, output):
        k = min(top_k, output.logits.shape[-1])
        kth = output.logits.topk(k, dim=-1).values[..., -1:]
        output.logits = output.logits.masked_fill(output.logits < kth, float("-inf"))
        return output

    handles = [model.register_forward_pre_hook(pre_hook, with_kwargs=True)]
    if top_k is not None:
        handles.append(model.register_forward_hook(top_k_hook))
    stopped = False
    try:
        out = generate(model, ids, max_new_tokens, temperature=temperature, top_p=top_p,
                       seed=seed, eos_id=tok.eos_id)
    except _Stop:
        stopped = True
    finally:
        for h in handles:
            h.remove()
    if not stopped:
        new = [int(i) for i in out[len(ids):].tolist()]
        if tok.eos_id in new:
            new = new[:new.index(tok.eos_id)]
    emit(final=True)
    text = tok.decode(new)
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    return text[:cut] if cut >= 0 else text


def stderr_log(message: str) -> None:
    """One line on stderr (the ``log`` the command line gives the functions above)."""
    print(message, file=sys.stderr)
