"""`smoe bench`: the layer benchmark against the peers."""

from __future__ import annotations

import argparse
import sys

__all__ = ["register_bench"]


def register_bench(sub: argparse._SubParsersAction) -> None:
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


REGISTER = (register_bench,)
