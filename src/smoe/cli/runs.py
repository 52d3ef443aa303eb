"""`smoe generate` and `smoe eval`: run a trained (or imported) model."""

from __future__ import annotations

import argparse
import os
import sys

from smoe.cli.errors import CLIError
from smoe.cli.options import (add_offload_options, add_runtime_options, apply_runtime,
                              non_negative_int, positive_int)

__all__ = ["register_generate", "register_eval"]


def _read_prompt(a: argparse.Namespace) -> str:
    """--prompt TEXT, --prompt - (stdin), or stdin when it is piped and --prompt is absent."""
    if a.prompt is not None and a.prompt != "-":
        return a.prompt
    if a.prompt is None and sys.stdin.isatty():
        raise CLIError("give --prompt TEXT, or pipe the prompt on stdin (--prompt -)")
    try:
        text = sys.stdin.read()
    except UnicodeDecodeError:
        raise CLIError("the prompt on stdin is not UTF-8 text") from None
    return text[:-1] if text.endswith("\n") else text


def register_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a trained run's model",
                       description="Continue a prompt with RUN_DIR's newest checkpoint, printing "
                                   "the text as it is produced. Generation stops at the end-of-"
                                   "document token, at a --stop string, or at the model's "
                                   "context (said on stderr); a text longer than the sequences "
                                   "the run was trained on is warned about.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--prompt", default=None,
                   help="the text to continue; - or absent with a piped stdin: read stdin")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=positive_int, default=None,
                   help="sample from the K most likely tokens only (default: all)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    p.add_argument("--stop", action="append", default=None, metavar="STR",
                   help="stop before this text (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
    p.add_argument("--no-stream", action="store_true", help="print the text once at the end")
    p.add_argument("--expert-parallel", type=positive_int, default=None, metavar="D",
                   help="under torchrun: shard the experts over D processes (the same tokens "
                   "as one process; rank 0 prints)")
    add_runtime_options(p)
    _add_offload_options(p)
    p.set_defaults(handler=_generate)


def _add_offload_options(p: argparse.ArgumentParser) -> None:
    """--offload FRACTION / --offload-policy / --offload-store / --stats-json (see
    smoe.inference.offload): the same text, with experts served from a memory-mapped store."""
    g = add_offload_options(p)
    g.add_argument("--stats-json", default=None, metavar="PATH",
                   help="write hit rate, bytes moved per token, prefetch precision/recall, "
                        "stall time and tokens/s as JSON")


def _generate(a: argparse.Namespace) -> int:
    if not a.temperature >= 0:
        raise CLIError(f"--temperature {a.temperature} must be >= 0 (0 is greedy)")
    if not 0 < a.top_p <= 1:
        raise CLIError(f"--top-p {a.top_p} must be in (0, 1]")
    if a.stop is not None and any(not s for s in a.stop):
        raise CLIError("--stop needs a non-empty string")
    prompt = _read_prompt(a)
    device = apply_runtime(a)
    from smoe.runs import generate_text, load_run, stderr_log

    run = load_run(a.run_dir, device, a.dtype)
    off = None
    if a.offload is not None:
        if not 0 < a.offload <= 1:
            raise CLIError(f"--offload {a.offload} must be a fraction in (0, 1]")
        if a.expert_parallel is not None:
            raise CLIError("--offload and --expert-parallel cannot be combined yet: give one")
        from smoe.inference.offload import offload

        off = offload(run.model, budget=a.offload, policy=a.offload_policy,
                      store=a.offload_store)
    out, log = sys.stdout, stderr_log
    if a.expert_parallel is not None:
        if _shard_for_generation(run.model, a.expert_parallel):
            out, log = open(os.devnull, "w"), None  # rank 0 alone prints

    def on_text(piece: str) -> None:
        out.write(piece)
        out.flush()

    if not a.no_stream:
        out.write(prompt)
        out.flush()
    import time

    t0 = time.perf_counter()
    try:
        text = generate_text(run, prompt, a.max_new_tokens, temperature=a.temperature,
                             top_p=a.top_p, seed=a.seed, top_k=a.top_k, stop=a.stop or (),
                             on_text=None if a.no_stream else on_text, log=log)
        seconds = time.perf_counter() - t0
    finally:
        if off is not None:
            off.close()
    out.write(prompt + text + "\n" if a.no_stream else "\n")
    out.flush()
    if a.stats_json:
        from smoe.inference.offload import write_stats_json

        new = len(run.tokenizer.encode(text))
        stats = off.stats(seconds) if off is not None else {"policy": None, "seconds": seconds}
        stats.update(new_tokens=new, new_tokens_per_s=new / seconds if seconds > 0 else None)
        write_stats_json(a.stats_json, stats)
    if a.expert_parallel is not None:
        from smoe.parallel.health import shutdown

        shutdown()
    return 0


def _shard_for_generation(model, ep_size: int) -> bool:
    """Join torchrun's group, shard the experts over ``ep_size`` ranks (every rank runs the
    same prompt, so every EP group takes part in every all-to-all); True on ranks other than
    0, which print nothing."""
    from smoe.parallel.expert_parallel import expert_parallel
    from smoe.parallel.launch import is_torchrun, setup

    if not is_torchrun():
        raise CLIError("--expert-parallel needs torchrun: torchrun --nproc_per_node P -m smoe "
                       "generate RUN --expert-parallel D (D divides P)")
    try:
        layout = setup(ep_size)
        expert_parallel(model, layout.ep_group)
    except (ValueError, RuntimeError) as exc:
        raise CLIError(str(exc)) from None
    return layout.rank != 0


def register_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="validation loss, bits per byte and per-expert load of a run")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--eval-batches", type=positive_int, default=None,
                   help="validation batches (default: the run's eval_batches)")
    p.add_argument("--by-domain", action="store_true",
                   help="also print each domain's expert load")
    add_runtime_options(p)
    p.set_defaults(handler=_eval)


def _eval(a: argparse.Namespace) -> int:
    device = apply_runtime(a)
    from smoe.evaluation import eval_run, format_eval
    from smoe.monitor.report import format_domain_routing

    row = eval_run(a.run_dir, a.eval_batches, device=device, dtype=a.dtype)
    print(format_eval(row))
    if a.by_domain and "domain_routing" in row:
        print("expert load by domain (share of each domain's routed tokens):")
        print(format_domain_routing(row["domain_routing"], row.get("moe_layers")))
    return 0


REGISTER = (register_generate, register_eval)
