"""`smoe generate` and `smoe eval`: run a trained (or imported) model."""

from __future__ import annotations

import argparse

__all__ = ["register_generate", "register_eval"]


def register_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a trained run's model")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")

    def run(a: argparse.Namespace) -> int:
        from smoe.runs import generate_text

        text = generate_text(a.run_dir, a.prompt, a.max_new_tokens, temperature=a.temperature,
                             top_p=a.top_p, seed=a.seed)
        print(a.prompt + text)
        return 0

    p.set_defaults(handler=run)



def register_eval(sub: argparse._SubParsersAction) -> None:
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


REGISTER = (register_generate, register_eval,)
