"""`smoe train`: train a preset into a run folder, or resume one."""

from __future__ import annotations

import argparse
import sys

from smoe.cli.errors import CLIError

__all__ = ["register_train"]


def register_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model into a run folder (or --resume one)",
                       description="Train a preset on the default corpus (or --data) into RUN_DIR: "
                                   "config.json, tokenizer.json, metrics.jsonl, tb/, checkpoint/. "
                                   "The same seed and data give the same losses; a run stopped "
                                   "at any point continues exactly with --resume. With "
                                   "--init-from SRC_RUN_DIR the new run starts from another "
                                   "run's (or an `smoe import` folder's) model, weights and "
                                   "tokenizer, at step 0 with a fresh optimizer and schedule.")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder (new or empty; "
                   "with --resume an existing run)")
    p.add_argument("--preset", default=None, help="model preset (default tiny-moe)")
    p.add_argument("--steps", type=int, default=None, help="optimizer updates (default 200)")
    p.add_argument("--data", action="append", default=None, metavar="PATH",
                   help="a text file or folder (repeatable); default: the built-in two-domain "
                        "corpus")
    p.add_argument("--tokenizer", choices=("byte", "bpe"), default=None,
                   help="byte (default) or a BPE trained on the train split")
    p.add_argument("--router", default=None, help="replace the preset's MoE router")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="sequences per update")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=None, help="final learning rate "
                   "(default lr / 10)")
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per update "
                   "(must divide --batch-size)")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--eval-batches", type=int, default=None)
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--log-every", type=int, default=None)
    p.add_argument("--bf16", action="store_true", default=None,
                   help="bfloat16 autocast for the forward passes")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint")
    p.add_argument("--init-from", default=None, metavar="SRC_RUN_DIR",
                   help="start a new run from this run's model config, latest weights and "
                        "tokenizer (a trained run or an `smoe import` folder); the model comes "
                        "from there, so no --preset/--router")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(a: argparse.Namespace) -> int:
        from smoe.data import DataConfig
        from smoe.train import TrainConfig, TrainingDiverged, resume_run, start_run
        from smoe.train.report import format_eval

        given = {"steps": a.steps, "batch_size": a.batch_size, "seq_len": a.seq_len,
                 "lr": a.lr, "min_lr": a.min_lr, "warmup_steps": a.warmup_steps,
                 "grad_accum": a.grad_accum, "eval_every": a.eval_every,
                 "eval_batches": a.eval_batches, "checkpoint_every": a.checkpoint_every,
                 "log_every": a.log_every, "seed": a.seed, "bf16": a.bf16}
        given = {k: v for k, v in given.items() if v is not None}
        try:
            if a.resume and a.init_from is not None:
                raise CLIError("--init-from starts a new run and --resume continues one: give "
                               "one of them")
            if a.resume:
                result = resume_run(a.out, given, progress=not a.no_progress,
                                    expect={"preset": a.preset, "router": a.router,
                                            "tokenizer": a.tokenizer, "data": a.data})
            else:
                if "lr" in given and "min_lr" not in given:
                    given["min_lr"] = given["lr"] / 10
                tokenizer = a.tokenizer
                if a.init_from is not None and tokenizer is None:
                    from smoe.train.run import init_tokenizer_kind

                    tokenizer = init_tokenizer_kind(a.init_from)
                    if tokenizer is None:
                        raise CLIError(f"{a.init_from} has no tokenizer.json: pass --tokenizer "
                                       "byte to train its model on bytes (257 ids; the model's "
                                       "vocabulary must hold them)")
                data = DataConfig(paths=tuple(a.data or ()), tokenizer=tokenizer or "byte")
                result = start_run(a.out, TrainConfig(**given), preset=a.preset, data=data,
                                   router=a.router, progress=not a.no_progress,
                                   init_from=a.init_from)
        except TrainingDiverged as exc:
            raise CLIError(f"{exc}; the last checkpoint in {a.out} is intact") from None
        except KeyboardInterrupt:
            print(f"\ninterrupted: continue with `smoe train --out {a.out} --resume`",
                  file=sys.stderr)
            return 130
        if result.last_eval is not None:
            print(format_eval(result.last_eval))
        print(f"trained to step {result.step} in {result.elapsed_s:.1f} s; run folder "
              f"{result.run_dir}")
        return 0

    p.set_defaults(handler=run)


REGISTER = (register_train,)
