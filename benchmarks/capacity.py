"""The capacity-versus-compute experiment: does an SMoE model reach its dense twin's quality in
fewer steps when the dense model is capacity-limited?

Models (presets in smoe.config; byte tokens, the default two-domain corpus):
  micro-dense       hidden 64, 4 layers, FFN 256                 (the baseline)
  micro-moe         8 experts x 128, top-2: same active FFN      (4x the FFN parameters)
  micro-moe32       32 experts x 128, top-2: same active FFN     (16x; the headline)
  micro-dense-wide  FFN 1024: micro-moe's total at 4x its compute (is capacity the limit?)

Phases (each run is a subprocess writing OUT/<run>/result.json; finished runs are skipped, so an
interrupted experiment resumes where it stopped):
  lr        a short learning-rate check: two rates, dense and MoE, constant schedule;
            the better rate of each family is used below
  arm1      curves: every model with a constant learning rate after warm-up, full length
  arm2      the goal tested literally: each model with its own full cosine schedule; dense at
            the full length, the MoE models at 0.6x (and micro-moe at 0.75x); two seeds
  balance   micro-moe without balancing and with DeepSeek-V3 bias balancing (aux is arm1's)

    python benchmarks/capacity.py --jobs 2            # all phases, then the report
    python benchmarks/capacity.py --report --write    # tables and plots into BENCHMARKS.md

The report (benchmarks/capacity_report.py) adds a whole-validation-split evaluation (bits per
byte, next-byte accuracy, per domain), expert specialisation against a shuffled-label baseline,
one-expert knock-outs, load balance and samples.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(os.environ.get("SMOE_CAPACITY_OUT", ROOT / "benchmarks" / "out" / "capacity"))

DENSE, MOE, MOE32, WIDE = "micro-dense", "micro-moe", "micro-moe32", "micro-dense-wide"
#: The two rates of the learning-rate check (the trainer's default and ~3x it).
LR_CANDIDATES = (3e-3, 1e-2)


@dataclass
class Spec:
    """One training run: preset, schedule, length (a fraction of --steps) and seed."""

    name: str
    phase: str
    preset: str
    schedule: str = "constant"        # "constant" after warm-up, or "cosine" to the run's end
    fraction: float = 1.0             # of --steps (or --lr-steps in the lr phase)
    seed: int = 0
    lr: float | None = None           # None: the rate the lr phase chose for this family
    router: str | None = None
    overrides: dict = field(default_factory=dict)


def family(preset: str) -> str:
    return "moe" if "moe" in preset else "dense"


def specs() -> list[Spec]:
    out = [Spec(f"lr/{p}/{lr:g}", "lr", p, lr=lr) for p in (DENSE, MOE32) for lr in LR_CANDIDATES]
    out += [Spec(f"arm1/{p}", "arm1", p) for p in (DENSE, MOE, MOE32)]
    # The wide control costs 4x a step: a third of the run answers "is capacity the limit?".
    out.append(Spec(f"arm1/{WIDE}", "arm1", WIDE, fraction=1 / 3))
    for seed in (0, 1):
        out += [Spec(f"arm2/{DENSE}/s{seed}", "arm2", DENSE, "cosine", 1.0, seed),
                Spec(f"arm2/{MOE32}@0.6/s{seed}", "arm2", MOE32, "cosine", 0.6, seed),
                Spec(f"arm2/{MOE}@0.6/s{seed}", "arm2", MOE, "cosine", 0.6, seed)]
        out.append(Spec(f"arm2/{MOE}@0.75/s{seed}", "arm2", MOE, "cosine", 0.75, seed))
    # Half-length ablations, compared with arm1's micro-moe (aux loss) at the same steps.
    out += [Spec(f"balance/{MOE}/none", "balance", MOE, fraction=0.5,
                 overrides={"aux_loss_coef": 0.0}),
            Spec(f"balance/{MOE}/bias", "balance", MOE, fraction=0.5, router="sigmoid_bias",
                 overrides={"aux_loss_coef": 0.0, "bias_update": True})]
    return out


def run_dir(name: str) -> Path:
    return OUT / name.replace("/", "__").replace("@", "_at_")


def read_result(name: str) -> dict | None:
    path = run_dir(name) / "result.json"
    return json.loads(path.read_text()) if path.exists() else None


def chosen_lr(preset: str) -> float:
    """The better rate of the lr check for this model's family (dense or MoE)."""
    probe = DENSE if family(preset) == "dense" else MOE32
    finals = {}
    for lr in LR_CANDIDATES:
        r = read_result(f"lr/{probe}/{lr:g}")
        if r is None:
            raise RuntimeError(f"the lr phase has not run for {probe} at {lr:g}")
        finals[lr] = r["final_val_loss"]
    return min(finals, key=finals.get)


def train_one(spec: Spec, args: argparse.Namespace) -> dict:
    """Train one run in this process and write its result.json (curves, throughput, load)."""
    import torch

    from smoe.train import TrainConfig
    from smoe.train.metrics import read_metrics
    from smoe.train.run import start_run

    torch.set_num_threads(1)
    device = torch.device(args.device)
    total = args.lr_steps if spec.phase == "lr" else args.steps
    steps = max(1, round(total * spec.fraction))
    lr = spec.lr if spec.lr is not None else chosen_lr(spec.preset)
    # Constant: min_lr == lr makes the cosine flat after warm-up.
    min_lr = lr if spec.schedule == "constant" else lr / 10
    eval_every = max(1, args.steps // args.evals)
    train = TrainConfig(steps=steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=lr,
                        min_lr=min_lr, warmup_steps=args.warmup, eval_every=eval_every,
                        eval_batches=args.eval_batches, checkpoint_every=0, log_every=10,
                        seed=spec.seed, **spec.overrides)
    folder = run_dir(spec.name)
    t0 = time.time()
    result = start_run(folder, train, preset=spec.preset, router=spec.router, replace=True,
                       progress=False, device=device, log=lambda *a: None)
    wall = time.time() - t0
    model = result.model
    rows = read_metrics(folder)
    train_rows = [r for r in rows if "loss" in r and "val_loss" not in r]
    evals = [r for r in rows if "val_loss" in r]
    fpt = model.flops_per_token(args.seq_len)
    tokens_per_step = args.batch_size * args.seq_len
    elapsed = {r["step"]: r["elapsed_s"] for r in train_rows if "elapsed_s" in r}
    curve = [{"step": r["step"], "val_loss": r["val_loss"], "val_bpb": r.get("val_bpb"),
              "flops": 3 * fpt * tokens_per_step * r["step"],
              "wall_s": elapsed.get(r["step"], max((v for s, v in elapsed.items()
                                                    if s <= r["step"]), default=0.0))}
             for r in evals]
    tps = sorted(r["tokens_per_s"] for r in train_rows if r.get("tokens_per_s"))
    tail = [r["loss"] for r in train_rows[-max(1, len(train_rows) // 10):]]
    out = {
        "spec": asdict(spec), "device": _device_name(device), "steps": steps, "lr": lr, "min_lr": min_lr,
        "params_total": model.num_params(), "params_active": model.num_active_params(),
        "flops_per_token_forward": fpt, "tokens_per_step": tokens_per_step,
        "tokens_per_s_median": tps[len(tps) // 2] if tps else None, "wall_s": wall,
        "curve": curve, "final_val_loss": evals[-1]["val_loss"],
        "final_val_bpb": evals[-1].get("val_bpb"),
        "final_train_loss_tail_mean": sum(tail) / len(tail),
        "load_imbalance_curve": [[r["step"], r["load_imbalance"]] for r in train_rows
                                 if "load_imbalance" in r],
        "final_val_expert_load": evals[-1].get("val_expert_load"),
    }
    path = folder / "result.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, path)
    return out


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"{platform.machine()} CPU, one thread"


def _worker_command(spec: Spec, args: argparse.Namespace) -> list[str]:
    return [sys.executable, __file__, "--run-one", spec.name, "--steps", str(args.steps),
            "--lr-steps", str(args.lr_steps), "--batch-size", str(args.batch_size),
            "--seq-len", str(args.seq_len), "--evals", str(args.evals),
            "--eval-batches", str(args.eval_batches), "--warmup", str(args.warmup),
            "--device", args.device]


def run_phases(args: argparse.Namespace) -> None:
    """Run every unfinished run of the chosen phases, ``--jobs`` at a time. The lr phase runs
    first (the others read its choice); within a phase the longest runs start first."""
    sys.path.insert(0, str(ROOT / "src"))
    from smoe.launch import find_tcmalloc

    tcmalloc = find_tcmalloc()
    cost = {DENSE: 1.0, MOE: 1.2, MOE32: 1.25, WIDE: 4.2}  # measured step-time ratios here
    for phases in (["lr"], [p for p in args.phases if p != "lr"]):
        todo = [s for s in specs() if s.phase in phases and s.phase in args.phases
                and read_result(s.name) is None
                and (s.phase == "lr" or not args.only
                     or any(fnmatch.fnmatchcase(s.name, g) for g in args.only))]
        todo.sort(key=lambda s: -cost[s.preset] * s.fraction)
        running: list[tuple[Spec, subprocess.Popen, float]] = []
        while todo or running:
            while todo and len(running) < args.jobs:
                spec = todo.pop(0)
                log = Path(f"{run_dir(spec.name)}.log")
                log.parent.mkdir(parents=True, exist_ok=True)
                # keep a PYTHONPATH the caller set (e.g. a corpus relocation on another machine)
                path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH"))
                                       if p)
                env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
                if tcmalloc:  # the allocator the smoe launcher uses (see smoe.launch)
                    env["LD_PRELOAD"] = tcmalloc
                proc = subprocess.Popen(_worker_command(spec, args), stdout=log.open("w"),
                                        stderr=subprocess.STDOUT, env=env)
                running.append((spec, proc, time.time()))
                print(f"started {spec.name} (pid {proc.pid})", flush=True)
            time.sleep(5)
            for item in list(running):
                spec, proc, t0 = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                r = read_result(spec.name)
                status = (f"final val loss {r['final_val_loss']:.4f}" if r and proc.returncode == 0
                          else f"FAILED (exit {proc.returncode}; see {run_dir(spec.name)}.log)")
                print(f"{spec.name}: {status} after {time.time() - t0:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1500, help="full run length (updates)")
    p.add_argument("--lr-steps", type=int, default=200, help="length of the lr-check runs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--evals", type=int, default=30, help="evaluations over a full-length run")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    p.add_argument("--device", default="cpu",
                   help="where each run trains: cpu, cuda, cuda:N (several jobs may share a GPU)")
    p.add_argument("--phases", nargs="*", default=["lr", "arm1", "arm2", "balance"])
    p.add_argument("--only", nargs="*", default=[], metavar="GLOB",
                   help="train only the runs whose names match (e.g. 'arm2/*/s0'; the lr check "
                        "always runs first): the important runs first when time is short")
    p.add_argument("--report", action="store_true", help="only build the report")
    p.add_argument("--write", action="store_true", help="write the report into BENCHMARKS.md")
    p.add_argument("--no-report", action="store_true", help="train only")
    p.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_one is not None:
        spec = next(s for s in specs() if s.name == args.run_one)
        r = train_one(spec, args)
        print(json.dumps({k: r[k] for k in ("final_val_loss", "wall_s")}))
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.report:
        run_phases(args)
    if args.no_report:
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from capacity_report import build_report

    build_report(args, write=args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
