"""Batches from a token stream: seeded, addressable by step, resumable exactly.

:class:`Batcher` draws training batch ``step`` from a generator seeded by ``(seed, step)``
alone, so batch ``k`` is the same whether a run got there in one go or resumed from a
``state_dict`` saved at any earlier step. :func:`val_batches` gives a fixed set of windows
spread evenly over the validation stream (so every domain is in it).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, NamedTuple

import torch

from smoe.config import config_error
from smoe.data.dataset import TokenStream

__all__ = ["Batch", "Batcher", "val_batches", "bits_per_byte"]


class Batch(NamedTuple):
    """Inputs ``x_BT``, next-token targets ``y_BT`` and the domain id of each input token
    ``domain_BT`` (an index into the stream's ``domain_names``); all int64."""

    x_BT: torch.Tensor
    y_BT: torch.Tensor
    domain_BT: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in self))


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise config_error(name, value, "must be a positive integer")


def _windows(stream: TokenStream, starts_B: torch.Tensor, seq_len: int) -> Batch:
    idx_BT1 = starts_B[:, None] + torch.arange(seq_len + 1)  # (B, T+1)
    window_BT1 = stream.tokens_N[idx_BT1].long()
    domain_BT = stream.domains_N[idx_BT1[:, :-1]].long()
    return Batch(window_BT1[:, :-1], window_BT1[:, 1:], domain_BT)


def _check_fits(stream: TokenStream, seq_len: int) -> None:
    if len(stream) < seq_len + 1:
        raise config_error(
            "seq_len",
            seq_len,
            f"needs a stream of at least seq_len + 1 tokens; it has {len(stream)}",
        )


def _step_seed(seed: int, step: int) -> int:
    digest = hashlib.sha256(f"smoe-batch:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Batcher:
    """Random windows of ``seq_len + 1`` tokens, ``batch_size`` per batch, from a stream.

    ``next(batcher)`` returns batch ``batcher.step`` and advances it; ``batch_at(step)`` reads
    any step without moving. ``state_dict()`` is plain ints (JSON-able); loading it into a
    Batcher over the same stream continues with exactly the batches the saved one would give.
    """

    def __init__(
        self, stream: TokenStream, batch_size: int, seq_len: int, seed: int = 0, step: int = 0
    ) -> None:
        _check_positive("batch_size", batch_size)
        _check_positive("seq_len", seq_len)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise config_error("seed", seed, "must be an integer")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise config_error("step", step, "must be a non-negative integer")
        _check_fits(stream, seq_len)
        self.stream = stream
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.step = step

    def batch_at(self, step: int) -> Batch:
        """Batch number ``step``: a function of ``(seed, step)`` and the stream only."""
        gen = torch.Generator().manual_seed(_step_seed(self.seed, step))
        high = len(self.stream) - self.seq_len  # starts in [0, N - T - 1]
        starts_B = torch.randint(0, high, (self.batch_size,), generator=gen)
        return _windows(self.stream, starts_B, self.seq_len)

    def __iter__(self) -> Batcher:
        return self

    def __next__(self) -> Batch:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {
            "seed": self.seed,
            "step": self.step,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "num_tokens": len(self.stream),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved state; the shape and the stream's length must match."""
        for name, mine in (
            ("batch_size", self.batch_size),
            ("seq_len", self.seq_len),
            ("num_tokens", len(self.stream)),
        ):
            if name in state and int(state[name]) != mine:
                raise ValueError(
                    f"{name}={state[name]!r} in the saved batcher state does not match this "
                    f"batcher's {mine}: resume with the same data and batch shape"
                )
        for name in ("seed", "step"):
            if name not in state:
                raise ValueError(f"batcher state has no {name!r}")
        if int(state["step"]) < 0:
            raise config_error("step", state["step"], "must be a non-negative integer")
        self.seed = int(state["seed"])
        self.step = int(state["step"])


def val_batches(
    stream: TokenStream, batch_size: int, seq_len: int, max_batches: int | None = None
) -> list[Batch]:
    """A fixed list of validation batches over ``stream``.

    ``max_batches=None``: every non-overlapping window, in order (the whole stream is scored
    once, save a tail shorter than a window). Otherwise ``max_batches * batch_size`` windows
    (at most that many as fit without overlap) with starts spread evenly from the first token to
    the last, so that every part of the stream, and so every domain, is represented. The last
    batch may be smaller than ``batch_size``.
    """
    _check_positive("batch_size", batch_size)
    _check_positive("seq_len", seq_len)
    if max_batches is not None:
        _check_positive("max_batches", max_batches)
    _check_fits(stream, seq_len)
    fit = (len(stream) - 1) // seq_len
    if max_batches is None or max_batches * batch_size >= fit:
        starts_W = torch.arange(fit) * seq_len
    else:
        n = max_batches * batch_size
        last = len(stream) - seq_len - 1
        starts_W = torch.tensor([round(i * last / (n - 1)) if n > 1 else 0 for i in range(n)])
    return [_windows(stream, s_B, seq_len) for s_B in starts_W.split(batch_size)]


def bits_per_byte(loss_per_token: float, bytes_per_token: float) -> float:
    """Bits per UTF-8 byte from a mean cross-entropy in nats per token."""
    if not bytes_per_token > 0:
        raise config_error("bytes_per_token", bytes_per_token, "must be positive")
    return loss_per_token / math.log(2) / bytes_per_token
