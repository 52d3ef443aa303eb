"""The capacity-versus-compute experiment: does tiny-moe beat tiny-dense at equal compute?

Trains, on the same data, steps and seed:
  tiny-dense       dense FFN of width K*f        (same active parameters as tiny-moe)
  tiny-moe         8 experts, top-2, aux loss    (the claim under test)
  tiny-dense-wide  dense FFN of width N*f        (same total parameters as tiny-moe)
and two balancing variants of tiny-moe:
  tiny-moe/none    no load balancing at all (aux loss coefficient 0)
  tiny-moe/bias    DeepSeek-V3 auxiliary-loss-free bias balancing (router sigmoid_bias, aux 0)

Writes benchmarks/out/capacity/curves.json, a PNG of validation loss against step, training
FLOPs and wall time, and (with --write) a table in BENCHMARKS.md between markers. Also reports,
per layer, which experts prose and code tokens go to, scored by the mutual information between
the token's domain and its chosen experts (bits; 1.0 = the expert reveals the domain).

    python benchmarks/capacity.py --steps 1000 --write
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out" / "capacity"

VARIANTS = {
    # name: (preset, router override, TrainConfig overrides)
    "tiny-dense": ("tiny-dense", None, {}),
    "tiny-moe": ("tiny-moe", None, {}),
    "tiny-dense-wide": ("tiny-dense-wide", None, {}),
    "tiny-moe/none": ("tiny-moe", None, {"aux_loss_coef": 0.0}),
    "tiny-moe/bias": ("tiny-moe", "sigmoid_bias", {"aux_loss_coef": 0.0, "bias_update": True}),
}


def mutual_information_bits(counts_DE: list[list[float]]) -> float:
    """I(domain; expert) in bits from a [domains][experts] table of routing counts."""
    total = sum(sum(row) for row in counts_DE)
    if total == 0:
        return 0.0
    p_d = [sum(row) / total for row in counts_DE]
    p_e = [sum(row[e] for row in counts_DE) / total for e in range(len(counts_DE[0]))]
    mi = 0.0
    for d, row in enumerate(counts_DE):
        for e, c in enumerate(row):
            if c:
                p = c / total
                mi += p * math.log2(p / (p_d[d] * p_e[e]))
    return mi


def train_variant(name: str, steps: int, batch: int, seq: int, eval_every: int,
                  seed: int) -> dict:
    from smoe.train import TrainConfig
    from smoe.train.metrics import read_metrics
    from smoe.train.run import start_run

    preset, router, overrides = VARIANTS[name]
    run_dir = OUT / name.replace("/", "-")
    train = TrainConfig(steps=steps, batch_size=batch, seq_len=seq, eval_every=eval_every,
                        eval_batches=16, checkpoint_every=0, log_every=10, seed=seed,
                        warmup_steps=max(1, steps // 20), **overrides)
    result = start_run(run_dir, train, preset=preset, router=router, replace=True,
                       progress=False, log=lambda *a: None)
    model = result.model
    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if "loss" in r and "val_loss" not in r]
    evals = [r for r in rows if "val_loss" in r]
    elapsed_at = {r["step"]: r["elapsed_s"] for r in train_rows if "elapsed_s" in r}
    fpt = model.flops_per_token(seq)
    tokens_per_step = batch * seq
    curve = []
    for r in evals:
        step = r["step"]
        near = max((s for s in elapsed_at if s <= step), default=None)
        curve.append({"step": step, "val_loss": r["val_loss"], "val_bpb": r.get("val_bpb"),
                      "flops": fpt * tokens_per_step * step,
                      "wall_s": elapsed_at.get(step, elapsed_at.get(near, 0.0))})
    tps = [r["tokens_per_s"] for r in train_rows if r.get("tokens_per_s")]
    imbalance = [r["load_imbalance"] for r in train_rows if "load_imbalance" in r]
    final = evals[-1]
    spec = []
    for layer, _ in enumerate(final.get("moe_layers", [])):
        routing = final.get("domain_routing")
        if routing:
            table = [routing[d][layer] for d in routing]
            spec.append({"layer": final["moe_layers"][layer],
                         "mi_bits": mutual_information_bits(table),
                         "domains": list(routing), "counts": table})
    return {
        "name": name, "preset": preset, "router": router, "overrides": overrides,
        "params_total": model.num_params(),
        "params_active": model.num_active_params(),
        "flops_per_token": fpt,
        "tokens_per_s_median": sorted(tps)[len(tps) // 2] if tps else None,
        "train_time_s": result.elapsed_s,
        "curve": curve,
        "final_val_loss": final["val_loss"], "final_val_bpb": final.get("val_bpb"),
        "val_loss_by_domain": final.get("val_loss_by_domain"),
        "load_imbalance_curve": [[r["step"], r["load_imbalance"]] for r in train_rows
                                 if "load_imbalance" in r],
        "load_imbalance_mean": sum(imbalance) / len(imbalance) if imbalance else None,
        "load_imbalance_max": max(imbalance) if imbalance else None,
        "final_val_load_imbalance": final.get("val_load_imbalance"),
        "specialisation": spec,
    }


def steps_to_reach(curve: list[dict], target: float) -> int | None:
    """First evaluated step whose validation loss is <= target (None if never)."""
    for point in curve:
        if point["val_loss"] <= target:
            return point["step"]
    return None


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for name in ("tiny-dense", "tiny-moe", "tiny-dense-wide", "tiny-moe/none", "tiny-moe/bias"):
        if name not in results:
            continue
        c = results[name]["curve"]
        style = "--" if "/" in name else "-"
        for ax, key in zip(axes, ("step", "flops", "wall_s")):
            ax.plot([p[key] for p in c], [p["val_loss"] for p in c], style, label=name)
    for ax, label in zip(axes, ("training step", "training FLOPs", "wall time (s)")):
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (nats/byte token)")
        ax.grid(alpha=0.3)
    axes[1].set_xscale("log")
    axes[0].legend()
    fig.suptitle("capacity vs compute: tiny-moe (8 experts, top-2) beside dense baselines")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def table(results: dict, args, duration_s: float) -> str:
    dense_final = results["tiny-dense"]["final_val_loss"]
    moe_steps = steps_to_reach(results["tiny-moe"]["curve"], dense_final)
    lines = [
        "Command: `python benchmarks/capacity.py "
        f"--steps {args.steps} --batch-size {args.batch_size} --seq-len {args.seq_len} "
        f"--eval-every {args.eval_every} --seed {args.seed} --write` "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{duration_s / 60:.1f} min in all). Same data (default corpus, byte tokens), steps, "
        "batch and seed for every run.",
        "",
        "| run | final val loss | val bpb | steps to tiny-dense's final loss | tokens/s (median) "
        "| params total | params active/token | load max/mean (train mean) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        reach = steps_to_reach(r["curve"], dense_final)
        imb = r["load_imbalance_mean"]
        lines.append(
            f"| {name} | {r['final_val_loss']:.4f} | {r['final_val_bpb'] or float('nan'):.4f} | "
            f"{reach if reach is not None else 'not reached'} | "
            f"{r['tokens_per_s_median'] or 0:,.0f} | {r['params_total']:,} | "
            f"{r['params_active']:,} | {f'{imb:.3f}' if imb else '-'} |")
    lines.append("")
    if moe_steps is not None:
        ratio = moe_steps / args.steps
        lines.append(f"tiny-moe reached tiny-dense's final validation loss ({dense_final:.4f}) at "
                     f"step {moe_steps} of {args.steps}: {ratio:.2f}x its steps "
                     f"(goal: <= 0.6x; {'met' if ratio <= 0.6 else 'not met'}).")
    else:
        lines.append(f"tiny-moe did not reach tiny-dense's final loss {dense_final:.4f}.")
    moe_tps = results["tiny-moe"]["tokens_per_s_median"]
    dense_tps = results["tiny-dense"]["tokens_per_s_median"]
    if moe_tps and dense_tps:
        lines.append(f"Training throughput tiny-moe / tiny-dense: {moe_tps / dense_tps:.2f}x "
                     "(goal >= 0.8x).")
    lines += ["", "Specialisation (final validation pass): mutual information between a token's "
              "domain (prose / code) and its chosen experts, per MoE layer, in bits (max 1.0):", "",
              "| run | " + " | ".join(f"layer {s['layer']}" for s in
                                      results["tiny-moe"]["specialisation"]) + " |",
              "|---|" + "---|" * len(results["tiny-moe"]["specialisation"])]
    for name, r in results.items():
        if r["specialisation"]:
            lines.append(f"| {name} | " + " | ".join(f"{s['mi_bits']:.3f}"
                                                      for s in r["specialisation"]) + " |")
    return "\n".join(lines)


def write_section(text: str, start: str, end: str) -> None:
    from smoe.bench import write_section as write

    write(ROOT / "BENCHMARKS.md", text, start, end)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", default=None, help="variants to run (default: all)")
    p.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = p.parse_args(argv)
    from smoe.launch import reexec_with_tcmalloc

    reexec_with_tcmalloc()
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    OUT.mkdir(parents=True, exist_ok=True)
    names = args.only or list(VARIANTS)
    results, t0 = {}, time.time()
    for name in names:
        t = time.time()
        results[name] = train_variant(name, args.steps, args.batch_size, args.seq_len,
                                      args.eval_every, args.seed)
        print(f"{name}: final val loss {results[name]['final_val_loss']:.4f} "
              f"({time.time() - t:.0f} s)", flush=True)
    duration = time.time() - t0
    curves = OUT / "curves.json"
    tmp = curves.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    os.replace(tmp, curves)
    plot(results, OUT / "capacity.png")
    if all(n in results for n in ("tiny-dense", "tiny-moe")):
        text = table(results, args, duration)
        print(text)
        if args.write:
            write_section(text + "\n\n![capacity](benchmarks/capacity.png)",
                          "<!-- capacity:start -->", "<!-- capacity:end -->")
            import shutil

            shutil.copyfile(OUT / "capacity.png", ROOT / "benchmarks" / "capacity.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
