"""The layer benchmark's interleaved timing loop and the run over all shapes.

:func:`measure_row` times every candidate of one (shape, T, mode) in interleaved, shuffled
rounds; :func:`run` builds the candidates per shape, measures every row and the expert-count
sweep, and returns the JSON-ready report (with :func:`machine_info`).
"""

from __future__ import annotations

import datetime as _dt
import gc
import importlib.metadata
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from smoe.bench.candidates import Built, Candidate, Skip, all_candidates
from smoe.bench.shapes import (BACKWARD_MIN_TOKENS, DENSE, FWD_BWD, Settings, Shape, _selected,
                               sweep_shape)

#: a call's time at T >= this predicts its time at a larger T (below, overheads dominate).
PREDICT_MIN_TOKENS = 256


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
