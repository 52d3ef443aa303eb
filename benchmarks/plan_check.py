"""`smoe plan --gpu cpu` against measured decode: does the planner predict this machine's decode
tokens/s of the quantized-experts benchmark's large-weights model within 30%?

For each model and scheme: measured tokens/s (decode steps only, batch 1, KV cache; medians over
interleaved rounds, as in ``benchmarks/quant.py``) beside two predictions of the planner run on
the model's run-folder ``config.json``:

* the roofline: bytes read per step / the measured read bandwidth (a timed ``sum``);
* the expected decode: each part's bytes at its scheme's measured batch-1 kernel rate, plus a
  per-layer overhead (:mod:`smoe.plan.cpu`).

Calibration and check are separate: the kernel rates come from random matrices of one fixed
shape and the overhead from a small cache-resident model (hidden 64, 4 layers); the models
checked are other, larger ones, never used to set a figure.

    python benchmarks/plan_check.py --write
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quant import LARGE, build_random, decode_step_seconds  # noqa: E402

#: A second large-weights shape: wider, fewer experts, top-1 (1.0 GiB of fp32 experts).
WIDE = dict(vocab_size=257, hidden_size=2048, num_layers=2, num_heads=16, num_kv_heads=4,
            max_seq_len=256, moe=dict(hidden_size=2048, expert_size=2048, num_experts=10,
                                      top_k=1))
#: (name, quantize() keywords, smoe plan flags)
SCHEMES = [("fp32", None, ["--weights", "fp32"]),
           ("int4 experts", dict(experts="int4"), ["--weights", "fp32", "--experts", "int4"]),
           ("int4 experts + int4 attention", dict(experts="int4", attention="int4"),
            ["--weights", "fp32", "--experts", "int4", "--attention", "int4"])]
STEPS, PROMPT = 24, 16


def run_folder(spec: dict, where: Path) -> Path:
    """A run folder holding only the model's ``config.json`` (what ``smoe plan`` reads)."""
    from smoe.config import ModelConfig, MoEConfig

    cfg = ModelConfig(**{**spec, "moe": MoEConfig(**spec["moe"])})
    where.mkdir(parents=True, exist_ok=True)
    (where / "config.json").write_text(json.dumps({"format": "smoe-run",
                                                   "model": cfg.to_dict()}))
    return where


def build(spec: dict) -> dict:
    from smoe.inference.quantize import quantize

    base = build_random(spec)
    models = {}
    for name, kw, _ in SCHEMES:
        m = base if kw is None else copy.deepcopy(base)
        if kw:
            quantize(m, group_size=128, **kw)
        models[name] = m
        gc.collect()
    return models


def predict(plan, hw, flags: list[str]) -> tuple[float, float]:
    """(roofline, expected) tokens/s of ``smoe plan`` with ``flags`` on ``hw``."""
    from smoe.plan.roofline import Schemes, hardware_plan

    f = dict(zip(flags[::2], flags[1::2]))
    out = hardware_plan(plan, hw, schemes=Schemes(f["--weights"], f.get("--experts"),
                                                  f.get("--attention")),
                        context=PROMPT + STEPS, kv_dtype="fp32", compare_offload=False)
    return out["decode_tokens_per_s"], out["decode_expected"]["tokens_per_s"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--write", action="store_true", help="replace the block in BENCHMARKS.md")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from smoe.plan import plan_from_path
    from smoe.plan.gpus import measure_cpu

    load = os.getloadavg()[0]
    flops = measure_cpu(measure_bandwidth=False).flops   # once (batch-1 decode: unused)
    specs = {"large (quant.py)": LARGE, "wide": WIDE}
    models = {name: build(spec) for name, spec in specs.items()}
    rows = [(mn, sn, flags) for mn in specs for sn, _, flags in SCHEMES]
    got: dict[tuple, list[float]] = {r[:2]: [] for r in rows}
    pred: dict[tuple, list[tuple[float, float]]] = {r[:2]: [] for r in rows}
    hws = []
    with tempfile.TemporaryDirectory() as tmp:
        plans = {mn: plan_from_path(run_folder(spec, Path(tmp) / mn.split()[0]))
                 for mn, spec in specs.items()}
        # Each round measures the hardware (bandwidth, kernel rates, overhead) and then every
        # model, so the calibration and the decode it predicts see the same machine load.
        for r in range(a.rounds + 1):
            hw = replace(measure_cpu(measure_decode=True, measure_flops=False), flops=flops)
            order = rows[r % len(rows):] + rows[:r % len(rows)]
            for mn, sn, flags in order:
                tps = 1 / decode_step_seconds(models[mn][sn], STEPS, PROMPT)
                if r:
                    got[(mn, sn)].append(tps)
                    pred[(mn, sn)].append(predict(plans[mn], hw, flags))
            if r:
                hws.append(hw)
    load_end = os.getloadavg()[0]
    med = statistics.median
    bw = med(h.bandwidth for h in hws)
    rates = ", ".join(f"{k} {med(h.kernel_rates[k] for h in hws) / 1e9:.1f}"
                      for k in hws[0].kernel_rates)
    overhead = med(h.layer_overhead for h in hws)
    lines = [f"Command: `python benchmarks/plan_check.py {' '.join(sys.argv[1:])}`; torch "
             f"{torch.__version__}, 1 thread; load average {load:.1f} at start, {load_end:.1f} "
             f"at the end, on {os.cpu_count()} cores. Measured here (medians over the rounds): "
             f"read bandwidth {bw / 1e9:.1f} GB/s; batch-1 kernel rates (GB/s of stored weights, "
             f"4096x1024 matrices from DRAM): {rates}; decode overhead {overhead * 1e6:.0f} us "
             "per layer (hidden-64 calibration model).", "",
             "Each prediction is `smoe plan RUN --gpu cpu FLAGS --kv-dtype fp32 --context "
             f"{PROMPT + STEPS} --json` on the model's run folder (`decode_tokens_per_s`: the "
             "roofline; `decode_expected.tokens_per_s`: kernel rates + overhead). Every round "
             "re-measures the hardware and then decodes every model (order rotated), so each "
             "prediction and its measurement see the same load; the table gives medians over "
             f"{a.rounds} rounds, and the ratios are medians of the per-round ratios.", "",
             "| model | weights | measured tokens/s | roofline tokens/s | measured / roofline | "
             "expected tokens/s | measured / expected | within 30% |",
             "|---|---|---|---|---|---|---|---|"]
    for mn, sn, _ in rows:
        g, pr = got[(mn, sn)], pred[(mn, sn)]
        r_roof = med(x / p[0] for x, p in zip(g, pr))
        r_exp = med(x / p[1] for x, p in zip(g, pr))
        ok = "yes" if abs(r_exp - 1) <= 0.3 else "no"
        lines.append(f"| {mn} | {sn} | {med(g):.1f} | {med(p[0] for p in pr):.1f} | "
                     f"{r_roof:.2f} | {med(p[1] for p in pr):.1f} | {r_exp:.2f} | {ok} |")
    text = "\n".join(lines)
    print(text)
    if a.write:
        from smoe.bench import write_section

        write_section(ROOT / "BENCHMARKS.md", text, "<!-- plan-check:start -->",
                      "<!-- plan-check:end -->")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
