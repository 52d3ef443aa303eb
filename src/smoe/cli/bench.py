"""`smoe bench`: the layer benchmark against the peers."""

from __future__ import annotations

import argparse
import sys

from smoe.cli.errors import CLIError

__all__ = ["register_bench"]


def register_bench(sub: argparse._SubParsersAction) -> None:
    from smoe.cli import wants_full_parser

    p = sub.add_parser("bench", help="time one MoE layer against the dense ideal, transformers' "
                                     "blocks and peers; print (and --write) the tables")
    if wants_full_parser("bench"):
        from smoe.bench import add_arguments  # imports torch: only when bench is the command

        add_arguments(p)
    p.set_defaults(handler=_run)


def _run(a: argparse.Namespace) -> int:
    import shlex

    from smoe.bench import main_from_args

    if a.threads < 1:
        raise CLIError(f"--threads {a.threads} must be >= 1")
    # Peers come from benchmarks/peers.py of a source checkout, when there is one.
    command = "smoe bench " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] \
        else "smoe bench"
    return main_from_args(a, command=command.strip())


REGISTER = (register_bench,)
