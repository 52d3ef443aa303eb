"""Side-by-side timing of one MoE layer: smoe against the dense ideal, transformers and peers.

Everything is measured in ONE process, float32, on a fixed number of threads (2 by default).
The candidates of a row run INTERLEAVED: each round runs every candidate once, in an order
shuffled per round, so that a slow drift of the machine (turbo, another process) hits all of
them alike. A candidate's figure is the median over rounds, after warm-up; its ratio is the
median over rounds of t(candidate) / t(dense ideal) measured in the same round.

Candidates (``name``: what it is):

* ``dense``: the ideal, a dense SwiGLU FFN of width K*f (+ the shared experts' width): the
  FLOPs a sparse layer cannot go below. It is the denominator of every ratio.
* ``smoe``: ``smoe.MoELayer`` with ``router="softmax_topk"``, no losses.
* ``all-experts``: every expert computed for every token, weighted by the router: what
  sparsity avoids.
* ``hf-{mixtral,qwen3,olmoe}-{eager,grouped_mm,batched_mm}``: transformers' sparse MoE blocks
  built from tiny configs, with each experts implementation (``experts_implementation=`` in the
  config; the ``@use_experts_implementation`` decorator dispatches on it at every forward).
* peers (torchtitan, fairscale, ...): adapters handed in by the caller
  (``benchmarks/peers.py``); a peer that cannot be built or run is shown as ``n/a (reason)``.

Legend: T tokens, d hidden, f expert width, E (= N) experts, K experts per token.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Shape",
    "SHAPES",
    "QUICK_SHAPES",
    "TOKENS",
    "SWEEP_EXPERTS",
    "Skip",
    "Built",
    "Candidate",
    "SwiGLU",
    "AllExperts",
    "builtin_candidates",
    "transformers_candidates",
    "init_weights",
    "Settings",
    "run",
    "render_markdown",
    "write_section",
    "add_arguments",
    "main",
    "MARK_START",
    "MARK_END",
]

MARK_START = "<!-- layer-bench:start -->"
MARK_END = "<!-- layer-bench:end -->"
FWD, FWD_BWD = "fwd", "fwd+bwd"
MODES = (FWD, FWD_BWD)
DENSE = "dense"
INIT_STD = 0.02
#: transformers' batched_mm gathers one weight matrix per (token, expert) pair; above this it
#: is skipped (forward; twice that with the gradients of the gathered weights).
BATCHED_MM_LIMIT_BYTES = 4 * 2**30
#: a call's time at T >= this predicts its time at a larger T (below, overheads dominate).
PREDICT_MIN_TOKENS = 256


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


# --- candidates -----------------------------------------------------------------------------
class Skip(Exception):
    """A candidate that cannot run here: ``short`` goes in the table cell, ``detail`` below it."""

    def __init__(self, short: str, detail: str = "") -> None:
        super().__init__(short)
        self.short = short
        self.detail = detail or short


@dataclass
class Built:
    """A candidate built for one shape.

    forward: x_TD -> y_TD (float32). params: what backward writes gradients into.
    limit: (T, backward) -> a Skip to raise, or None, for inputs it cannot take (memory,
        divisibility). close: called when the shape is done (free a process group, ...).
    """

    forward: Callable[[torch.Tensor], torch.Tensor]
    params: list[torch.Tensor]
    module: nn.Module | None = None
    limit: Callable[[int, bool], Skip | None] | None = None
    close: Callable[[], None] | None = None
    note: str = ""


@dataclass(frozen=True)
class Candidate:
    """A named builder. ``tokens_exponent``: how its time grows with T (2 for one-hot
    dispatch), used to predict, from the previous T, whether a call would be too slow."""

    name: str
    label: str
    build: Callable[[Shape], Built]
    group: str = "peer"  # "ideal" | "smoe" | "transformers" | "all-experts" | "peer"
    tokens_exponent: float = 1.0


def init_weights(module: nn.Module, seed: int = 0, std: float = INIT_STD) -> nn.Module:
    """Same init for every candidate: N(0, std) on every weight matrix (dim >= 2), others kept.

    Matters for routing: transformers' Qwen3 router starts at zeros (every token would tie on
    the same experts) and lucidrains' gate at N(0, 1) (every token near one-hot).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


class SwiGLU(nn.Module):
    """A dense SwiGLU FFN: down(silu(x W_g) * (x W_u)), gate and up fused in one matmul."""

    def __init__(self, d: int, width: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d, 2 * width, bias=False)
        self.down = nn.Linear(width, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class AllExperts(nn.Module):
    """Every expert on every token (dense over E), combined with the router's top-K weights
    (softmax, top-K, renormalised; zero for the experts not chosen): the cost sparsity avoids."""

    def __init__(self, shape: Shape) -> None:
        super().__init__()
        d, f, E = shape.d, shape.f, shape.E
        self.top_k = shape.K
        self.router = nn.Linear(d, E, bias=False)
        self.gate_up_DF = nn.Parameter(torch.empty(E, d, 2 * f))  # [E, d, 2f]
        self.down_FD = nn.Parameter(torch.empty(E, f, d))  # [E, f, d]
        self.shared = SwiGLU(d, shape.shared) if shape.shared else None

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        probs_TE = torch.softmax(self.router(x_TD).float(), dim=-1)
        w_TK, idx_TK = probs_TE.topk(self.top_k, dim=-1)
        w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)
        weight_TE = torch.zeros_like(probs_TE).scatter(1, idx_TK, w_TK).to(x_TD.dtype)
        h_ET2F = torch.matmul(x_TD, self.gate_up_DF)  # (T, d) @ (E, d, 2f) -> (E, T, 2f)
        gate, up = h_ET2F.chunk(2, dim=-1)
        y_ETD = torch.bmm(F.silu(gate) * up, self.down_FD)
        out_TD = torch.einsum("te,etd->td", weight_TE, y_ETD)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)
        return out_TD


def _built(module: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], **kw) -> Built:
    return Built(forward=forward, params=[p for p in module.parameters() if p.requires_grad],
                 module=module, **kw)


def _build_dense(shape: Shape) -> Built:
    m = init_weights(SwiGLU(shape.d, shape.dense_width))
    return _built(m, m)


def _build_smoe(shape: Shape) -> Built:
    from smoe import MoEConfig, MoELayer

    cfg = MoEConfig(hidden_size=shape.d, expert_size=shape.f, num_experts=shape.E,
                    top_k=shape.K, router="softmax_topk", aux_loss_coef=0.0, z_loss_coef=0.0,
                    num_shared_experts=1 if shape.shared else 0,
                    shared_expert_size=shape.shared or None)
    layer = init_weights(MoELayer(cfg))
    return _built(layer, lambda x: layer(x)[0])


def _build_all_experts(shape: Shape) -> Built:
    m = init_weights(AllExperts(shape))
    return _built(m, m)


def with_shared(shape: Shape, module: nn.Module,
                forward: Callable[[torch.Tensor], torch.Tensor]) -> tuple[nn.Module, Callable]:
    """For a block without shared experts: add a SwiGLU of the shape's shared width beside it."""
    if not shape.shared:
        return module, forward
    shared = init_weights(SwiGLU(shape.d, shape.shared), seed=1)
    holder = nn.ModuleDict({"block": module, "shared": shared})
    return holder, (lambda x: forward(x) + shared(x))


def builtin_candidates() -> list[Candidate]:
    return [
        Candidate(DENSE, "dense SwiGLU, width K*f: the ideal", _build_dense, "ideal"),
        Candidate("smoe", "smoe MoELayer", _build_smoe, "smoe"),
        Candidate("all-experts", "all experts computed for every token", _build_all_experts,
                  "all-experts"),
    ]


# --- transformers ---------------------------------------------------------------------------
HF_BLOCKS = ("mixtral", "qwen3", "olmoe")
HF_BACKENDS = ("eager", "grouped_mm", "batched_mm")


def hf_block(shape: Shape, family: str, backend: str) -> nn.Module:
    """transformers' sparse MoE block of ``family`` for ``shape``, experts backend ``backend``.

    The experts implementation is chosen by the config's ``experts_implementation`` (stored as
    ``config._experts_implementation``), read by ``@use_experts_implementation`` at each forward.
    Top-K weights are renormalised in all three (Mixtral always; Qwen3/OLMoE by
    ``norm_topk_prob=True``), like smoe's ``softmax_topk``.
    """
    try:
        if family == "mixtral":
            from transformers.models.mixtral.configuration_mixtral import MixtralConfig
            from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

            cfg = MixtralConfig(hidden_size=shape.d, intermediate_size=shape.f,
                                num_local_experts=shape.E, num_experts_per_tok=shape.K,
                                router_jitter_noise=0.0, experts_implementation=backend)
            block = MixtralSparseMoeBlock(cfg)
        elif family == "qwen3":
            from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
            from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

            cfg = Qwen3MoeConfig(hidden_size=shape.d, moe_intermediate_size=shape.f,
                                 num_experts=shape.E, num_experts_per_tok=shape.K,
                                 norm_topk_prob=True, experts_implementation=backend)
            block = Qwen3MoeSparseMoeBlock(cfg)
        elif family == "olmoe":
            from transformers.models.olmoe.configuration_olmoe import OlmoeConfig
            from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

            cfg = OlmoeConfig(hidden_size=shape.d, intermediate_size=shape.f,
                              num_experts=shape.E, num_experts_per_tok=shape.K,
                              norm_topk_prob=True, experts_implementation=backend)
            block = OlmoeSparseMoeBlock(cfg)
        else:
            raise ValueError(f"unknown transformers block {family!r}")
    except ImportError as exc:
        raise Skip("not installed", f"transformers: {exc}") from exc
    if block.experts.config._experts_implementation != backend:
        raise Skip("backend not set", f"config._experts_implementation is "
                                      f"{block.experts.config._experts_implementation!r}")
    return init_weights(block)


def _batched_mm_limit(shape: Shape) -> Callable[[int, bool], Skip | None]:
    def limit(T: int, backward: bool) -> Skip | None:
        per_pair = (2 * shape.f * shape.d + shape.f * shape.d) * 4
        need = T * shape.K * per_pair * (2 if backward else 1)
        if need > BATCHED_MM_LIMIT_BYTES:
            return Skip(f"mem {need / 2**30:.0f} GiB",
                        f"batched_mm gathers one weight copy per (token, expert): "
                        f"{need / 2**30:.1f} GiB > {BATCHED_MM_LIMIT_BYTES / 2**30:.0f} GiB")
        return None
    return limit


def _hf_builder(family: str, backend: str) -> Callable[[Shape], Built]:
    def build(shape: Shape) -> Built:
        block = hf_block(shape, family, backend)
        d = shape.d

        def fwd(x_TD: torch.Tensor) -> torch.Tensor:
            return block(x_TD.view(1, -1, d)).view(-1, d)

        module, forward = with_shared(shape, block, fwd)
        return _built(module, forward,
                      limit=_batched_mm_limit(shape) if backend == "batched_mm" else None,
                      note=("no shared expert in the block: on shapes with shared experts a "
                            "SwiGLU of the shared width (like smoe's) is added beside it")
                      if shape.shared else "")
    return build


def transformers_candidates() -> list[Candidate]:
    names = {"mixtral": "Mixtral", "qwen3": "Qwen3-MoE", "olmoe": "OLMoE"}
    return [Candidate(f"hf-{fam}-{be}", f"transformers {names[fam]} block, {be} experts",
                      _hf_builder(fam, be), "transformers")
            for fam in HF_BLOCKS for be in HF_BACKENDS]


def all_candidates(peers: Iterable[Candidate] = ()) -> list[Candidate]:
    return builtin_candidates() + transformers_candidates() + list(peers)


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


# --- timing ---------------------------------------------------------------------------------
@dataclass
class _Entry:
    cand: Candidate
    built: Built | None = None
    skip: Skip | None = None


def _one_call(built: Built, x: torch.Tensor, grad: torch.Tensor | None) -> None:
    if grad is None:
        built.forward(x)
        return
    for p in built.params:
        p.grad = None
    x.grad = None
    y = built.forward(x)
    # A materialised, contiguous gradient: grouped_mm's backward rejects zero-stride ones.
    y.backward(grad)


def _timed(built: Built, x: torch.Tensor, grad: torch.Tensor | None, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        _one_call(built, x, grad)
    return (time.perf_counter() - t0) / reps


def _short_error(exc: BaseException) -> Skip:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return Skip(f"error: {type(exc).__name__}", f"{type(exc).__name__}: {msg[:300]}")


def measure_row(entries: list[_Entry], shape: Shape, T: int, mode: str, s: Settings,
                history: dict[tuple[str, str, str], tuple[int, float]],
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Time every runnable candidate on one (shape, T, mode); interleaved rounds."""
    backward = mode == FWD_BWD
    gen = torch.Generator().manual_seed(s.seed * 1000 + T)
    x = torch.randn(T, shape.d, generator=gen)
    grad = torch.randn(T, shape.d, generator=gen) if backward else None
    x.requires_grad_(backward)
    results: dict[str, dict[str, Any]] = {}
    active: dict[str, tuple[Built, int, int]] = {}  # name -> (built, reps, rounds)
    t_row = time.perf_counter()
    grad_ctx = torch.enable_grad if backward else torch.no_grad

    def skip(name: str, sk: Skip) -> None:
        results[name] = {"skipped": sk.short, "detail": sk.detail}

    with grad_ctx():
        for e in entries:
            name = e.cand.name
            if e.skip is not None or e.built is None:
                skip(name, e.skip or Skip("not built"))
                continue
            built = e.built
            if built.module is not None:
                built.module.train(backward)
            lim = built.limit(T, backward) if built.limit else None
            if lim is not None:
                skip(name, lim)
                continue
            key = (name, shape.name, mode)
            # Predict from a previous T only where the time is compute-bound, not overhead.
            if key in history and history[key][0] >= PREDICT_MIN_TOKENS:
                t_prev_T, t_prev = history[key]
                pred = t_prev * (T / t_prev_T) ** e.cand.tokens_exponent
                if pred > s.max_call_s:
                    skip(name, Skip(f"> {s.max_call_s:g} s/call",
                                    f"predicted {pred:.1f} s per call from T={t_prev_T} "
                                    f"({t_prev:.2f} s), over the {s.max_call_s:g} s cap"))
                    continue
            try:
                t_est = _timed(built, x, grad, 1)  # first call: allocations, lazy init
                if t_est > s.max_call_s:
                    skip(name, Skip(f"> {s.max_call_s:g} s/call",
                                    f"one call took {t_est:.1f} s, over the {s.max_call_s:g} s "
                                    f"cap"))
                    continue
                if t_est < s.slow_call_s:
                    for _ in range(max(s.warmup - 1, 0)):
                        t_est = _timed(built, x, grad, 1)
            except Exception as exc:  # a peer failing must not stop the run
                skip(name, _short_error(exc))
                continue
            history[key] = (T, t_est)
            reps = max(1, min(s.max_reps, int(s.target_ms / 1e3 / max(t_est, 1e-9))))
            rounds = s.rounds if t_est < s.slow_call_s else min(s.rounds, s.slow_rounds)
            active[name] = (built, reps, rounds)

        times: dict[str, list[float | None]] = {n: [] for n in active}
        rng = random.Random(f"{s.seed}/{shape.name}/{T}/{mode}")
        gc.collect()
        gc_was = gc.isenabled()
        gc.disable()
        try:
            for r in range(s.rounds):
                order = [n for n, (_, _, rounds) in active.items() if r < rounds]
                rng.shuffle(order)
                for name in order:
                    built, reps, _ = active[name]
                    if name in results:  # failed in an earlier round
                        continue
                    try:
                        dt = _timed(built, x, grad, reps)
                    except Exception as exc:
                        skip(name, _short_error(exc))
                        continue
                    times[name].append(dt)
                for name in active:
                    if len(times[name]) < r + 1:
                        times[name].append(None)
        finally:
            if gc_was:
                gc.enable()

    dense_t = times.get(DENSE, [])
    for name, ts in times.items():
        if name in results:
            continue
        vals = [t for t in ts if t is not None]
        ratios = [t / d for t, d in zip(ts, dense_t) if t is not None and d is not None]
        res = {"median_ms": statistics.median(vals) * 1e3, "rounds": len(vals),
               "reps": active[name][1], "min_ms": min(vals) * 1e3}
        if ratios:
            res["ratio"] = statistics.median(ratios)
        results[name] = res
        history[(name, shape.name, mode)] = (T, statistics.median(vals))
    row = {"shape": shape.name, "label": shape.label, "tokens": T, "mode": mode,
           "results": results, "wall_s": time.perf_counter() - t_row}
    row["smoe_vs_transformers"] = _smoe_vs_hf(results)
    log(_row_line(row))
    return row


def _smoe_vs_hf(results: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    smoe = results.get("smoe", {}).get("median_ms")
    hf = {n: r["median_ms"] for n, r in results.items()
          if n.startswith("hf-") and "median_ms" in r}
    if smoe is None or not hf:
        return None
    best = min(hf, key=hf.get)
    speedup = hf[best] / smoe
    return {"best": best, "best_ms": hf[best], "smoe_ms": smoe, "speedup": speedup,
            "smoe_at_least_as_fast": speedup >= 1.0}


def _row_line(row: dict[str, Any]) -> str:
    res = row["results"]
    head = f"[{row['shape']} T={row['tokens']} {row['mode']}] {row['wall_s']:.1f}s"
    sm = res.get("smoe", {})
    if "median_ms" not in sm:
        return f"{head} | smoe n/a ({sm.get('skipped', '?')})"
    line = f"{head} | smoe {sm.get('ratio', float('nan')):.2f}x dense ({sm['median_ms']:.3f} ms)"
    cmp_ = row.get("smoe_vs_transformers")
    if cmp_:
        verdict = ("at least as fast" if cmp_["smoe_at_least_as_fast"] else "SLOWER")
        factor = cmp_["speedup"] if cmp_["speedup"] >= 1 else 1 / cmp_["speedup"]
        line += (f"; best transformers {cmp_['best']} {cmp_['best_ms']:.3f} ms: smoe is "
                 f"{verdict} ({'faster' if cmp_['speedup'] >= 1 else 'slower'} by "
                 f"{factor:.2f}x)")
    return line


# --- running --------------------------------------------------------------------------------
def _build_entries(cands: Sequence[Candidate], shape: Shape) -> list[_Entry]:
    entries = []
    for c in cands:
        e = _Entry(c)
        try:
            e.built = c.build(shape)
        except Skip as sk:
            e.skip = sk
        except Exception as exc:
            e.skip = _short_error(exc)
        entries.append(e)
    return entries


def _close(entries: list[_Entry]) -> None:
    for e in entries:
        if e.built is not None and e.built.close is not None:
            try:
                e.built.close()
            except Exception:
                pass
        e.built = None
    gc.collect()


def machine_info(peers: Sequence[Candidate] = ()) -> dict[str, Any]:
    cpu, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line + " "
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine()
    isa = [i for i in ("avx512f", "avx512_bf16", "amx_tile", "avx2") if f" {i} " in flags]

    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    versions = {p: version(p) for p in ("torch", "transformers", "smoe", "torchtitan",
                                        "fairscale", "mixture-of-experts", "st-moe-pytorch")}
    return {"cpu": cpu, "isa": isa, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "mkl": torch.backends.mkl.is_available(), "python": platform.python_version(),
            "versions": versions,
            "allocator": ("tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "")
                          else "glibc"),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def run(settings: Settings, peers: Sequence[Candidate] = (), command: str = "",
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark: returns the JSON-ready report (see the module docstring)."""
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    t0 = time.perf_counter()
    load_start = _loadavg()
    if load_start is not None and load_start > 0.5:
        log(f"warning: the machine is not quiet (1-min load average {load_start:.1f}): with "
            f"{settings.threads} threads, other processes make these timings noisy")
    try:
        cands = [c for c in all_candidates(peers) if _selected(c.name, settings.candidates)]
        history: dict[tuple[str, str, str], tuple[int, float]] = {}
        rows: list[dict[str, Any]] = []
        labels = {c.name: c.label for c in cands}
        notes: dict[str, str] = {}
        for shape_name in settings.shapes:
            shape = settings.shape_defs[shape_name]
            entries = _build_entries(cands, shape)
            for e in entries:
                if e.built is not None and e.built.note:
                    notes[e.cand.name] = e.built.note
            try:
                for T in settings.tokens:
                    for mode in settings.modes:
                        if mode == FWD_BWD and T < BACKWARD_MIN_TOKENS:
                            continue
                        rows.append(measure_row(entries, shape, T, mode, settings, history, log))
            finally:
                _close(entries)
        sweep: list[dict[str, Any]] = []
        if settings.sweep:
            patterns = [p for p in settings.sweep_candidates
                        if _selected(p, settings.candidates)]
            scands = [c for c in cands if _selected(c.name, patterns)]
            for N in settings.sweep_experts:
                shape = sweep_shape(N, *settings.sweep_width)
                entries = _build_entries(scands, shape)
                try:
                    for mode in settings.modes:
                        sweep.append(measure_row(entries, shape, settings.sweep_tokens, mode,
                                                 settings, history, log))
                finally:
                    _close(entries)
            _sweep_ratios(sweep)
        info = machine_info(peers)
        info["load_average"] = {"start": load_start, "end": _loadavg()}
    finally:
        torch.set_num_threads(prev_threads)
    s = settings
    return {
        "machine": info,
        "command": command,
        "settings": {"shapes": {n: vars(s.shape_defs[n]) for n in s.shapes}, "tokens": list(s.tokens),
                     "modes": list(s.modes), "rounds": s.rounds, "warmup": s.warmup,
                     "threads": s.threads, "dtype": "float32", "target_ms": s.target_ms,
                     "slow_call_s": s.slow_call_s, "slow_rounds": s.slow_rounds,
                     "max_call_s": s.max_call_s, "quick": s.quick, "seed": s.seed,
                     "sweep_experts": list(s.sweep_experts) if s.sweep else [],
                     "sweep_tokens": s.sweep_tokens, "sweep_width": list(s.sweep_width)},
        "candidates": {n: labels[n] for n in labels},
        "notes": notes,
        "rows": rows,
        "sweep": sweep,
        "elapsed_s": time.perf_counter() - t0,
    }


def _sweep_ratios(sweep: list[dict[str, Any]]) -> None:
    """Per token time and the ratio to the smallest N, per candidate and mode."""
    base: dict[tuple[str, str], float] = {}
    for row in sweep:
        T = row["tokens"]
        for name, r in row["results"].items():
            if "median_ms" not in r:
                continue
            r["us_per_token"] = r["median_ms"] * 1e3 / T
            key = (name, row["mode"])
            base.setdefault(key, r["median_ms"])
            r["ratio_to_first_N"] = r["median_ms"] / base[key]


# --- output ---------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _fmt_ms(x: float) -> str:
    return f"{x:.3g}" if x < 1000 else f"{x:.0f}"


def _cell(r: dict[str, Any] | None, key: str, rounds: int) -> str:
    if r is None:
        return "–"
    if "skipped" in r:
        return f"n/a ({r['skipped']})"
    if key not in r:
        return "–"
    text = _fmt(r[key]) if key != "median_ms" else _fmt_ms(r[key])
    if r.get("rounds", rounds) < rounds:
        text += f" ({r['rounds']}r)"
    return text


def _table(rows: list[dict[str, Any]], names: list[str], labels: dict[str, str], key: str,
           rounds: int, with_verdict: bool) -> list[str]:
    cols = [f"{r['shape']} T{r['tokens']}" for r in rows]
    out = ["| candidate | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for n in names:
        if not any(n in r["results"] for r in rows):
            continue
        cells = [_cell(r["results"].get(n), key, rounds) for r in rows]
        out.append(f"| {labels.get(n, n)} (`{n}`) | " + " | ".join(cells) + " |")
    if with_verdict:
        cells = []
        for r in rows:
            v = r.get("smoe_vs_transformers")
            if not v:
                cells.append("–")
                continue
            word = "faster" if v["speedup"] >= 1 else "slower"
            factor = v["speedup"] if v["speedup"] >= 1 else 1 / v["speedup"]
            cells.append(f"{word} {factor:.2f}x vs `{v['best'].removeprefix('hf-')}`")
        out.append("| **smoe vs best transformers** | " + " | ".join(cells) + " |")
    return out


def render_markdown(report: dict[str, Any]) -> str:
    """The BENCHMARKS.md section (without the markers)."""
    m = report["machine"]
    s = report["settings"]
    labels = report["candidates"]
    names = list(labels)
    v = m["versions"]
    peers = ", ".join(f"{p} {v[p]}" for p in ("torchtitan", "fairscale", "mixture-of-experts",
                                               "st-moe-pytorch") if v.get(p))
    L = ["## MoE layer: smoe against the dense ideal, transformers and peers", ""]
    if s.get("quick"):
        L += ["*Quick smoke run (`--quick`): few rounds and tokens; not for conclusions.*", ""]
    L += [f"Measured {m['date']} on {m['cpu']} ({', '.join(m['isa']) or 'ISA ?'}), "
          f"{s['threads']} thread{'s' if s['threads'] != 1 else ''}, allocator {m.get('allocator', '?')} "
          f"(the same for every candidate), float32, torch {v.get('torch')}, transformers "
          f"{v.get('transformers')}, Python {m['python']}"
          + (f"; peers: {peers}" if peers else "") + ".",
          "",
          f"Command: `{report['command']}` (took {report['elapsed_s'] / 60:.1f} min"
          + _load_text(m) + ").",
          "",
          "Method: one process; for each shape, token count and mode, every candidate is "
          f"warmed up, then runs once per round in a shuffled order for {s['rounds']} rounds "
          "(a fast call is repeated within a round to last about "
          f"{s['target_ms']:g} ms). A ratio is the median over rounds of t(candidate) / "
          "t(dense ideal) in the same round: **1.0 is the dense SwiGLU FFN of width K*f "
          "(+ the shared width) doing the same useful FLOPs; lower is better**. "
          f"`(3r)`: a candidate slower than {s['slow_call_s']:g} s per call measured over fewer "
          f"rounds; `> {s['max_call_s']:g} s/call`: skipped to keep the run short. Forward "
          "runs under `torch.no_grad()` in eval mode; forward+backward (T >= "
          f"{BACKWARD_MIN_TOKENS}) calls `y.backward(g)` with a materialised random g and "
          "includes the input's gradient.",
          "",
          "| shape | d | f | E | K | shared | dense ideal width |",
          "|---|---|---|---|---|---|---|"]
    for n, sh in s["shapes"].items():
        L.append(f"| {n} | {sh['d']} | {sh['f']} | {sh['E']} | {sh['K']} | {sh['shared']} | "
                 f"{sh['K'] * sh['f'] + sh['shared']} |")
    L.append("")
    rows = report["rows"]
    for mode, title in ((FWD_BWD, "Forward + backward (training)"),
                        (FWD, "Forward only (inference)")):
        mrows = [r for r in rows if r["mode"] == mode]
        if not mrows:
            continue
        L += [f"### {title}: time / dense ideal", ""]
        L += _table(mrows, names, labels, "ratio", s["rounds"], with_verdict=True)
        L += ["", f"### {title}: median time per call (ms)", ""]
        L += _table(mrows, names, labels, "median_ms", s["rounds"], with_verdict=False)
        L.append("")
    if report["sweep"]:
        L += _sweep_markdown(report, labels)
    reasons: dict[tuple[str, str], list[str]] = {}
    for r in rows + report["sweep"]:
        for n, res in r["results"].items():
            if "skipped" in res:
                reasons.setdefault((n, res["detail"]), []).append(
                    f"{r['shape']} T{r['tokens']} {r['mode']}")
    if report.get("notes") or reasons:
        L += ["### Notes", ""]
        by_note: dict[str, list[str]] = {}
        for n, note in report.get("notes", {}).items():
            by_note.setdefault(note, []).append(f"`{n}`")
        for note, who in by_note.items():
            L.append(f"- {', '.join(who)}: {note}.")
        for (n, detail), where in reasons.items():
            span = ", ".join(where) if len(where) <= 4 else f"{len(where)} rows"
            L.append(f"- `{n}` not measured ({span}): {detail}")
        L.append("")
    return "\n".join(L).rstrip() + "\n"


def _load_text(m: dict[str, Any]) -> str:
    la = m.get("load_average") or {}
    if la.get("start") is None:
        return ""
    return f"; 1-min load average {la['start']:.1f} at the start, {la['end']:.1f} at the end"


def _sweep_markdown(report: dict[str, Any], labels: dict[str, str]) -> list[str]:
    sw = report["sweep"]
    T = sw[0]["tokens"]
    Ns = sorted({int(r["shape"][1:]) for r in sw})
    d, f = report["settings"]["sweep_width"]
    L = [f"### Expert-count sweep: d{d} f{f} K2, T={T} (cost per token should stay flat)", "",
         "Cells: µs per token (ratio to N=" + str(Ns[0]) + "; ratio to the dense ideal).", "",
         "| candidate | mode | " + " | ".join(f"N={n}" for n in Ns) + " |",
         "|---|---|" + "---|" * len(Ns)]
    names = [n for n in labels if any(n in r["results"] for r in sw)]
    for mode in MODES:
        for n in names:
            cells = []
            for N in Ns:
                row = next((r for r in sw if r["shape"] == f"N{N}" and r["mode"] == mode), None)
                res = row["results"].get(n) if row else None
                if row is None or res is None:
                    cells.append("–")
                elif "skipped" in res:
                    cells.append(f"n/a ({res['skipped']})")
                else:
                    cells.append(f"{res['us_per_token']:.2f} ({res['ratio_to_first_N']:.2f}; "
                                 f"{res.get('ratio', float('nan')):.2f})")
            if any(c != "–" for c in cells):
                L.append(f"| `{n}` | {mode} | " + " | ".join(cells) + " |")
    L.append("")
    return L


def write_section(path: str | os.PathLike, section: str, start: str = MARK_START,
                  end: str = MARK_END) -> None:
    """Replace the text between the ``start``/``end`` markers in ``path`` (create it if
    missing, append the section if it has no markers); written atomically (tmp + os.replace).
    Every benchmark script writes its own section of BENCHMARKS.md through this."""
    path = Path(path)
    block = f"{start}\n{section.rstrip()}\n{end}"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    i, j = old.find(start), old.find(end)
    if i != -1 and j > i:
        new = old[:i] + block + old[j + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(new)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --- command line ---------------------------------------------------------------------------
def _csv(kind: Callable[[str], Any]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(t.strip()) for t in text.split(",") if t.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by ``benchmarks/layer.py`` and ``smoe bench``)."""
    p.add_argument("--shapes", type=_csv(str), default=None,
                   help=f"comma list of {', '.join(SHAPES)} (default: all)")
    p.add_argument("--tokens", type=_csv(int), default=None,
                   help=f"comma list of token counts (default: {','.join(map(str, TOKENS))})")
    p.add_argument("--modes", type=_csv(str), default=None, help="fwd, fwd+bwd (default: both)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7)")
    p.add_argument("--candidates", type=_csv(str), default=None,
                   help="comma list of names or globs, e.g. 'smoe,hf-*-grouped_mm' "
                        "(dense is always included)")
    p.add_argument("--quick", action="store_true",
                   help="a small subset for a smoke run (T 8,64; 3 rounds; short sweep)")
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                   help="run the expert-count sweep (default: yes)")
    p.add_argument("--sweep-experts", type=_csv(int), default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-call-s", type=float, default=None,
                   help="skip a candidate whose call takes longer (default 6 s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", default=None, help="write the report as JSON")
    p.add_argument("--write", metavar="PATH", nargs="?", const="BENCHMARKS.md", default=None,
                   help="replace the layer-bench section of BENCHMARKS.md (or PATH)")
    p.add_argument("--list", action="store_true", help="list the candidates and exit")


def settings_from_args(a: argparse.Namespace) -> Settings:
    over: dict[str, Any] = {}
    if a.shapes:
        bad = [s for s in a.shapes if s not in SHAPES]
        if bad:
            raise ValueError(f"--shapes: unknown {bad}; choose from {', '.join(SHAPES)}")
        over["shapes"] = a.shapes
    if a.tokens:
        if any(t <= 0 for t in a.tokens):
            raise ValueError("--tokens must be positive")
        over["tokens"] = a.tokens
    if a.modes:
        bad = [m for m in a.modes if m not in MODES]
        if bad:
            raise ValueError(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
        over["modes"] = a.modes
    if a.rounds is not None:
        if a.rounds < 1:
            raise ValueError("--rounds must be >= 1")
        over["rounds"] = a.rounds
    if a.candidates:
        over["candidates"] = a.candidates
    if a.sweep_experts:
        over["sweep_experts"] = a.sweep_experts
    if a.max_call_s is not None:
        over["max_call_s"] = a.max_call_s
    over.update(sweep=a.sweep, threads=a.threads, seed=a.seed)
    return Settings.quick_settings(**over) if a.quick else Settings(**over)


def find_peers_module(start: str | os.PathLike | None = None) -> Path | None:
    """``benchmarks/peers.py`` of a source checkout: beside the package (editable install)
    or under the current directory."""
    here = Path(__file__).resolve()
    for base in (Path(start) if start else None, here.parents[2], Path.cwd()):
        if base is not None and (base / "benchmarks" / "peers.py").is_file():
            return base / "benchmarks" / "peers.py"
    return None


def load_peers(path: str | os.PathLike | None = None) -> list[Candidate]:
    """The peer candidates of ``benchmarks/peers.py`` (``candidates()``), or none."""
    path = Path(path) if path else find_peers_module()
    if path is None:
        return []
    spec = importlib.util.spec_from_file_location("smoe_bench_peers", path)
    if spec is None or spec.loader is None:
        return []
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return list(mod.candidates())


def _command_line(prog: str | None, argv: Sequence[str]) -> str:
    if prog is None:
        a0 = sys.argv[0]
        prog = (f"python {os.path.relpath(a0)}" if a0.endswith(".py")
                else Path(a0).name or "smoe bench")
    return f"{prog} {shlex.join(list(argv))}".strip()


def main_from_args(a: argparse.Namespace, peers: Sequence[Candidate] | None = None,
                   command: str = "") -> int:
    if peers is None:
        peers = load_peers()
    if a.list:
        for c in all_candidates(peers):
            print(f"{c.name:28s} {c.label}")
        return 0
    settings = settings_from_args(a)
    report = run(settings, peers, command=command)
    md = render_markdown(report)
    print()
    print(md)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1, default=str) + "\n")
        print(f"wrote {a.json}")
    if a.write:
        write_section(a.write, md)
        print(f"wrote the layer-bench section of {a.write}")
    return 0


def main(argv: Sequence[str] | None = None, peers: Sequence[Candidate] | None = None,
         prog: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    add_arguments(p)
    a = p.parse_args(argv)
    return main_from_args(a, peers, command=_command_line(prog, argv))
