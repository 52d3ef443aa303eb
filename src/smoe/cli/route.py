"""`smoe route`: one MoE layer on a random batch."""

from __future__ import annotations

import argparse

from smoe.cli.options import add_runtime_options, non_negative_int, positive_int

__all__ = ["register_route"]


def register_route(sub: argparse._SubParsersAction) -> None:
    from smoe.config import ROUTERS

    p = sub.add_parser("route", help="route a random batch through one MoE layer and print the "
                                     "per-expert token counts and losses",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden-size", type=positive_int, default=64)
    p.add_argument("--expert-size", type=positive_int, default=128)
    p.add_argument("--num-experts", type=positive_int, default=8)
    p.add_argument("--top-k", type=positive_int, default=2)
    p.add_argument("--router", default="softmax_topk", choices=ROUTERS, metavar="ROUTER",
                   help=f"one of {', '.join(ROUTERS)}")
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="expert capacity factor (default: dropless)")
    p.add_argument("--tokens", type=non_negative_int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    add_runtime_options(p, dtype_help="the layer's dtype (default float32)")
    p.set_defaults(handler=_run)


def _run(a: argparse.Namespace) -> int:
    from smoe.cli.options import apply_runtime

    device = apply_runtime(a)
    import torch

    from smoe.layer_report import route_report
    from smoe.runs import resolve_dtype

    dtype = resolve_dtype(a.dtype) or torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            print(route_report(hidden_size=a.hidden_size, expert_size=a.expert_size,
                               num_experts=a.num_experts, top_k=a.top_k, router=a.router,
                               capacity_factor=a.capacity_factor, tokens=a.tokens, seed=a.seed))
    finally:
        torch.set_default_dtype(previous)
    return 0


REGISTER = (register_route,)
