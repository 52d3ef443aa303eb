"""Offloaded experts, measured on a trained model decoding real validation text.

For budgets 25/50/75/100% of the expert bytes and the policies lru, lfu and predict (next-layer
router + background prefetch), one token at a time through the KV cache over validation text
(teacher forced, so every policy sees the same routing trace): hit rate, bytes moved per token,
prefetch precision / recall, stall time, tokens/s against the resident model, and Belady's
optimal hit rate on the recorded demand trace. The store is a safetensors file in --store-dir;
before each run its pages are dropped from the page cache (``posix_fadvise(DONTNEED)``) so the
first reads come from the disk, not memory. Modelled tokens/s for a link of bandwidth B:
t = t_resident + miss_bytes / B + max(0, prefetch_bytes / B - t_resident) per token (demand
misses stall; prefetches overlap the compute of a token and stall only beyond it).

    python benchmarks/offload.py --run RUN_DIR --write
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

LINKS = {"PCIe 4.0 x16 (25 GB/s)": 25e9, "NVMe (3.5 GB/s)": 3.5e9}


def _decode(model, tokens: list[int]) -> float:
    """Teacher-forced decode of ``tokens`` one at a time through the KV cache: seconds."""
    from smoe.inference.cache import StaticCache

    cache = StaticCache.for_model(model, 1, len(tokens))
    t0 = time.perf_counter()
    with torch.no_grad():
        for tok in tokens:   # positions continue the cache
            model(torch.tensor([[tok]]), cache=cache)
    return time.perf_counter() - t0


def _cold_read_gbs(path: Path) -> float:
    from smoe.inference.offload import drop_page_cache

    drop_page_cache(path)
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass
    return path.stat().st_size / (time.perf_counter() - t0) / 1e9


def main(argv: list[str] | None = None) -> int:
    from smoe.data import DataConfig, prepare_data
    from smoe.inference.offload import belady_hit_rate, drop_page_cache, offload
    from smoe.runs import load_run

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--store-dir", default=None, help="folder of the expert store (default: a "
                   "temporary folder)")
    p.add_argument("--write", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(1)

    run = load_run(a.run)
    model = run.model
    data = prepare_data(DataConfig(**(run.config.get("data") or {})), run_dir=run.run_dir)
    tokens = [int(t) for t in data.val.tokens_N[1000:1000 + a.tokens].tolist()]
    import tempfile

    store_dir = Path(a.store_dir or tempfile.mkdtemp(prefix="smoe-offload-"))
    store_dir.mkdir(parents=True, exist_ok=True)
    c = model.config.moe
    resident = [_decode(model, tokens) for _ in range(3)]
    t_res = statistics.median(resident) / len(tokens)
    rows, cold = [], None
    for budget in (0.25, 0.5, 0.75, 1.0):
        for policy, extra in (("lru", 0), ("lfu", 0), ("predict", 0)) + (
                (("predict", 1), ("predict", 2)) if budget == 0.5 else ()):
            m = copy.deepcopy(model)
            store = store_dir / "experts.safetensors"
            off = offload(m, budget=budget, policy=policy, store=store, prefetch_extra=extra)
            if cold is None:
                cold = _cold_read_gbs(store)
            drop_page_cache(store)
            res_secs = _decode(model, tokens)   # the resident model, just before: same load
            secs = _decode(m, tokens)
            s = off.stats(secs)
            belady = belady_hit_rate(off.trace, off.capacity)
            off.close()
            n = s["tokens"]
            miss_b = (s["accesses"] * (s["miss_rate"] + s["late_prefetch_rate"])
                      * s["expert_bytes"] / n)
            pre_b = s["prefetched"] * s["expert_bytes"] / n
            model_tps = {k: 1 / (t_res + miss_b / bw + max(0.0, pre_b / bw - t_res))
                         for k, bw in LINKS.items()}
            name = policy if policy != "predict" else f"predict (+{extra})"
            prec = "-" if s["prefetch_precision"] is None else f"{s['prefetch_precision']:.2f}"
            rec = "-" if s["prefetch_recall"] is None else f"{s['prefetch_recall']:.2f}"
            rows.append(
                f"| {int(budget * 100)}% ({s['capacity_experts']}/{s['total_experts']}) | {name} "
                f"| {s['hit_rate']:.3f} | {belady:.3f} | "
                f"{s['bytes_moved_per_token'] / 2**20:.2f} | {prec} | {rec} | "
                f"{1e3 * s['stall_s'] / n:.2f} | {s['tokens_per_s']:.1f} | "
                f"{res_secs / secs:.2f}x | "
                + " | ".join(f"{v:.1f}" for v in model_tps.values()) + " |")
            print(rows[-1], flush=True)
    head = ("| budget (experts) | policy | hit rate | Belady | MiB moved / token | prefetch "
            "precision | prefetch recall | stall ms / token | tokens/s | vs resident (run just "
            "before) | "
            + " | ".join(f"modelled tok/s, {k}" for k in LINKS) + " |")
    text = "\n".join([
        "## Offloaded experts (benchmarks/offload.py)", "",
        f"Command: `python benchmarks/offload.py {' '.join(sys.argv[1:])}`; torch "
        f"{torch.__version__}, 1 thread, load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores (shared machine: measured tokens/s are noisy). Model: {a.run} (E{c.num_experts} top-{c.top_k}, "
        f"{model.config.num_layers} layers), teacher-forced decode of {len(tokens)} validation "
        f"tokens. Resident: {1 / t_res:.1f} tokens/s. Store read cold (page cache dropped with "
        f"posix_fadvise DONTNEED before every run): {cold:.2f} GB/s here. Hit rate counts demand "
        "accesses found in the fast tier (a late prefetch that had to be waited for is not a "
        "hit); Belady is the optimal demand-fetching bound on the same trace (prefetching can "
        "beat it).", "",
        head, "|" + "---|" * (head.count("|") - 1)] + rows)
    print(text)
    if a.write:
        from smoe.bench import write_section

        write_section(ROOT / "BENCHMARKS.md", text, "<!-- offload-bench:start -->",
                      "<!-- offload-bench:end -->")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
