"""Training under torchrun with expert parallelism: DP x EP, equal to one process.

``smoe train ... --expert-parallel D`` under ``torchrun --nproc_per_node P`` runs P / D data-
parallel replicas of a D-way expert-parallel model (see :mod:`smoe.parallel.launch` for the
groups and the gradient sums). Every rank reads the same global batch (same data, same seed)
and takes its 1 / P share of the rows of each micro-batch, so the global batch, the optimizer
updates and the logged losses are the single-process run's (up to float rounding):

* the loss of each rank is its local mean; gradients are summed over the ranks and divided by
  P (``sync_gradients``); the Switch balance loss uses the global batch's routing fractions
  (``ExpertParallel.aux_loss_correction``); the z-loss is a mean over tokens (exact);
* the gradient-norm clip uses the global norm (each expert counted once);
* router-bias balancing all-reduces the loads before the update;
* capacity is per expert over the EP group's batch (``AllToAllDispatcher``); with DP > 1 the
  capacity-factor run equals one process running each EP group's share separately, so equality
  with a single process holds for dropless routing or DP = 1.

Checkpoints are consolidated (the single-process layout): every rank takes part in gathering
the experts and their optimizer state, rank 0 alone writes, and any layout resumes from them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from smoe import checkpoint as ckpt
from smoe.parallel import launch
from smoe.parallel.expert_parallel import ExpertParallel, expert_parallel
from smoe.parallel.health import collective_device, guarded
from smoe.train.loop import Trainer, TrainingDiverged
from smoe.train.metrics import load_fractions, load_imbalance
from smoe.train.optim import (lr_at, optimizer_state_from_tensors, optimizer_state_to_tensors,
                              set_lr)

__all__ = ["ParallelTraining", "ExpertParallelTrainer", "global_grad_norm"]


class ParallelTraining:
    """What ``smoe.train.run`` needs to run a rank of a DP x EP job: shard the built model,
    the trainer class, and whether this rank writes the run folder (rank 0)."""

    def __init__(self, layout: launch.ParallelLayout) -> None:
        self.layout = layout
        self.ep: ExpertParallel | None = None

    @property
    def is_writer(self) -> bool:
        return self.layout.rank == 0

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        self.ep = expert_parallel(model, self.layout.ep_group)
        return model

    def trainer(self, model, train_cfg, batcher, val, **kw) -> "ExpertParallelTrainer":
        return ExpertParallelTrainer(model, train_cfg, batcher, val, parallel=self, **kw)


@torch.no_grad()
def global_grad_norm(model: torch.nn.Module, ep: ExpertParallel) -> torch.Tensor:
    """The L2 norm of the full model's gradient (every expert counted once), the same on every
    rank: dense gradients are already equal everywhere after ``sync_gradients``; each expert's
    gradient is counted by its first replica in the first EP group."""
    experts = ep.expert_param_names()
    dense_sq = torch.zeros((), dtype=torch.float64)
    expert_sq = torch.zeros((), dtype=torch.float64)
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        lay = experts.get(name)
        if lay is None:
            dense_sq += p.grad.double().pow(2).sum().cpu()
        else:
            keep = launch.owner_mask(ep, lay, dist.group.WORLD).to(p.grad.device)
            expert_sq += p.grad[keep].double().pow(2).sum().cpu()
    expert_sq = expert_sq.to(collective_device())
    guarded("all-reduce of the gradient norm", dist.all_reduce, expert_sq)
    return (dense_sq + expert_sq.cpu()).sqrt()


class ExpertParallelTrainer(Trainer):
    """:class:`~smoe.train.loop.Trainer` for one rank of a DP x EP job (module docstring)."""

    def __init__(self, model, config, batcher, val=None, *, parallel: ParallelTraining,
                 **kw) -> None:
        W = parallel.layout.world_size
        if config.micro_batch_size % W:
            raise ValueError(f"the micro-batch ({config.micro_batch_size} sequences) must divide "
                             f"by the {W} processes: choose --batch-size / --grad-accum so that "
                             "it does")
        self.parallel = parallel
        if not parallel.is_writer:
            kw["progress"] = False
        super().__init__(model, config, batcher, val, **kw)

    @property
    def ep(self) -> ExpertParallel:
        return self.parallel.ep

    def train_step(self, batch) -> dict[str, Any]:
        cfg, model, lay = self.cfg, self.model, self.parallel.layout
        W, r = lay.world_size, lay.rank
        model.train()
        lr = lr_at(self.step, cfg)
        set_lr(self.optimizer, lr)
        x_BT, y_BT = batch[0].to(self.device), batch[1].to(self.device)
        sums = torch.zeros(3, dtype=torch.float64)   # ce, aux, z: local, then global means
        counts_LE = None
        dropped = 0
        self.ep.aux_loss_correction()  # drop routes recorded outside a training step
        n = cfg.micro_batch_size // W
        for x, y in zip(x_BT.split(cfg.micro_batch_size), y_BT.split(cfg.micro_batch_size)):
            x, y = x[r * n:(r + 1) * n], y[r * n:(r + 1) * n]
            with self._autocast():
                out = model(x, y)
            aux = out.aux_loss + self.ep.aux_loss_correction()
            total = out.loss + aux + out.z_loss
            (total / cfg.grad_accum).backward()
            sums += torch.stack([out.loss.detach(), aux.detach(), out.z_loss.detach()]
                                ).double().cpu() / cfg.grad_accum
            if out.moe_infos:
                c = torch.stack([i.tokens_per_expert.detach() for i in out.moe_infos]).cpu()
                counts_LE = c if counts_LE is None else counts_LE + c
                dropped += int(sum(int(i.dropped_tokens) for i in out.moe_infos))
        launch.sync_gradients(model, self.ep)
        packed = torch.cat([sums, torch.tensor([float(dropped)], dtype=torch.float64)]
                           + ([counts_LE.double().reshape(-1)] if counts_LE is not None else []))
        packed = packed.to(collective_device())
        guarded("all-reduce of step statistics", dist.all_reduce, packed)
        packed = packed.cpu()
        ce, aux, z = (float(v) / W for v in packed[:3])
        dropped = int(packed[3])
        if counts_LE is not None:
            counts_LE = packed[4:].view_as(counts_LE).round().long()
        if not math.isfinite(ce + aux + z):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(f"the loss became {ce + aux + z} at step {self.step + 1} "
                                   "(try a lower --lr or --bf16 off)")
        norm = global_grad_norm(model, self.ep)
        if cfg.grad_clip > 0 and float(norm) > cfg.grad_clip:
            scale = cfg.grad_clip / (float(norm) + 1e-6)  # as clip_grad_norm_ does
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.bias_update:
            launch.update_router_biases(model)
        self.step += 1
        self.tokens_seen += x_BT.numel()
        row: dict[str, Any] = {"step": self.step, "loss": ce, "lr": lr, "aux_loss": aux,
                               "z_loss": z, "grad_norm": float(norm), "tokens": self.tokens_seen}
        if counts_LE is not None:
            imb, per_layer = load_imbalance(counts_LE)
            row.update(load_imbalance=imb,
                       load_imbalance_per_layer=[round(v, 4) for v in per_layer],
                       expert_load=[[round(v, 5) for v in row_]
                                    for row_ in load_fractions(counts_LE)],
                       moe_layers=self.moe_layer_ids, dropped_tokens=dropped)
        return row

    # -- consolidated checkpoints --------------------------------------------------------------
    def _consolidate_optimizer(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = optimizer_state_to_tensors(self.optimizer)
        experts = self.ep.expert_param_names()
        out = {}
        for key in sorted(tensors):  # the same order on every rank: the all-reduces pair up
            t = tensors[key]
            lay = experts.get(key.rpartition("/")[0])
            if lay is not None and t.dim() >= 1 and t.shape[0] == lay.slots.numel():
                keep = launch.owner_mask(self.ep, lay, dist.group.WORLD)
                vals = t * keep.view((-1,) + (1,) * (t.dim() - 1)).to(t.dtype)
                buf = launch.scatter_to_experts(t, lay.slots, lay.placement.num_experts, vals)
                guarded("all-reduce of optimizer state", dist.all_reduce, buf)
                t = buf
            out[key] = t
        return out, meta

    def checkpoint_tensors(self):
        return (launch.consolidated_state_dict(self.model, self.ep),
                *self._consolidate_optimizer())

    def save_checkpoint(self, run_dir: str | Path | None = None) -> Path | None:
        """Every rank gathers the experts and their optimizer state; rank 0 alone writes the
        single-process checkpoint (the others return None)."""
        if self.parallel.is_writer:
            folder = super().save_checkpoint(run_dir)
        else:
            self.checkpoint_tensors()  # take part in the gathers
            folder, self.saved_step = None, self.step
        guarded("barrier after a checkpoint", dist.barrier)
        return folder

    def load_checkpoint(self, folder: str | Path) -> dict[str, Any]:
        """Read a consolidated checkpoint (any layout wrote it) and keep this rank's slots."""
        state = ckpt.read_state(folder)
        full = ckpt.load_model_weights(folder, self.device)
        launch.load_consolidated(self.model, self.ep, full)
        experts = self.ep.expert_param_names()
        opt = ckpt.load_optimizer_state(folder, self.device)
        local = {}
        for key, t in opt.items():
            lay = experts.get(key.rpartition("/")[0])
            if lay is not None and t.dim() >= 1 and t.shape[0] == lay.placement.num_experts:
                t = t.index_select(0, lay.slots.to(t.device))
            local[key] = t
        optimizer_state_from_tensors(self.optimizer, local, state["optimizer"])
        return self.restore_progress(state)
