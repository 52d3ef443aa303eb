"""``make demo`` / ``python -m smoe.demo``: train tiny-moe on the default two-domain corpus
(English prose + Python source) in a few minutes on a CPU, then report what it learned.

It trains into ``runs/demo`` (an earlier demo run there is replaced), then prints the
validation loss and bits per byte (overall and per domain), the per-expert load table, how
each domain's tokens are routed, a generated sample from a prose and a code prompt, and writes
``runs/demo/expert_load.png``. Everything it prints comes from the library (``smoe.train``,
``smoe.monitor``); the same run can be continued or queried with the ``smoe`` command.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["main", "DEMO_TRAIN", "DEMO_MODEL", "PROMPTS"]

#: The demo's training settings (tiny-moe: 4 layers, 8 experts top-2, byte tokens).
DEMO_TRAIN = dict(steps=800, batch_size=32, seq_len=128, lr=3e-3, min_lr=3e-4, warmup_steps=30,
                  eval_every=200, eval_batches=8, checkpoint_every=0, log_every=10, seed=0)
#: The demo model declares the context it is trained at (the preset's 256 would promise
#: positions 128-255, which it never sees: its loss there is more than twice that at 64-128).
DEMO_MODEL = {"model": {"max_seq_len": DEMO_TRAIN["seq_len"]}}
#: (domain, prompt) pairs continued after training.
PROMPTS = (
    ("prose", "\"I cannot think,\" said Elizabeth, "),
    ("code", "def read_lines(path):\n    "),
)


def _replaceable(out: Path) -> bool:
    """An absent or empty folder, or an earlier demo run (ours to replace)."""
    from smoe.runs import is_smoe_run, read_run_config

    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return True
    return is_smoe_run(out) and bool(read_run_config(out).get("demo"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smoe.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    parser.add_argument("--steps", type=int, default=DEMO_TRAIN["steps"])
    parser.add_argument("--max-new-tokens", type=int, default=90,
                        help="new bytes per sample (prompt + these fit the 128-byte context)")
    args = parser.parse_args(argv)
    if argv is None:  # run as a program: preload tcmalloc (faster CPU training, same results)
        from smoe.launch import reexec_with_tcmalloc

        reexec_with_tcmalloc()

    from smoe.data import DataConfig
    from smoe.monitor import plot_expert_load
    from smoe.train import TrainConfig, start_run
    from smoe.evaluation import format_eval
    from smoe.monitor.report import format_domain_routing
    from smoe.runs import LoadedRun, generate_text, read_run_config

    out = Path(args.out)
    if not _replaceable(out):
        print(f"smoe demo: error: {out} holds something other than an earlier demo run; "
              "move it away or pass --out NEW_FOLDER", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    train = TrainConfig(**{**DEMO_TRAIN, "steps": args.steps})
    print(f"smoe demo: training tiny-moe for {train.steps} steps of {train.batch_size} x "
          f"{train.seq_len} byte tokens (its context) on English prose + Python code, into "
          f"{out}/")
    try:
        result = start_run(out, train, preset="tiny-moe", data=DataConfig(tokenizer="byte"),
                           replace=True, extra={"demo": True}, model_overrides=DEMO_MODEL)
    except FileNotFoundError as exc:  # the default corpus's prose package is missing
        print(f"smoe demo: error: {exc}", file=sys.stderr)
        return 2
    ev = result.last_eval
    run = LoadedRun(out, result.model, result.tokenizer, read_run_config(out), result.step)

    print()
    print(format_eval(ev))
    if "domain_routing" in ev:
        print("\nexpert load by domain (share of each domain's routed tokens):")
        print(format_domain_routing(ev["domain_routing"], ev.get("moe_layers")))
    print()
    for domain, prompt in PROMPTS:
        text = generate_text(run, prompt, args.max_new_tokens, temperature=0.8, top_p=0.95,
                             seed=0)
        print(f"--- sample ({domain} prompt, temperature 0.8, top-p 0.95, seed 0) ---")
        print(prompt + text)
        print()
    if "val_expert_load" in ev:
        try:
            png = plot_expert_load(ev["val_expert_load"], out / "expert_load.png",
                                   layers=ev.get("moe_layers"),
                                   domain_routing=ev.get("domain_routing"),
                                   title=f"tiny-moe after {result.step} steps: expert load per "
                                         "layer on validation (% of routed tokens)")
            print(f"expert load plot: {png}")
        except ImportError as exc:  # matplotlib is the optional `plot` extra
            print(f"expert load plot skipped: {exc}")
    print(f"run folder: {out}/ (metrics.jsonl, tb/, checkpoint/); try:\n"
          f"  smoe generate {out} --prompt \"Emma was\" --max-new-tokens 100\n"
          f"  smoe eval {out} --by-domain")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s (training {result.elapsed_s:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
