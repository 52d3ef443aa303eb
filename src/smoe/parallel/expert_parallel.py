"""Expert parallelism: an all-to-all dispatcher and each rank's slice of the experts, applied to a
built model (native smoe or transformers patched by ``smoe.hf.patch``) by
:func:`expert_parallel`. ``smoe.nn`` and ``smoe.model`` know nothing of it.

Legend: T this rank's tokens, D hidden, E logical experts, P ranks of the expert-parallel (EP)
group, S expert slots per rank (E / P, or (E + R) / P with R redundant replicas, see
``placement``), A this rank's kept (token, expert) rows, B rows this rank receives for its slots.

One MoE layer under EP (Lepikhin et al. 2020, GShard, arXiv 2006.16668; the uneven-split form of
DeepSpeed-MoE / Megatron's "alltoall" token dispatcher):

1. route locally; plan the rows (capacity over the EP group's global batch, below);
2. give each row a slot (a replicated expert's rows are dealt round-robin to its replicas) and
   sort the rows by slot, i.e. by destination rank then local slot;
3. all-to-all the counts per (rank, slot) [P*S integers], then all-to-all the rows with uneven
   splits (``torch.distributed.nn.functional.all_to_all_single``: autograd flows back through
   the reverse all-to-all);
4. order the received rows by local slot and run the local experts;
5. reverse all-to-all the outputs, undo the sort, weight and scatter-add to tokens.

Capacity (``capacity_factor`` set) is per expert over the EP group's global batch, exactly as one
process running the concatenated batch (rank 0's tokens first) would apply it: every rank
all-gathers the routing decisions (experts and weights, T*K each; no hidden states), computes
the global plan, and keeps its own rows. The cost is one all-gather of T*K ids and weights per
layer; the result does not depend on the layout.

Expert choice routing is refused (an expert's choice over the global batch would need the
gathered scores of every token: not implemented).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

# torch 2.13 marks the autograd all-to-all deprecated in favour of a private module; it is the
# public one that differentiates through uneven splits (MEASURED.md), so keep it, quietly.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_to_all_single")

from smoe.nn.dispatch import Assignments, Dispatched, LocalDispatcher, plan_assignments
from smoe.parallel.health import check_same_across_ranks, guarded
from smoe.parallel.placement import Placement

__all__ = ["AllToAllDispatcher", "CommCounter", "ExpertParallel", "expert_parallel",
           "apply_placement", "moe_layers_of"]


@dataclass
class CommCounter:
    """Bytes this rank sent to *other* ranks by the all-to-alls (rows to itself never leave
    the process), per kind, summed over calls."""

    dispatch_bytes: int = 0
    combine_bytes: int = 0
    count_bytes: int = 0
    rows_sent: int = 0
    rows_local: int = 0
    rows_received: int = 0     # rows this rank's experts processed (from every rank)
    calls: int = 0
    history: list = field(default_factory=list)

    def reset(self) -> None:
        self.__init__()


def _all_to_all_counts(send_PS: torch.Tensor, group) -> torch.Tensor:
    recv_PS = torch.empty_like(send_PS)
    guarded("all-to-all of row counts", dist.all_to_all_single, recv_PS, send_PS, group=group)
    return recv_PS


class AllToAllDispatcher(LocalDispatcher):
    """Dispatcher for one MoE layer whose experts are spread over an EP group.

    ``placement`` says which logical expert each slot of each rank holds; the layer's
    ``experts`` must hold this rank's slots in order (see :func:`expert_parallel`).
    """

    def __init__(self, group, placement: Placement, moe_config, counter: CommCounter | None = None
                 ) -> None:
        super().__init__()
        self.group = group
        self.placement = placement
        self.config = moe_config
        self.counter = counter
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        if placement.ep_size != self.world:
            raise ValueError(f"placement has {placement.ep_size} ranks, the EP group "
                             f"{self.world}")

    # -- the plan --------------------------------------------------------------------------
    def _global_capacity_plan(self, route, num_experts: int) -> Assignments:
        """The plan one process would make for the EP group's concatenated batch, restricted
        to this rank's tokens (token ids local again)."""
        experts_TK, weights_TK = route.experts_TK, route.weights_TK.detach()
        T = experts_TK.shape[0]
        sizes = [torch.zeros(1, dtype=torch.long, device=experts_TK.device)
                 for _ in range(self.world)]
        guarded("all-gather of token counts", dist.all_gather, sizes,
                torch.tensor([T], device=experts_TK.device), group=self.group)
        sizes_P = [int(s) for s in sizes]
        Tmax = max(sizes_P)
        pad = Tmax - T
        ex = torch.nn.functional.pad(experts_TK, (0, 0, 0, pad))
        wt = torch.nn.functional.pad(weights_TK, (0, 0, 0, pad))
        ex_all = [torch.empty_like(ex) for _ in range(self.world)]
        wt_all = [torch.empty_like(wt) for _ in range(self.world)]
        guarded("all-gather of routing decisions", dist.all_gather, ex_all, ex, group=self.group)
        guarded("all-gather of routing weights", dist.all_gather, wt_all, wt, group=self.group)
        T_global = sum(sizes_P)
        experts_GK = torch.cat([e[:n] for e, n in zip(ex_all, sizes_P)])
        weights_GK = torch.cat([w[:n] for w, n in zip(wt_all, sizes_P)])
        capacity = self.config.capacity(T_global)
        g = plan_assignments(SimpleNamespace(token_choice=True, experts_TK=experts_GK,
                                             weights_TK=weights_GK), num_experts, capacity)
        start = sum(sizes_P[:self.rank])
        mine = (g.token_A >= start) & (g.token_A < start + T)
        token_A = g.token_A[mine] - start
        expert_A = g.expert_A[mine]
        K = experts_TK.shape[1]
        # The kept rows' weights with autograd: look each (token, expert) up in weights_TK.
        slot_A = (experts_TK[token_A] == expert_A.unsqueeze(1)).float().argmax(dim=1)
        weight_A = route.weights_TK[token_A, slot_A]
        covered_T = torch.zeros(T, dtype=torch.bool, device=token_A.device)
        covered_T[token_A] = True
        counts_E = torch.bincount(expert_A, minlength=num_experts)
        return Assignments(token_A, expert_A, weight_A, counts_E, (~covered_T).sum(),
                           torch.tensor(T * K - token_A.numel(), device=token_A.device), capacity)

    # -- the seam --------------------------------------------------------------------------
    def dispatch(self, x_TD, route, *, num_experts, capacity, weights_on_input):
        E = self.placement.num_experts
        if not route.token_choice:
            raise ValueError("expert parallelism needs a token-choice router; expert_choice is "
                             "not supported under expert parallelism")
        if capacity is None:
            plan = plan_assignments(route, E, None)
        else:
            plan = self._global_capacity_plan(route, E)
        x_AD = x_TD.index_select(0, plan.token_A)
        if weights_on_input:
            x_AD = x_AD * plan.weight_A.to(x_AD.dtype).unsqueeze(-1)
        P, S = self.world, self.placement.slots_per_rank
        slot_A = self.placement.slot_of(plan.expert_A)
        send_order_A = torch.argsort(slot_A, stable=True)
        x_send = x_AD.index_select(0, send_order_A)
        send_PS = torch.bincount(slot_A, minlength=P * S).view(P, S)
        recv_PS = _all_to_all_counts(send_PS.contiguous(), self.group)
        in_splits = send_PS.sum(1).tolist()
        out_splits = recv_PS.sum(1).tolist()
        x_recv = guarded("all-to-all dispatch of rows", dist_fn.all_to_all_single,
                         x_send.new_empty(sum(out_splits), x_send.shape[1]), x_send,
                         out_splits, in_splits, group=self.group)
        # Received rows are grouped by source rank, then slot: regroup by slot for the experts.
        local_slot_B = torch.arange(S, device=x_TD.device).repeat(P).repeat_interleave(
            recv_PS.reshape(-1))
        recv_order_B = torch.argsort(local_slot_B, stable=True)
        x_BD = x_recv.index_select(0, recv_order_B)
        counts_S = recv_PS.sum(0)
        if self.counter is not None:
            row_bytes = x_send.shape[1] * x_send.element_size()
            remote = sum(in_splits) - in_splits[self.rank]
            c = self.counter
            c.calls += 1
            c.rows_sent += remote
            c.rows_local += in_splits[self.rank]
            c.rows_received += sum(out_splits)
            c.history.append(sum(out_splits))
            c.dispatch_bytes += remote * row_bytes
            c.combine_bytes += (sum(out_splits) - out_splits[self.rank]) * row_bytes
            c.count_bytes += (P - 1) * S * send_PS.element_size()
        state = (send_order_A, recv_order_B, in_splits, out_splits)
        return Dispatched(x_BD, counts_S, local_slot_B[recv_order_B], plan, state,
                          num_tokens=x_TD.shape[0])

    def combine(self, y_BD, d, *, weights_on_input):
        send_order_A, recv_order_B, in_splits, out_splits = d.state
        y_recv = _unpermute(y_BD, recv_order_B)
        y_send = guarded("all-to-all combine of rows", dist_fn.all_to_all_single,
                         y_recv.new_empty(sum(in_splits), y_recv.shape[1]), y_recv,
                         in_splits, out_splits, group=self.group)
        y_AD = _unpermute(y_send, send_order_A)
        return super().combine(y_AD, d, weights_on_input=weights_on_input)

    def __call__(self, x_TD, route, experts, *, capacity, weights_on_input):
        # Never the local decode shortcut: every rank must take part in every all-to-all.
        d = self.dispatch(x_TD, route, num_experts=self.placement.num_experts,
                          capacity=capacity, weights_on_input=weights_on_input)
        y_BD = experts(d.x_AD, d.counts_E, d.expert_A)
        return self.combine(y_BD, d, weights_on_input=weights_on_input), d.plan


def _unpermute(y_sorted: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rows back to the order before ``x[order]`` (a gather, so autograd is a scatter)."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return y_sorted.index_select(0, inverse)


# -- the transform --------------------------------------------------------------------------------
def moe_layers_of(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(qualified name, MoELayer) of every MoE layer: native smoe models (submodules) and
    transformers models patched by ``smoe.hf.patch`` (layers kept beside the blocks)."""
    return [(name, layer) for name, layer, _ in _expert_tensors(model)]


def _expert_tensors(model: torch.nn.Module):
    """(name, MoELayer, [(owner module, attribute, qualified name)]) per MoE layer: where the
    layer's expert tensors live. Native: on ``layer.experts``. Patched transformers: on the
    model's own experts module, which the patch binds into ``layer.experts`` every forward."""
    from smoe.nn.moe import MoELayer

    found = []
    for name, m in model.named_modules():
        if isinstance(m, MoELayer):
            prefix = f"{name}.experts." if name else "experts."
            found.append((name, m, [(m.experts, n, prefix + n)
                                    for n, _ in m.experts.named_parameters(recurse=False)]))
    # smoe.hf.patch keeps, in each patched block's __dict__, a record with the smoe layer and
    # its ``binds`` (smoe tensor <- the model's tensor); found by shape, so that parallel/ does
    # not import hf/ (DESIGN.md's import direction).
    patched = []
    for name, m in model.named_modules():
        for v in list(vars(m).values()):
            if hasattr(v, "binds") and isinstance(getattr(v, "layer", None), MoELayer):
                patched.append((name, v))
    if patched:
        names = {id(mod): n for n, mod in model.named_modules()}
        for name, patch in patched:
            owners = [(src, src_name, f"{names[id(src)]}.{src_name}".lstrip("."))
                      for dst, _, src, src_name in patch.binds if dst is patch.layer.experts]
            found.append((name, patch.layer, owners))
    return found


@dataclass
class ExpertParallelLayer:
    name: str
    layer: torch.nn.Module
    placement: Placement
    slots: torch.Tensor            # this rank's logical experts, one per local slot
    param_names: list[str]         # qualified names of the sharded expert parameters
    owners: list = field(default_factory=list)  # (module, attribute, qualified name)


class ExpertParallel:
    """What :func:`expert_parallel` did to a model: the layers, their placements, and this
    rank's slots. The training helpers of :mod:`smoe.parallel.launch` read it."""

    def __init__(self, group, layers: list[ExpertParallelLayer]) -> None:
        self.group = group
        self.layers = layers
        self.rank = dist.get_rank(group)
        self.ep_size = dist.get_world_size(group)
        self._balance: list[tuple[torch.Tensor, torch.Tensor, int, float]] = []
        self._hooks = []

    def expert_param_names(self) -> dict[str, ExpertParallelLayer]:
        return {n: lay for lay in self.layers for n in lay.param_names}

    # -- the global balance loss --------------------------------------------------------------
    def _record_route(self, layer, route) -> None:
        cfg = layer.config
        if (not torch.is_grad_enabled() or not route.token_choice or not cfg.aux_loss_coef
                or cfg.router == "noisy_topk" or route.probs_TE.shape[0] == 0):
            return
        E = cfg.num_experts
        counts_E = torch.bincount(route.experts_TK.reshape(-1), minlength=E)
        self._balance.append((route.probs_TE.mean(dim=0), counts_E, route.experts_TK.numel(),
                              cfg.aux_loss_coef))

    def aux_loss_correction(self, group=None) -> torch.Tensor:
        """What turns the ranks' local Switch balance losses into the global batch's: the
        local loss is N * sum_i f_i P_i with f from this rank's tokens; the loss of the whole
        batch (all ranks of ``group``, default the world, equal batches per rank) is the mean
        over ranks of N * sum_i f_i^global P_i^local, since P is a mean and f carries no
        gradient (the same split Megatron-LM uses for its sequence-parallel aux loss). Returns
        sum over the layers since the last call of coef * N * sum_i (f^global - f^local)_i P_i;
        add it to the loss. One all-reduce of the stacked [L, E] counts."""
        if not self._balance:
            return torch.zeros(())
        group = dist.group.WORLD if group is None else group
        counts_LE = torch.stack([c for _, c, _, _ in self._balance]).to(torch.float64)
        slots_L = torch.tensor([n for _, _, n, _ in self._balance], dtype=torch.float64,
                               device=counts_LE.device)
        packed = torch.cat([counts_LE, slots_L.unsqueeze(1)], dim=1)
        guarded("all-reduce of routing counts", dist.all_reduce, packed, group=group)
        total = None
        for (P_E, c_E, n, coef), g_row in zip(self._balance, packed):
            E = P_E.shape[0]
            f_global = (g_row[:E] / g_row[E]).to(P_E.dtype)
            f_local = (c_E.to(torch.float64) / n).to(P_E.dtype)
            term = coef * E * ((f_global - f_local) * P_E).sum()
            total = term if total is None else total + term
        self._balance.clear()
        return total


def _shard_experts(experts: torch.nn.Module, owners, slots: torch.Tensor, E: int) -> list[str]:
    """Keep only ``slots`` of every expert tensor stacked on a leading expert dim, in place
    where it lives (``owners``: (module, attribute, qualified name)); returns the qualified
    names of the sharded parameters."""
    names = []
    for module, attr, qual in owners:
        p = getattr(module, attr)
        if isinstance(p, torch.nn.Parameter) and p.dim() >= 1 and p.shape[0] == E:
            setattr(module, attr, torch.nn.Parameter(p.detach()[slots.to(p.device)].clone(),
                                                     requires_grad=p.requires_grad))
            names.append(qual)
    if not names:
        raise ValueError(f"{type(experts).__name__} has no parameters stacked over the {E} "
                         "experts: expert parallelism needs stacked expert weights")
    experts.num_experts = int(slots.numel())
    return names


def _fingerprint(model, placements) -> str:
    layers = moe_layers_of(model)
    cfgs = [asdict(lay.config) for _, lay in layers]
    shapes = sorted((n, tuple(p.shape)) for n, p in model.named_parameters())
    return json.dumps({"moe": cfgs, "params": shapes,
                       "placements": [p.to_dict() for p in placements]}, sort_keys=True,
                      default=str)


def expert_parallel(model: torch.nn.Module, ep_group=None, placement=None,
                    counter: CommCounter | None = None) -> ExpertParallel:
    """Shard ``model``'s experts over ``ep_group`` (default: the world) and swap every MoE
    layer's dispatcher for :class:`AllToAllDispatcher`. Apply it after the model is built and
    its weights loaded (every rank starts with the full model; each keeps its slots).

    ``placement``: a :class:`Placement` for every layer, a list with one per layer, or None
    (contiguous: E / P experts per rank; P must divide E). Raises ValueError, the same on every
    rank, when the layouts or the models differ across ranks.
    """
    group = dist.group.WORLD if ep_group is None else ep_group
    P, rank = dist.get_world_size(group), dist.get_rank(group)
    found = _expert_tensors(model)
    layers = [(name, lay) for name, lay, _ in found]
    if not layers:
        raise ValueError("the model has no MoE layers (smoe.nn.moe.MoELayer): nothing to shard; "
                         "patch a transformers model with smoe.hf.patch first")
    if placement is None or isinstance(placement, Placement):
        placements = [placement] * len(layers)
    else:
        placements = list(placement)
        if len(placements) != len(layers):
            raise ValueError(f"{len(placements)} placements for {len(layers)} MoE layers")
    placements = [Placement.contiguous(lay.config.num_experts, P) if p is None else p
                  for p, (_, lay) in zip(placements, layers)]
    # Every rank decides the same way on bad input before anything changes.
    check_same_across_ranks("the model config and expert placement", _fingerprint(model,
                                                                                  placements),
                            group)
    for p, (name, lay) in zip(placements, layers):
        if p.num_experts != lay.config.num_experts or p.ep_size != P:
            raise ValueError(f"placement for {name} covers {p.num_experts} experts on "
                             f"{p.ep_size} ranks; the layer has {lay.config.num_experts} "
                             f"experts and the EP group {P} ranks")
        if lay.config.router == "expert_choice":
            raise ValueError(f"{name}: router='expert_choice' is not supported under expert "
                             "parallelism; use a token-choice router")
    ep_layers = []
    handle = ExpertParallel(group, ep_layers)
    for p, (name, lay, owners) in zip(placements, found):
        slots = torch.tensor(p.slots[rank], dtype=torch.long)
        pnames = _shard_experts(lay.experts, owners, slots, lay.config.num_experts)
        lay.dispatcher = AllToAllDispatcher(group, p, lay.config, counter)
        ep_layers.append(ExpertParallelLayer(name, lay, p, slots, pnames, owners))
        handle._hooks.append(lay.router.register_forward_hook(
            lambda mod, args, route, lay=lay: handle._record_route(lay, route)))
    model.expert_parallel = handle  # a plain attribute: not a module, not in the state dict
    return handle


@torch.no_grad()
def apply_placement(model: torch.nn.Module, ep: ExpertParallel, placement) -> None:
    """Move a running expert-parallel model to a new placement (one for every layer, or a list)
    without restarting: each layer's full experts are gathered (one all-reduce of an [E, ...]
    buffer per expert parameter, every rank contributing the slots it owns first), every rank
    keeps the slots of the new placement, and the dispatcher switches to it. Call it on every
    rank between steps. Optimizer state of the expert parameters is not carried over: rebuild
    the optimizer (or load a consolidated checkpoint) after a move during training."""
    from smoe.parallel.launch import owner_mask, scatter_to_experts

    placements = ([placement] * len(ep.layers) if isinstance(placement, Placement)
                  else list(placement))
    if len(placements) != len(ep.layers):
        raise ValueError(f"{len(placements)} placements for {len(ep.layers)} MoE layers")
    for p, lay in zip(placements, ep.layers):
        if p.num_experts != lay.placement.num_experts or p.ep_size != ep.ep_size:
            raise ValueError(f"new placement for {lay.name} covers {p.num_experts} experts on "
                             f"{p.ep_size} ranks; expected {lay.placement.num_experts} on "
                             f"{ep.ep_size}")
    check_same_across_ranks("the new expert placement",
                            json.dumps([p.to_dict() for p in placements]), ep.group)
    for p, lay in zip(placements, ep.layers):
        experts = lay.layer.experts
        keep = owner_mask(ep, lay, ep.group)
        new_slots = torch.tensor(p.slots[ep.rank], dtype=torch.long)
        for module, attr, qual in lay.owners:
            if qual not in lay.param_names:
                continue
            w = getattr(module, attr)
            vals = w.detach() * keep.view((-1,) + (1,) * (w.dim() - 1)).to(w.device, w.dtype)
            full = scatter_to_experts(w, lay.slots, p.num_experts, vals)
            guarded("all-reduce of expert weights", dist.all_reduce, full, group=ep.group)
            setattr(module, attr, torch.nn.Parameter(
                full.index_select(0, new_slots.to(full.device)), requires_grad=w.requires_grad))
        experts.num_experts = int(new_slots.numel())
        lay.layer.dispatcher = AllToAllDispatcher(ep.group, p, lay.layer.config,
                                                  lay.layer.dispatcher.counter)
        lay.placement, lay.slots = p, new_slots
