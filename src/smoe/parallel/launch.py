"""Running an expert-parallel model under torchrun: groups, gradient sums, consolidated weights.

Layout: W = torchrun's world size = DP x EP. Ranks ``d*EP .. d*EP+EP-1`` form expert-parallel
group d (one full copy of the experts, spread over EP ranks); ranks with the same position in
their EP group form a data-parallel group (they hold the same experts).

Loss scaling: each rank's loss is the mean over its own batch, every rank's batch the same
size, and the objective is the mean over the global batch: the mean of the ranks' losses. So
every gradient is the sum over the ranks that contributed to it, divided by W:

* non-expert parameters (attention, norms, router, shared experts): one all-reduce over the
  world, then / W;
* expert parameters: the all-to-all's backward already summed the EP group's contributions on
  the rank holding the slot; the slots holding the same logical expert (the DP replicas, and
  the redundant replicas of a placement) are summed by one all-reduce of a [E, ...] buffer
  per parameter, then / W. Replicas so keep equal weights after every optimizer step.

Router-bias balancing (DeepSeek-V3's auxiliary-loss-free method): loads are all-reduced over
the world before the bias update, so every rank applies the same update the single-process run
would (:func:`update_router_biases`).

Checkpoints: :func:`consolidated_state_dict` gathers the full model (every expert) so rank 0
writes one ordinary safetensors file that any layout (EP 1, 2, 4, ...) reads back with
:func:`load_consolidated`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from smoe.parallel.expert_parallel import ExpertParallel
from smoe.parallel.health import guarded, init_process_group

__all__ = ["ParallelLayout", "setup", "sync_gradients", "update_router_biases",
           "all_reduce_expert_loads", "owner_mask", "scatter_to_experts",
           "consolidated_state_dict", "load_consolidated", "is_torchrun"]


def is_torchrun() -> bool:
    """Started by torchrun (or anything that sets its environment)?"""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_PORT"))


@dataclass
class ParallelLayout:
    rank: int
    world_size: int
    ep_size: int
    ep_group: object
    dp_group: object

    @property
    def dp_size(self) -> int:
        return self.world_size // self.ep_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep_size

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size


def setup(ep_size: int, backend: str | None = None, timeout_s: float = 300.0) -> ParallelLayout:
    """Join torchrun's process group (gloo on CPU, NCCL when CUDA is available) and build the
    DP x EP groups. Every rank must call it."""
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        init_process_group(backend, timeout_s=timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"--expert-parallel {ep_size} must divide the number of processes "
                         f"({world}): DP x EP = world size")
    ep_groups = [dist.new_group(list(range(d * ep_size, (d + 1) * ep_size)))
                 for d in range(world // ep_size)]
    dp_groups = [dist.new_group(list(range(e, world, ep_size))) for e in range(ep_size)]
    return ParallelLayout(rank, world, ep_size, ep_groups[rank // ep_size],
                          dp_groups[rank % ep_size])


def scatter_to_experts(p: torch.Tensor, slots: torch.Tensor, E: int,
                       values: torch.Tensor) -> torch.Tensor:
    """An [E, ...] tensor holding ``values`` (one row per local slot) at the slots' logical
    experts, zeros elsewhere (replicas on one rank add up); all-reduce it to gather."""
    buf = values.new_zeros((E,) + tuple(values.shape[1:]))
    return buf.index_add_(0, slots.to(values.device), values)


@torch.no_grad()
def sync_gradients(model: torch.nn.Module, ep: ExpertParallel, group=None) -> None:
    """Sum every gradient over the ranks that contributed to it and divide by the world size
    (see the module docstring). Call after backward, before clipping and the optimizer step."""
    group = dist.group.WORLD if group is None else group
    W = dist.get_world_size(group)
    experts = ep.expert_param_names()
    dense = [(n, p) for n, p in model.named_parameters() if n not in experts and p.requires_grad]
    if dense:
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for _, p in dense])
        guarded("all-reduce of gradients", dist.all_reduce, flat, group=group)
        flat /= W
        offset = 0
        for _, p in dense:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n
    params = dict(model.named_parameters())
    for name, lay in experts.items():
        p = params[name]
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        buf = scatter_to_experts(p, lay.slots, lay.placement.num_experts, g)
        guarded("all-reduce of expert gradients", dist.all_reduce, buf, group=group)
        p.grad = buf.index_select(0, lay.slots.to(buf.device)) / W


@torch.no_grad()
def all_reduce_expert_loads(model: torch.nn.Module, group=None) -> None:
    """Sum every sigmoid_bias layer's load since the last bias update over ``group`` (default
    the world), in place: one all-reduce of the stacked [L, E] loads."""
    from smoe.parallel.expert_parallel import moe_layers_of

    layers = [lay for _, lay in moe_layers_of(model) if lay.load_since_update is not None]
    if not layers:
        return
    loads_LE = torch.stack([lay.load_since_update for lay in layers])
    guarded("all-reduce of expert loads", dist.all_reduce, loads_LE,
            group=dist.group.WORLD if group is None else group)
    for lay, row in zip(layers, loads_LE):
        lay.load_since_update.copy_(row)


def update_router_biases(model: torch.nn.Module, group=None) -> None:
    """The auxiliary-loss-free bias step on the global batch's loads (all ranks apply the same
    update): all-reduce the loads, then ``model.update_router_biases()``."""
    all_reduce_expert_loads(model, group)
    model.update_router_biases()


def owner_mask(ep: ExpertParallel, lay, group) -> torch.Tensor:
    """Which of this rank's slots write the expert into a consolidated tensor: the first
    replica in the placement, and only in the first EP group (DP rank 0)."""
    first_group = min(dist.get_process_group_ranks(ep.group)) == \
        min(dist.get_process_group_ranks(group))
    table, _ = lay.placement.slot_table()
    S = lay.placement.slots_per_rank
    mine = torch.arange(ep.rank * S, (ep.rank + 1) * S)
    first = table[lay.slots, 0]
    return (first == mine) & torch.tensor(first_group)


@torch.no_grad()
def consolidated_state_dict(model: torch.nn.Module, ep: ExpertParallel, group=None, *,
                            grads: bool = False) -> dict[str, torch.Tensor]:
    """The full model's tensors (every expert) on every rank, as a single process would have
    them: parameters, or with ``grads=True`` their gradients. One all-reduce per expert
    parameter; the rest is already replicated."""
    group = dist.group.WORLD if group is None else group
    experts = ep.expert_param_names()
    out: dict[str, torch.Tensor] = {}
    if grads:
        items = [(n, p.grad if p.grad is not None else torch.zeros_like(p))
                 for n, p in model.named_parameters()]
    else:
        items = list(model.state_dict().items())
    for name, t in items:
        lay = experts.get(name)
        if lay is None:
            out[name] = t.detach().clone()
            continue
        keep = owner_mask(ep, lay, group).to(t.device)
        vals = t.detach() * keep.view((-1,) + (1,) * (t.dim() - 1)).to(t.dtype)
        buf = scatter_to_experts(t, lay.slots, lay.placement.num_experts, vals)
        guarded("all-reduce of expert weights", dist.all_reduce, buf, group=group)
        out[name] = buf
    return out


@torch.no_grad()
def load_consolidated(model: torch.nn.Module, ep: ExpertParallel,
                      state: dict[str, torch.Tensor]) -> None:
    """Load a consolidated (single-process layout) state dict into a sharded model: every
    rank takes its slots of each expert parameter."""
    experts = ep.expert_param_names()
    local = {}
    for name, t in state.items():
        lay = experts.get(name)
        local[name] = t if lay is None else t.index_select(0, lay.slots.to(t.device))
    model.load_state_dict(local)
