"""What ``smoe serve MODEL`` serves: an smoe run folder (float, or quantized by ``smoe quantize``),
or a local Hugging Face folder (imported onto smoe's model, so that it runs on smoe layers and the
continuous-batching engine), with its tokenizer and, when it has one, its chat template; its
experts optionally offloaded to a memory-mapped store behind a byte-budgeted cache
(``smoe.inference.offload``, the same transform as ``smoe generate --offload``).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["ServedModel", "load_served_model"]


@dataclass
class ServedModel:
    name: str
    model: torch.nn.Module
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    eos_id: int | None
    #: messages -> prompt text, or None when the model carries no chat template.
    chat_prompt: Callable[[list[dict[str, str]]], str] | None
    source: str
    #: the :class:`~smoe.inference.offload.ExpertOffloader` when the experts are offloaded
    #: (``close()`` it at shutdown: it removes a temporary store), else None.
    offloader: Any = None


def _load_run(run_dir: Path, device: str):
    """The one place ``serve`` reads a run folder."""
    from smoe.runs import load_run
    return load_run(run_dir, device=device)


def load_served_model(path: str | Path, *, device: str = "cpu", name: str | None = None,
                      offload: float | None = None, offload_policy: str = "predict",
                      offload_store: str | Path | None = None) -> ServedModel:
    """Load MODEL for serving (FileNotFoundError / ValueError naming what is wrong).

    ``offload``: keep this fraction (0, 1] of the expert bytes in memory and read the rest from
    ``offload_store`` (a temporary file when None) under ``offload_policy`` (lru, lfu, predict).
    """
    if offload is not None and not (isinstance(offload, (int, float)) and 0 < offload <= 1):
        raise ValueError(f"offload={offload!r} must be a fraction in (0, 1] of the expert bytes")
    served = _load_served(Path(path), device, name)
    if offload is not None:
        from smoe.inference.offload import offload as offload_experts

        served.offloader = offload_experts(served.model, budget=offload, policy=offload_policy,
                                           store=offload_store)
    return served


def _load_served(path: Path, device: str, name: str | None) -> ServedModel:
    if not path.is_dir():
        raise FileNotFoundError(f"MODEL {str(path)!r} is not a folder: give an smoe run folder "
                                "or a local Hugging Face model folder")
    served_name = name or path.resolve().name
    if (path / "config.json").is_file() and \
            json.loads((path / "config.json").read_text()).get("format") == "smoe-run":
        run = _load_run(path, device)
        tok = run.tokenizer
        return ServedModel(served_name, run.model, tok.encode, tok.decode,
                           getattr(tok, "eos_id", None), None, str(path))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} has neither an smoe run config nor a Hugging "
                                "Face config.json")
    from smoe.hf import import_hf

    with tempfile.TemporaryDirectory(prefix="smoe-serve-") as tmp:
        import_hf(path, Path(tmp) / "run")
        run = _load_run(Path(tmp) / "run", device)
    hf_tok = None
    try:
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(str(path))
    except Exception:  # noqa: BLE001 - a folder without a usable tokenizer: use the run's
        hf_tok = None
    chat = None
    if hf_tok is not None and getattr(hf_tok, "chat_template", None):
        def chat(messages: list[dict[str, str]], tok: Any = hf_tok) -> str:
            return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if hf_tok is not None:
        encode = lambda text: list(hf_tok.encode(text, add_special_tokens=False))  # noqa: E731
        decode = lambda ids: hf_tok.decode(ids, skip_special_tokens=True)  # noqa: E731
        eos = hf_tok.eos_token_id
    else:
        tok = run.tokenizer
        encode, decode, eos = tok.encode, tok.decode, getattr(tok, "eos_id", None)
    return ServedModel(served_name, run.model, encode, decode, eos, chat, str(path))
