"""Single-device MoE math: routers, dispatch, experts, losses and the layer. Imports torch only."""

from smoe.nn.dispatch import Assignments, combine, plan_assignments, plan_assignments_reference
from smoe.nn.experts import DenseMLP, Experts, activate
from smoe.nn.losses import load_balancing_loss, sequence_balance_loss, z_loss
from smoe.nn.moe import MoEInfo, MoELayer
from smoe.nn.router import Router, RouterOutput

__all__ = [
    "Assignments", "combine", "plan_assignments", "plan_assignments_reference",
    "DenseMLP", "Experts", "activate",
    "load_balancing_loss", "sequence_balance_loss", "z_loss",
    "MoEInfo", "MoELayer", "Router", "RouterOutput",
]
