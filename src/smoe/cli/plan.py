"""`smoe plan`: parameters and memory of a model from its config."""

from __future__ import annotations

import argparse

__all__ = ["register_plan"]


def register_plan(sub: argparse._SubParsersAction) -> None:
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


REGISTER = (register_plan,)
