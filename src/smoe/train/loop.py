"""The training loop: one optimizer update at a time, evaluation, logging, checkpoints.

One update (``Trainer.train_step``)::

    lr = lr_at(step)                                  # warmup + cosine
    for each of grad_accum micro-batches:             # batch_size / grad_accum sequences each
        out = model(x, y)                             # under bf16 autocast if asked
        ((out.loss + out.aux_loss + out.z_loss) / grad_accum).backward()
    clip the global gradient norm; optimizer.step(); zero the gradients
    model.update_router_biases()                      # balancing, outside the model

Determinism: the model is built after ``torch.manual_seed(seed)``; batch ``k`` depends only on
``(seed, k)`` (:class:`smoe.data.Batcher`); the global RNG state (used by the noisy router)
is saved in the checkpoint, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smoe.train import checkpoint as ckpt
from smoe.train.config import TrainConfig
from smoe.evaluation import round_nested, evaluate_model
from smoe.train.metrics import MetricsLogger, load_fractions, load_imbalance
from smoe.train.optim import (build_optimizer, lr_at, optimizer_state_from_tensors,
                              optimizer_state_to_tensors, set_lr)

__all__ = ["Trainer", "TrainingDiverged", "TrainingStopped", "apply_loss_overrides",
           "evaluate_model", "stop_on_signals"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the update that produced it was not applied."""


class TrainingStopped(Exception):
    """:meth:`Trainer.request_stop` was called (e.g. by a SIGINT/SIGTERM handler): the loop
    finished the update in progress, wrote a checkpoint (with a ``run_dir``) and returned."""

    def __init__(self, step: int, signum: int | None, checkpoint: Path | None) -> None:
        self.step, self.signum, self.checkpoint = step, signum, checkpoint
        where = f"; checkpoint {checkpoint}" if checkpoint is not None else ""
        super().__init__(f"training stopped at step {step}{where}")


def apply_loss_overrides(model: nn.Module, cfg: TrainConfig) -> None:
    """Set the MoE layers' ``aux_loss_coef`` / ``z_loss_coef`` to the config's overrides.

    A no-op when both are ``None``. The layers (and their routers) get a replaced
    :class:`~smoe.config.MoEConfig`, and ``model.config`` is updated to match.
    """
    changes = {k: v for k, v in (("aux_loss_coef", cfg.aux_loss_coef),
                                 ("z_loss_coef", cfg.z_loss_coef)) if v is not None}
    if not changes:
        return
    for _, layer in model.moe_layers():
        old = layer.config
        new = old.replace(**changes)
        for m in layer.modules():
            if getattr(m, "config", None) is old:
                m.config = new
    mcfg = getattr(model, "config", None)
    if mcfg is not None and getattr(mcfg, "moe", None) is not None:
        model.config = mcfg.replace(moe=mcfg.moe.replace(**changes))


def _log_line(row: dict[str, Any], steps: int) -> str:
    """One line of a logged step, for logs without a progress bar."""
    parts = [f"step {row['step']}/{steps}", f"loss {row['loss']:.4f}", f"lr {row['lr']:.3g}"]
    if "load_imbalance" in row:
        parts.append(f"imbalance {row['load_imbalance']:.2f}")
    if row.get("tokens_per_s"):
        parts.append(f"{row['tokens_per_s']:,.0f} tok/s")
    return "  ".join(parts)


class Trainer:
    """Trains ``model`` on batches from ``batcher`` (an :class:`smoe.data.Batcher`).

    ``val``: a fixed list of validation batches (``smoe.data.val_batches``) or ``None``.
    ``val_bytes_per_token``: UTF-8 bytes per token of the validation stream, overall and per
    domain (``{None: b, "prose": b1, ...}``), for bits per byte. ``domain_names``: the names of
    the domain ids in the batches. With ``run_dir`` the loop writes metrics and checkpoints.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, batcher, val: Sequence | None = None,
                 *, val_bytes_per_token: dict[str | None, float] | None = None,
                 domain_names: Sequence[str] = (), run_dir: str | Path | None = None,
                 logger: MetricsLogger | None = None, progress: bool = False,
                 checkpoint_extra: dict[str, Any] | None = None) -> None:
        if batcher.batch_size != config.batch_size or batcher.seq_len != config.seq_len:
            raise ValueError(f"batcher makes ({batcher.batch_size}, {batcher.seq_len}) batches; "
                             f"config wants ({config.batch_size}, {config.seq_len})")
        self.model, self.cfg, self.batcher = model, config, batcher
        self.val = list(val) if val is not None else None
        self.val_bpt = dict(val_bytes_per_token or {})
        self.domain_names = tuple(domain_names)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.logger, self.progress = logger, progress
        #: print a line per logged step when there is no progress bar (the CLI's --no-progress)
        self.print_log = False
        self.checkpoint_extra = dict(checkpoint_extra or {})
        self.device = next(model.parameters()).device
        apply_loss_overrides(model, config)
        self.optimizer = build_optimizer(model, config)
        self.moe_layer_ids = [i for i, _ in model.moe_layers()]
        # Routing drift and hot spots for metrics.jsonl / TensorBoard: one window per log row,
        # drift against the first window of this session (validation forwards not counted).
        self.monitor = None
        if self.moe_layer_ids:
            from smoe.monitor import RoutingMonitor

            self.monitor = RoutingMonitor(window_tokens=None, co_selection=False).attach(
                model.moe_layers())
        self.step = 0                 # optimizer updates done
        self.tokens_seen = 0
        self.elapsed_s = 0.0          # training time over all sessions of this run
        self.last_eval: dict[str, Any] | None = None
        self.stop_signal: int | None = None      # set by request_stop
        self.stop_requested = False
        self.saved_step: int | None = None       # the step of the last checkpoint written
        #: called with the checkpoint folder after each save (e.g. to commit a run's config)
        self.on_checkpoint: Callable[[Path], None] | None = None

    def request_stop(self, signum: int | None = None) -> None:
        """Ask the loop to stop after the update in progress (safe from a signal handler: it
        only sets a flag); :meth:`fit` then checkpoints and raises :class:`TrainingStopped`."""
        self.stop_requested, self.stop_signal = True, signum

    # -- one update -------------------------------------------------------------------------
    def _autocast(self):
        if not self.cfg.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def train_step(self, batch) -> dict[str, Any]:
        """One optimizer update on ``batch`` (x_BT, y_BT, domain_BT) of ``batch_size`` rows;
        returns the step's log row (without timing)."""
        cfg, model = self.cfg, self.model
        model.train()
        lr = lr_at(self.step, cfg)
        set_lr(self.optimizer, lr)
        x_BT, y_BT = batch[0].to(self.device), batch[1].to(self.device)
        ce = aux = z = 0.0
        counts_LE = None
        dropped = 0
        for x, y in zip(x_BT.split(cfg.micro_batch_size), y_BT.split(cfg.micro_batch_size)):
            with self._autocast():
                out = model(x, y)
            total = out.loss + out.aux_loss + out.z_loss
            (total / cfg.grad_accum).backward()
            ce += out.loss.item() / cfg.grad_accum
            aux += out.aux_loss.item() / cfg.grad_accum
            z += out.z_loss.item() / cfg.grad_accum
            if out.moe_infos:
                c = torch.stack([i.tokens_per_expert.detach() for i in out.moe_infos]).cpu()
                counts_LE = c if counts_LE is None else counts_LE + c
                dropped += int(sum(int(i.dropped_tokens) for i in out.moe_infos))
        if not math.isfinite(ce + aux + z):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(f"the loss became {ce + aux + z} at step {self.step + 1} "
                                   "(try a lower --lr or --bf16 off)")
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.bias_update:
            model.update_router_biases()
        self.step += 1
        self.tokens_seen += x_BT.numel()
        row: dict[str, Any] = {"step": self.step, "loss": ce, "lr": lr, "aux_loss": aux,
                               "z_loss": z, "grad_norm": grad_norm, "tokens": self.tokens_seen}
        if counts_LE is not None:
            imb, per_layer = load_imbalance(counts_LE)
            row.update(load_imbalance=imb, load_imbalance_per_layer=round_nested(per_layer, 4),
                       expert_load=round_nested(load_fractions(counts_LE), 5),
                       moe_layers=self.moe_layer_ids, dropped_tokens=dropped)
        return row

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        """:func:`evaluate_model` on the trainer's validation batches, at the current step."""
        if not self.val:
            raise ValueError("no validation batches were given to the trainer")
        with (self.monitor.paused() if self.monitor is not None else contextlib.nullcontext()):
            row = evaluate_model(self.model, self.val, val_bytes_per_token=self.val_bpt,
                                 domain_names=self.domain_names, bf16=self.cfg.bf16)
        row = {"step": self.step, **row}
        self.last_eval = row
        return row

    # -- checkpoints ----------------------------------------------------------------------
    def checkpoint_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                          dict[str, Any]]:
        """(model tensors, optimizer tensors, optimizer metadata) to save; a distributed
        trainer returns the consolidated single-process tensors here."""
        return (self.model.state_dict(), *optimizer_state_to_tensors(self.optimizer))

    def save_checkpoint(self, run_dir: str | Path | None = None) -> Path:
        run_dir = Path(run_dir) if run_dir is not None else self.run_dir
        if run_dir is None:
            raise ValueError("save_checkpoint needs a run_dir")
        model_tensors, opt_tensors, opt_meta = self.checkpoint_tensors()
        mcfg = getattr(self.model, "config", None)
        state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed_s,
            "train_config": self.cfg.to_dict(),
            "model_config": mcfg.to_dict() if hasattr(mcfg, "to_dict") else None,
            "optimizer": opt_meta,
            "rng": ckpt.rng_state(),
            "batcher": self.batcher.state_dict(),
            "schedule": {"kind": "warmup_cosine", "next_lr": lr_at(self.step, self.cfg),
                         "warmup_steps": self.cfg.warmup_steps, "steps": self.cfg.steps,
                         "lr": self.cfg.lr, "min_lr": self.cfg.min_lr,
                         "resume_anchor": (list(self.cfg.resume_anchor)
                                           if self.cfg.resume_anchor is not None else None)},
            **self.checkpoint_extra,
        }
        folder = ckpt.save_checkpoint(run_dir, model_tensors, opt_tensors, state,
                                      keep=self.cfg.keep_checkpoints)
        self.saved_step = self.step
        if self.on_checkpoint is not None:
            self.on_checkpoint(folder)
        return folder

    def load_checkpoint(self, folder: str | Path) -> dict[str, Any]:
        """Restore model, optimizer, data position, RNG and counters from a checkpoint folder."""
        state = ckpt.read_state(folder)
        self.model.load_state_dict(ckpt.load_model_weights(folder, self.device), strict=True)
        optimizer_state_from_tensors(self.optimizer,
                                     ckpt.load_optimizer_state(folder, self.device),
                                     state["optimizer"])
        return self.restore_progress(state)

    def restore_progress(self, state: dict[str, Any]) -> dict[str, Any]:
        """Data position, RNG and counters from a checkpoint's state (after the weights and the
        optimizer; shared with the expert-parallel trainer)."""
        self.batcher.load_state_dict(state["batcher"])
        ckpt.set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
        self.saved_step = self.step
        return state

    # -- the loop -------------------------------------------------------------------------
    def fit(self, on_log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
        """Train until ``config.steps``; returns the last evaluation row (or ``None``).

        After :meth:`request_stop` it stops after the update in progress, writes a checkpoint
        (when it has a ``run_dir`` and the step is not saved yet) and raises
        :class:`TrainingStopped`. Without a progress bar (and with a logger) it prints one line
        every ``log_every`` steps, so that a run in a log file shows it is alive.
        """
        cfg = self.cfg
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step",
                       dynamic_ncols=True, smoothing=0.1)
        win_tokens, win_time = 0, 0.0
        try:
            while self.step < cfg.steps:
                if self.stop_requested:
                    break
                batch = next(self.batcher)
                t0 = time.perf_counter()
                row = self.train_step(batch)
                dt = time.perf_counter() - t0
                self.elapsed_s += dt
                win_tokens += cfg.tokens_per_step
                win_time += dt
                if bar is not None:
                    post = {"loss": f"{row['loss']:.3f}",
                            "tok/s": f"{cfg.tokens_per_step / dt:,.0f}"}
                    if "load_imbalance" in row:
                        post["imb"] = f"{row['load_imbalance']:.2f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                last = self.step == cfg.steps
                if self.step % cfg.log_every == 0 or last:
                    row["tokens_per_s"] = win_tokens / win_time if win_time > 0 else 0.0
                    row["elapsed_s"] = self.elapsed_s
                    if self.monitor is not None:
                        row.update(self.monitor.training_row())
                    win_tokens, win_time = 0, 0.0
                    self._emit(row, on_log)
                    if bar is None and self.print_log:
                        print(_log_line(row, cfg.steps), flush=True)
                if self.val and ((cfg.eval_every and self.step % cfg.eval_every == 0) or last):
                    ev = self.evaluate()
                    self._emit(ev, on_log)
                    bpb = f", bpb {ev['val_bpb']:.3f}" if "val_bpb" in ev else ""
                    line = f"step {self.step}: val loss {ev['val_loss']:.4f}{bpb}"
                    if bar is not None:
                        bar.write(line)
                    elif self.print_log:
                        print(line, flush=True)
                if self.run_dir is not None and (
                        (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or last):
                    self.save_checkpoint()
            if self.stop_requested:
                folder = None
                if self.run_dir is not None:
                    folder = (self.save_checkpoint() if self.saved_step != self.step
                              else ckpt.checkpoint_dir(self.run_dir))
                raise TrainingStopped(self.step, self.stop_signal, folder)
        finally:
            if bar is not None:
                bar.close()
        return self.last_eval

    def _emit(self, row: dict[str, Any], on_log) -> None:
        if self.logger is not None:
            self.logger.log(row)
        if on_log is not None:
            on_log(row)


@contextlib.contextmanager
def stop_on_signals(trainer: Trainer):
    """SIGINT and SIGTERM ask the trainer to stop after the update in progress (it then saves
    a checkpoint); a second signal stops at once (KeyboardInterrupt). Only in the main thread
    (the only one Python delivers signals to); the previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, frame):
        if trainer.stop_requested:
            raise KeyboardInterrupt
        trainer.request_stop(signum)
        print(f"\nsmoe: {signal.Signals(signum).name}: stopping after this step and saving a "
              "checkpoint (send it again to stop at once)", file=sys.stderr, flush=True)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
