"""`smoe route`: one MoE layer on a random batch."""

from __future__ import annotations

import argparse

__all__ = ["register_route"]


def register_route(sub: argparse._SubParsersAction) -> None:
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


REGISTER = (register_route,)
