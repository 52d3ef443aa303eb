"""AdamW with decay only where it belongs, the learning-rate schedule, and the optimizer state
as named tensors + JSON scalars (what a checkpoint stores, no pickle).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from smoe.train.config import TrainConfig

__all__ = ["lr_at", "cosine_progress", "rescheduled", "param_groups", "build_optimizer", "set_lr", "optimizer_state_to_tensors",
           "optimizer_state_from_tensors"]


def cosine_progress(it: int, cfg: TrainConfig) -> float:
    """Where update ``it`` is on the cosine, 0 (peak, at the end of warmup) to 1 (``min_lr``).

    Without ``cfg.resume_anchor`` it is ``(it - warmup) / (steps - warmup)``. With an anchor
    ``(s, p)`` (a resumed run that changed ``steps``), from update ``s`` on it goes linearly
    from ``p`` to 1 at the new ``steps``: the rest of the decay is stretched or compressed to
    the new end, so the learning rate is continuous at ``s``.
    """
    anchor = cfg.resume_anchor
    if anchor is not None and it >= anchor[0]:
        s, p = anchor
        if it >= cfg.steps or cfg.steps <= s:
            return 1.0
        return p + (1.0 - p) * (it - s) / (cfg.steps - s)
    if it < cfg.warmup_steps:
        return 0.0
    if it >= cfg.steps:
        return 1.0
    return (it - cfg.warmup_steps) / (cfg.steps - cfg.warmup_steps)


def lr_at(it: int, cfg: TrainConfig) -> float:
    """Learning rate of update number ``it`` (0-based: the first update uses ``lr_at(0)``).

    Linear warmup ``lr * (it + 1) / warmup_steps`` for ``it < warmup_steps``, then a half
    cosine from ``lr`` down to ``min_lr``, reached at ``it == steps``; constant after
    (the cosine's phase is :func:`cosine_progress`, which a resumed run may have re-anchored).
    """
    if it < cfg.warmup_steps and (cfg.resume_anchor is None or it < cfg.resume_anchor[0]):
        return cfg.lr * (it + 1) / cfg.warmup_steps
    progress = cosine_progress(it, cfg)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def rescheduled(cfg: TrainConfig, step: int, steps: int) -> TrainConfig:
    """``cfg`` with ``steps`` changed by a run resumed at ``step``, the schedule continuing
    without a jump (the rule of :func:`cosine_progress`). Refuses a new end before ``step``.

    A run still in warmup needs no anchor: warmup does not depend on ``steps``, so the plain
    schedule with the new end is already continuous there.
    """
    if steps == cfg.steps:
        return cfg
    if steps < step:
        raise ValueError(f"steps={steps} is before the run's checkpoint at step {step}: give "
                         f"--steps {step} or more")
    if step < cfg.warmup_steps and cfg.resume_anchor is None:
        return cfg.replace(steps=steps)
    return cfg.replace(steps=steps, resume_anchor=(step, cosine_progress(step, cfg)))


def _no_decay_ids(model: nn.Module) -> set[int]:
    """Parameters that get no weight decay: norms, biases, embeddings (and what is tied to them)."""
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            ids.add(id(module.weight))
    for _, p in model.named_parameters():
        if p.dim() < 2:  # biases, norm scales, any per-channel vector
            ids.add(id(p))
    return ids


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups by parameter name: ``decay`` (matrices) and ``no_decay`` (the rest)."""
    skip = _no_decay_ids(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # tied parameters appear once
        if not p.requires_grad:
            continue
        (no_decay if id(p) in skip else decay).append((name, p))
    groups = [
        {"name": "decay", "params": [p for _, p in decay], "param_names": [n for n, _ in decay],
         "weight_decay": weight_decay},
        {"name": "no_decay", "params": [p for _, p in no_decay],
         "param_names": [n for n, _ in no_decay], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # foreach=False: the same single-tensor kernels on every device, one less source of drift.
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr_at(0, cfg),
                             betas=cfg.betas, eps=cfg.eps, foreach=False)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, (list, dict)):
        return v
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    raise TypeError(f"optimizer hyperparameter {v!r} cannot be stored as JSON")


def optimizer_state_to_tensors(optimizer: torch.optim.Optimizer
                               ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state into named tensors ``"<param name>/<key>"`` and JSON scalars.

    Needs param groups built by :func:`param_groups` (each group carries ``param_names``).
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    groups = []
    for group in optimizer.param_groups:
        groups.append({k: _jsonable(v) for k, v in group.items() if k != "params"})
        for name, p in zip(group["param_names"], group["params"]):
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(name, {})[key] = _jsonable(value)
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_state_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                                 meta: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_state_to_tensors`: load the state into ``optimizer``."""
    saved_groups = meta["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError("checkpoint optimizer has a different number of parameter groups")
    state: dict[int, dict[str, Any]] = {}
    groups = []
    index = 0
    per_param: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        name, _, field = key.rpartition("/")
        per_param.setdefault(name, {})[field] = t
    for name, fields in meta.get("scalars", {}).items():
        per_param.setdefault(name, {}).update(fields)
    for saved, group in zip(saved_groups, optimizer.param_groups):
        if saved["param_names"] != group["param_names"]:
            raise ValueError(f"checkpoint optimizer group {saved.get('name')!r} holds other "
                             "parameters than this model")
        ids = []
        for name in group["param_names"]:
            if name in per_param:
                state[index] = per_param[name]
            ids.append(index)
            index += 1
        g = dict(saved)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        g["params"] = ids
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
