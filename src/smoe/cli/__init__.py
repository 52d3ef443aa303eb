"""The ``smoe`` command line: it parses arguments and calls the library, nothing more.

One module per command group (``smoe.cli.train``, ``smoe.cli.plan``, ...); each exposes
``REGISTER``, the functions that add its subcommands to the parser and set ``handler``. Handlers
import what they need lazily so that ``smoe --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from smoe.cli.errors import CLIError

__all__ = ["main", "build_parser", "CLIError", "COMMAND_MODULES"]

Handler = Callable[[argparse.Namespace], int]

#: The command groups, in the order ``smoe --help`` lists them.
COMMAND_MODULES = (
    "smoe.cli.train",
    "smoe.cli.runs",
    "smoe.cli.hf",
    "smoe.cli.plan",
    "smoe.cli.route",
    "smoe.cli.bench",
    "smoe.cli.monitor",
    "smoe.cli.serve",
    "smoe.cli.hybrid",
)


def _version() -> str:
    from smoe import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smoe",
        description="smoe: sparse mixture-of-experts layers, models, training and tools.",
    )
    parser.add_argument("--version", action="version", version=f"smoe {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        for register in importlib.import_module(name).REGISTER:
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

