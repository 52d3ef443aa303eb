"""The training configuration: one typed dataclass, validated on construction.

A step is one optimizer update. ``batch_size`` is the number of sequences per update; with
``grad_accum = n`` each update runs ``n`` forward/backward passes on ``batch_size / n``
sequences each, so the data and (for the language-model loss) the gradient of an update do not
depend on ``grad_accum``: it only trades memory for time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from smoe.config import _non_negative_int as _nonneg_int
from smoe.config import _positive_int as _pos_int
from smoe.config import check_known_fields, config_error

__all__ = ["TrainConfig"]


def _number(name: str, value: Any, lo: float = 0.0, *, strict: bool = False,
            hi: float | None = None) -> None:
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise config_error(name, value, "must be a finite number")
    if value < lo or (strict and value == lo):
        raise config_error(name, value, f"must be {'>' if strict else '>='} {lo}")
    if hi is not None and value >= hi:
        raise config_error(name, value, f"must be < {hi}")


@dataclass
class TrainConfig:
    """How to train.

    Schedule: linear warmup from 0 to ``lr`` over ``warmup_steps`` updates, then cosine decay
    to ``min_lr`` at ``steps`` (see :func:`smoe.train.optim.lr_at`).
    Optimizer: AdamW; weight decay applies to matrices (linear layers, stacked expert weights,
    router weights) but not to norms, biases or embeddings (nor a tied output head).
    ``grad_clip``: global gradient-norm clip, 0 disables it.
    ``bf16``: run forward passes under ``torch.autocast(bfloat16)``; parameters, optimizer state
    and the router math stay float32.
    ``aux_loss_coef`` / ``z_loss_coef``: override the model's MoE loss weights (``None`` keeps
    the model's); applied to the model config when the model is built.
    ``bias_update``: call ``model.update_router_biases()`` after each optimizer step
    (auxiliary-loss-free balancing, routers that have a selection bias).
    ``eval_every`` / ``checkpoint_every`` / ``log_every``: in updates; 0 disables periodic
    evaluation / checkpoints (a final one is still made at the end of a run, and one when
    the run is stopped by SIGINT/SIGTERM). ``keep_checkpoints``: how many of the newest
    checkpoints a run folder keeps (an older one is the fallback when the newest is damaged).
    ``min_lr``: ``None`` means ``lr / 10`` (resolved on construction).
    ``resume_anchor``: ``(step, progress)`` set when a resumed run changed ``steps``: from
    ``step`` on, the cosine continues from ``progress`` (its phase at that step, 0 at the peak,
    1 at ``min_lr``) and reaches 1 at the new ``steps``: the remainder of the decay is
    stretched (or compressed) to the new end, with no jump in the learning rate.
    """

    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr: float | None = None
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum: int = 1
    bf16: bool = False
    aux_loss_coef: float | None = None
    z_loss_coef: float | None = None
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 100
    log_every: int = 1
    seed: int = 0
    bias_update: bool = True
    keep_checkpoints: int = 2
    resume_anchor: tuple[int, float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        if isinstance(self.resume_anchor, list):
            self.resume_anchor = tuple(self.resume_anchor)
        _pos_int("steps", self.steps)
        _pos_int("batch_size", self.batch_size)
        _pos_int("seq_len", self.seq_len)
        _number("lr", self.lr, strict=True)
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        _number("min_lr", self.min_lr)
        if self.min_lr > self.lr:
            raise config_error("min_lr", self.min_lr, f"must be <= lr ({self.lr})")
        _nonneg_int("warmup_steps", self.warmup_steps)
        _number("weight_decay", self.weight_decay)
        if (not isinstance(self.betas, tuple) or len(self.betas) != 2):
            raise config_error("betas", self.betas, "must be a pair (beta1, beta2)")
        for i, b in enumerate(self.betas):
            _number(f"betas[{i}]", b, hi=1.0)
        _number("eps", self.eps, strict=True)
        _number("grad_clip", self.grad_clip)
        _pos_int("grad_accum", self.grad_accum)
        if self.batch_size % self.grad_accum:
            raise config_error("grad_accum", self.grad_accum,
                               f"must divide batch_size ({self.batch_size})")
        for name in ("bf16", "bias_update"):
            if not isinstance(getattr(self, name), bool):
                raise config_error(name, getattr(self, name), "must be True or False")
        for name in ("aux_loss_coef", "z_loss_coef"):
            if getattr(self, name) is not None:
                _number(name, getattr(self, name))
        _nonneg_int("eval_every", self.eval_every)
        _pos_int("eval_batches", self.eval_batches)
        _nonneg_int("checkpoint_every", self.checkpoint_every)
        _pos_int("log_every", self.log_every)
        _nonneg_int("seed", self.seed)
        _pos_int("keep_checkpoints", self.keep_checkpoints)
        if self.resume_anchor is not None:
            a = self.resume_anchor
            if (not isinstance(a, tuple) or len(a) != 2 or isinstance(a[0], bool)
                    or not isinstance(a[0], int) or not isinstance(a[1], (int, float))
                    or not 0 <= a[1] <= 1 or not 0 <= a[0] <= self.steps):
                raise config_error("resume_anchor", a, "must be (step <= steps, progress in "
                                   "[0, 1])")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        if self.resume_anchor is not None:
            d["resume_anchor"] = list(self.resume_anchor)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        check_known_fields(cls, data)
        return cls(**data)
