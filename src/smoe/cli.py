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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
