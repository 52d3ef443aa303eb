"""Single-device MoE math: routers, dispatch, experts, losses and the layer. Imports torch only."""

from smoe.nn.dispatch import (Assignments, Dispatched, LocalDispatcher, combine, plan_assignments,
                              plan_assignments_reference)
from smoe.nn.experts import (EXPERTS_BACKENDS, DenseMLP, Experts, ExpertsBase, StackedWeights,
                             activate, register_experts_backend)
from smoe.nn.losses import load_balancing_loss, sequence_balance_loss, z_loss
from smoe.nn.moe import MoEInfo, MoELayer
from smoe.nn.reference import moe_reference, reference_routed
from smoe.nn.router import Router, RouterOutput

__all__ = [
    "Assignments", "Dispatched", "LocalDispatcher", "combine", "plan_assignments",
    "plan_assignments_reference",
    "EXPERTS_BACKENDS", "DenseMLP", "Experts", "ExpertsBase", "StackedWeights", "activate",
    "register_experts_backend",
    "load_balancing_loss", "sequence_balance_loss", "z_loss",
    "MoEInfo", "MoELayer", "moe_reference", "reference_routed", "Router", "RouterOutput",
]
