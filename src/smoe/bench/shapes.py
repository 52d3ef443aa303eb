"""The shapes the layer benchmark times, its modes and its settings.

:class:`Shape` (one MoE layer shape), the full and ``--quick`` shape sets, the token counts, the
expert-count sweep, and :class:`Settings` (what one run measures and how), with the candidate
name filter ``_selected``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

FWD, FWD_BWD = "fwd", "fwd+bwd"
MODES = (FWD, FWD_BWD)
DENSE = "dense"


# --- shapes ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """One MoE layer shape: d hidden, f expert width, E experts, K per token, shared width."""

    name: str
    d: int
    f: int
    E: int
    K: int
    shared: int = 0  # total inner width of the shared experts (0: none)

    @property
    def dense_width(self) -> int:
        """Width of the dense SwiGLU doing the same FLOPs per token: K*f (+ shared)."""
        return self.K * self.f + self.shared

    @property
    def label(self) -> str:
        s = f"d{self.d} f{self.f} E{self.E} k{self.K}"
        return s + (f" +shared {self.shared}" if self.shared else "")


SHAPES: dict[str, Shape] = {
    "mixtral": Shape("mixtral", d=512, f=1024, E=8, K=2),
    "fine": Shape("fine", d=512, f=256, E=64, K=4),
    "deepseek": Shape("deepseek", d=512, f=128, E=128, K=8, shared=128),
}
#: ``--quick``: the same three kinds of shape at a quarter of the width, for a smoke run.
QUICK_SHAPES: dict[str, Shape] = {
    "mixtral": Shape("mixtral", d=128, f=256, E=8, K=2),
    "fine": Shape("fine", d=128, f=64, E=64, K=4),
    "deepseek": Shape("deepseek", d=128, f=32, E=128, K=8, shared=32),
}
TOKENS = (1, 8, 64, 1024, 4096)
BACKWARD_MIN_TOKENS = 64
SWEEP_EXPERTS = (8, 16, 32, 64, 128)
SWEEP_TOKENS = 1024
SWEEP_CANDIDATES = ("smoe", DENSE, "hf-mixtral-grouped_mm", "torchtitan", "all-experts")


def sweep_shape(num_experts: int, d: int = 512, f: int = 256, K: int = 2) -> Shape:
    return Shape(f"N{num_experts}", d=d, f=f, E=num_experts, K=K)


# --- settings -------------------------------------------------------------------------------
@dataclass
class Settings:
    shapes: tuple[str, ...] = tuple(SHAPES)
    shape_defs: dict[str, Shape] = field(default_factory=lambda: dict(SHAPES))
    tokens: tuple[int, ...] = TOKENS
    modes: tuple[str, ...] = MODES
    rounds: int = 7
    warmup: int = 2
    threads: int = 2
    target_ms: float = 25.0  # one measurement repeats a fast call until about this long
    max_reps: int = 50
    slow_call_s: float = 1.0  # a call slower than this gets only ``slow_rounds`` rounds
    slow_rounds: int = 3
    max_call_s: float = 6.0  # a call predicted or measured slower than this is skipped
    candidates: tuple[str, ...] = ("*",)
    sweep: bool = True
    sweep_experts: tuple[int, ...] = SWEEP_EXPERTS
    sweep_tokens: int = SWEEP_TOKENS
    sweep_width: tuple[int, int] = (512, 256)  # (d, f) of the sweep; K = 2
    sweep_candidates: tuple[str, ...] = SWEEP_CANDIDATES
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_settings(cls, **overrides: Any) -> "Settings":
        base = dict(shape_defs=dict(QUICK_SHAPES), tokens=(8, 64), rounds=3, warmup=1,
                    target_ms=5.0, max_reps=10, sweep_experts=(8, 32), sweep_tokens=64,
                    sweep_width=(128, 64), max_call_s=2.0, quick=True)
        base.update(overrides)
        return cls(**base)


def _selected(name: str, patterns: Sequence[str]) -> bool:
    return name == DENSE or any(fnmatch.fnmatchcase(name, p) for p in patterns)
