"""The ``smoe`` command line: it parses arguments and calls the library, nothing more.

Each subcommand is registered by one ``_add_*`` function below; its handler imports what it
needs lazily so that ``smoe --help`` stays fast and needs only torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

__all__ = ["main", "build_parser"]

Handler = Callable[[argparse.Namespace], int]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _version() -> str:
    from smoe import __version__

    return __version__


# --- subcommands ----------------------------------------------------------------------------
# Each _add_* takes the subparsers object and sets ``handler`` as the parser default.

_REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = []


def _registrar(fn: Callable[[argparse._SubParsersAction], None]):
    _REGISTRARS.append(fn)
    return fn


@_registrar
def _add_route(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("route", help="route a random batch through one MoE layer and print the "
                                     "per-expert token counts and losses")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--expert-size", type=int, default=128)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--router", default="softmax_topk")
    p.add_argument("--capacity-factor", type=float, default=None)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)

    def run(a: argparse.Namespace) -> int:
        from smoe.layer_report import route_report

        print(route_report(hidden_size=a.hidden_size, expert_size=a.expert_size,
                           num_experts=a.num_experts, top_k=a.top_k, router=a.router,
                           capacity_factor=a.capacity_factor, tokens=a.tokens, seed=a.seed))
        return 0

    p.set_defaults(handler=run)


@_registrar
def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="total / active parameter counts and weight memory (fp32 to "
                                    "int4) of a Hugging Face MoE model from its config.json alone")
    p.add_argument("config", metavar="CONFIG", help="a config.json, or a folder holding one")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    def run(a: argparse.Namespace) -> int:
        import json

        from smoe.plan import format_plan, plan_from_path

        result = plan_from_path(a.config)
        print(json.dumps(result.to_dict(), indent=2) if a.json else format_plan(result))
        return 0

    p.set_defaults(handler=run)


@_registrar
def _add_train(sub: argparse._SubParsersAction) -> None:
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


@_registrar
def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a trained run's model")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")

    def run(a: argparse.Namespace) -> int:
        from smoe.train import generate_text

        text = generate_text(a.run_dir, a.prompt, a.max_new_tokens, temperature=a.temperature,
                             top_p=a.top_p, seed=a.seed)
        print(a.prompt + text)
        return 0

    p.set_defaults(handler=run)


@_registrar
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="validation loss, bits per byte and per-expert load of a run")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--eval-batches", type=int, default=None,
                   help="validation batches (default: the run's eval_batches)")
    p.add_argument("--by-domain", action="store_true",
                   help="also print each domain's expert load")

    def run(a: argparse.Namespace) -> int:
        from smoe.train import eval_run
        from smoe.train.report import format_domain_routing, format_eval

        row = eval_run(a.run_dir, a.eval_batches)
        print(format_eval(row))
        if a.by_domain and "domain_routing" in row:
            print("expert load by domain (share of each domain's routed tokens):")
            print(format_domain_routing(row["domain_routing"], row.get("moe_layers")))
        return 0

    p.set_defaults(handler=run)


@_registrar
def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time one MoE layer against the dense ideal, transformers' "
                                     "blocks and peers; print (and --write) the tables")
    from smoe.bench import add_arguments

    add_arguments(p)

    def run(a: argparse.Namespace) -> int:
        import shlex

        from smoe.bench import main_from_args

        # Peers come from benchmarks/peers.py of a source checkout, when there is one.
        command = "smoe bench " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] \
            else "smoe bench"
        return main_from_args(a, command=command.strip())

    p.set_defaults(handler=run)


@_registrar
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a run's model in another format (--to hf: a "
                                      "Hugging Face folder transformers loads)",
                       description="Write RUN_DIR's latest checkpoint as OUT_DIR: config.json, "
                                   "model.safetensors and the tokenizer, as the standard "
                                   "transformers architecture that computes the same logits "
                                   "(llama, qwen3, mixtral, qwen3_moe, qwen2_moe or glm4_moe). "
                                   "A model no such architecture expresses exactly is refused.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--to", required=True, choices=("hf",), help="the format (hf)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="new or empty folder")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="cast the weights (default: as trained, float32)")

    def run(a: argparse.Namespace) -> int:
        from smoe.hf.convert import export_hf, format_export

        print(format_export(export_hf(a.run_dir, a.out_dir, dtype=a.dtype), a.run_dir))
        return 0

    p.set_defaults(handler=run)


@_registrar
def _add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="turn a Hugging Face model folder into an smoe run folder",
                       description="Read HF_DIR (config.json and safetensors; llama, qwen3, "
                                   "mixtral, qwen3_moe, qwen2_moe or glm4_moe) and write OUT_DIR "
                                   "as an smoe run at step 0: config.json, checkpoint/ (weights, "
                                   "no optimizer state) and tokenizer.json when smoe can use "
                                   "the model's. Never reads pickle files.")
    p.add_argument("hf_dir", metavar="HF_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR", help="new or empty folder")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "keep"),
                   default="float32", help="the weights' dtype in the run (default float32; "
                                           "keep: as stored)")

    def run(a: argparse.Namespace) -> int:
        from smoe.hf.convert import format_import, import_hf

        dtype = None if a.dtype == "keep" else a.dtype
        print(format_import(import_hf(a.hf_dir, a.out_dir, dtype=dtype), a.hf_dir))
        return 0

    p.set_defaults(handler=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smoe",
        description="smoe: sparse mixture-of-experts layers, models, training and tools.",
    )
    parser.add_argument("--version", action="version", version=f"smoe {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in _REGISTRARS:
        register(sub)
    return parser


#: Subcommands that run long CPU work: the console entry re-executes them with tcmalloc.
_HEAVY_COMMANDS = {"train", "bench", "eval", "generate"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None and args.command in _HEAVY_COMMANDS:
        from smoe.launch import reexec_with_tcmalloc

        reexec_with_tcmalloc()
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0
    try:
        return int(handler(args) or 0)
    except (CLIError, ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"smoe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `smoe plan ... | head`: the reader left, not an error
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
