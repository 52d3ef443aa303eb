"""Cost of the routing monitor: a model's forward with a RoutingMonitor attached against the
same model without, interleaved in one process (medians over rounds, rotating order).

Cases: a prefill forward (B x T tokens) and a decode step (B rows of one token, the CPU decode
shortcut) on the tiny-moe and small-moe presets, monitor with and without co-selection counts.
Goal (issue 12): at most 3% of a forward's time.

    python benchmarks/monitor_overhead.py --write     # appends its section to BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _median_rounds(candidates: dict, rounds: int, warmup: int = 3) -> dict[str, float]:
    names = list(candidates)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t = time.perf_counter()
            candidates[n]()
            dt = time.perf_counter() - t
            if r >= warmup:
                times[n].append(dt)
    return {n: statistics.median(v) for n, v in times.items()}


def measure(preset_name: str, batch: int, seq: int, rounds: int, reps: int) -> list[str]:
    import torch

    from smoe.config import preset
    from smoe.model import SMoETransformer
    from smoe.monitor import RoutingMonitor

    torch.manual_seed(0)
    model = SMoETransformer(preset(preset_name, max_seq_len=max(seq, 8))).eval()
    V = model.config.vocab_size
    prefill = torch.randint(0, V, (batch, seq))
    decode = torch.randint(0, V, (1, 1))
    monitors = {"off": None,
                "on": RoutingMonitor(window_tokens=4096),
                "on + co-selection": RoutingMonitor(window_tokens=4096, co_selection=True)}
    monitors["on"].co_selection_enabled = False
    rows = []
    for case, x in (("prefill", prefill), ("decode", decode)):
        def run(mon, x=x):
            for m in monitors.values():
                if m is not None and m.attached:
                    m.detach()
            if mon is not None:
                mon.attach(model.moe_layers())
            with torch.no_grad():
                t = time.perf_counter()
                for _ in range(reps):
                    model(x)
                if mon is not None:
                    mon.counts()  # the batched flush is paid inside the timed region
                return time.perf_counter() - t

        candidates = {name: (lambda m=m: run(m)) for name, m in monitors.items()}
        med = _median_rounds(candidates, rounds)
        base = med["off"]
        for name in monitors:
            rows.append(f"| {preset_name} | {case} {tuple(x.shape)} | {name} | "
                        f"{1e3 * med[name] / reps:.3f} | {100 * (med[name] / base - 1):+.1f}% |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=10, help="forwards per timed call")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--presets", default="tiny-moe,small-moe")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)

    lines = ["## Routing monitor overhead", "",
             f"`python benchmarks/monitor_overhead.py --rounds {a.rounds} --reps {a.reps} "
             f"--batch {a.batch} --seq {a.seq}" + (f" --threads {a.threads}" if a.threads else "")
             + f"` on {platform.processor() or platform.machine()},"
             f" {torch.get_num_threads()} threads, torch {torch.__version__}. Median time per "
             "forward over interleaved rounds; the difference is against the same model with no "
             "monitor attached (differences of a few percent are within this machine's noise). "
             "Each "
             "timed call ends with a read of the counts, so the monitor's batched flush (at most "
             "every 256 layer-forwards in use) is paid every `reps` forwards: an upper bound.",
             "", "| preset | forward | monitor | ms / forward | vs off |", "|---|---|---|---|---|"]
    for name in a.presets.split(","):
        lines += measure(name, a.batch, a.seq, a.rounds, a.reps)
    text = "\n".join(lines)
    print(text)
    if a.write:
        from smoe.bench import write_section

        write_section(ROOT / "BENCHMARKS.md", text, "<!-- monitor-overhead:start -->",
                      "<!-- monitor-overhead:end -->")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
