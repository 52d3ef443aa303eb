"""Expert parallelism with 4 processes here: rows per rank and forward time, by placement.

    python benchmarks/ep_step.py --run RUN [--write]   # RUN: a trained run (placement.py --train)

Four gloo processes on 127.0.0.1 load RUN's model, shard it with ``expert_parallel`` and run
the same prose batches (each rank its quarter) under three placements: contiguous (E / 4
consecutive experts per rank), planned from the run's validation routing of prose with R = 0
and with R = E / 4 replicas. Reported: the rows each rank's experts processed, as max / mean
over ranks (measured by the dispatcher, summed over layers and batches), and the median wall
time of a forward (no grad) over rounds, the placements interleaved. On a shared 2-core
machine the times are noisy and the experts are a small part of the forward; the row counts
are exact.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

BEGIN, END = "<!-- ep-step:begin -->", "<!-- ep-step:end -->"
SRC = Path(__file__).resolve().parent.parent / "src"
NOTE = ("Here 4 processes share 2 cores, so the forward time follows the total work of all "
        "ranks, not the busiest rank, and the experts are a small part of a forward of this "
        "model: the balance shows in the row counts (what bounds a step when each rank has its "
        "own device), not in these times; R > 0 adds slots (more weights read per rank).")


def _batches(tokenizer, n: int, B: int, T: int) -> list[torch.Tensor]:
    from smoe.data.corpus import prose_corpus

    docs, _ = prose_corpus()
    ids = tokenizer.encode(docs[-1].text[-(n * B * T * 2):])  # the last novel's end
    ids = torch.tensor(ids[:n * B * T], dtype=torch.long)
    return list(ids.view(n, B, T))


def worker(run: str, out: str, rounds: int) -> None:
    import torch.distributed as dist

    from smoe.parallel.expert_parallel import CommCounter, apply_placement, expert_parallel
    from smoe.parallel.health import init_process_group, shutdown
    from smoe.parallel.placement import Placement, plan_placement
    from smoe.runs import load_run

    torch.set_num_threads(1)
    init_process_group("gloo", timeout_s=120)
    rank, world = dist.get_rank(), dist.get_world_size()
    loaded = load_run(run)
    model = loaded.model.eval()
    rows = [json.loads(line) for line in Path(run, "metrics.jsonl").read_text().splitlines()]
    prose_LE = torch.tensor([r for r in rows if "domain_routing" in r][-1]
                            ["domain_routing"]["prose"], dtype=torch.float64)
    E = prose_LE.shape[1]
    placements = {"contiguous": [Placement.contiguous(E, world)] * len(prose_LE),
                  "planned R=0": [plan_placement(load, world, 0) for load in prose_LE],
                  f"planned R={E // 4}": [plan_placement(load, world, E // 4)
                                          for load in prose_LE]}
    counter = CommCounter()
    ep = expert_parallel(model, dist.group.WORLD, counter=counter)
    batches = _batches(loaded.tokenizer, 4, 8, 128)
    b = batches[0].shape[0] // world
    times = {k: [] for k in placements}
    rows_per_rank = {}
    for name, p in placements.items():  # exact row counts, one pass
        apply_placement(model, ep, p)
        counter.reset()
        with torch.no_grad():
            for x in batches:
                model(x[rank * b:(rank + 1) * b])
        got = torch.tensor(counter.history, dtype=torch.float64)  # (batch, layer) order
        all_ = [torch.zeros_like(got) for _ in range(world)]
        dist.all_gather(all_, got)
        per_PL = torch.stack(all_).view(world, len(batches), -1).sum(1)  # rank x layer
        rows_per_rank[name] = (per_PL.max(0).values / per_PL.mean(0)).tolist()
    for _ in range(rounds):  # interleaved timing
        for name, p in placements.items():
            apply_placement(model, ep, p)
            dist.barrier()
            t0 = time.perf_counter()
            with torch.no_grad():
                for x in batches:
                    model(x[rank * b:(rank + 1) * b])
            dist.barrier()
            times[name].append(time.perf_counter() - t0)
    if rank == 0:
        Path(out).write_text(json.dumps({"rows": rows_per_rank, "times": times,
                                         "E": E, "world": world, "step": loaded.step}))
    shutdown()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.run, a.worker, a.rounds)
        return 0
    out = Path(a.run) / "ep_step.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, __file__, "--run", a.run, "--rounds",
                               str(a.rounds), "--worker", str(out)],
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE="4",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                                       PYTHONPATH=str(SRC), OMP_NUM_THREADS="1"))
             for r in range(4)]
    try:
        codes = [p.wait(timeout=1200) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(codes):
        print(f"workers exited {codes}", file=sys.stderr)
        return 1
    res = json.loads(out.read_text())
    lines = [BEGIN, "## Expert parallelism with 4 processes: rows per rank and forward time",
             "", f"`python benchmarks/ep_step.py --run RUN --rounds {a.rounds} --write`; RUN = "
             f"the E{res['E']} model of the placement table (step {res['step']}), 4 gloo "
             "processes on this 2-core machine, 4 prose batches of 8 x 128 tokens per forward "
             "(each rank 2 sequences), no grad. Rows: tokens routed to each rank's experts, "
             "summed over batches, per layer, as counted by the dispatcher. The planned placements "
             "come from the run's validation routing of prose; the batches are other prose.", "",
             "| placement | rows per rank, max / mean (avg over layers, worst) | forward, "
             "median s | vs contiguous |",
             "|---|---|---|---|"]
    base = statistics.median(res["times"]["contiguous"])
    for name, rows in res["rows"].items():
        t = statistics.median(res["times"][name])
        lines.append(f"| {name} | {statistics.mean(rows):.3f} ({max(rows):.3f}) | {t:.3f} | "
                     f"{t / base:.2f} |")
    lines += ["", NOTE, END]
    text = "\n".join(lines)
    print(text)
    if a.write:  # in place between the markers, atomically (smoe.bench.write_section)
        from smoe.bench import write_section

        body = text.replace(BEGIN, "").replace(END, "").strip()
        write_section(Path(__file__).resolve().parent.parent / "BENCHMARKS.md", body, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
