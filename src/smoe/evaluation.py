"""Evaluation of a language model on validation batches, and of a run folder's latest model:
loss, bits per byte and per-domain figures, the experts' load and which domain goes where.

The trainer, ``smoe eval``, the demo and the benchmarks all use these; this module needs no
part of the trainer (``smoe.train``), so inference code can evaluate without importing it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from smoe.monitor import stats
from smoe.monitor.report import format_load_table

__all__ = ["evaluate_model", "eval_run", "format_eval", "load_fractions", "load_imbalance",
           "round_nested"]

#: What ``eval_run`` uses for a model without training settings (an imported one): the
#: trainer's defaults (smoe.train.TrainConfig) for batch and validation size.
_IMPORTED_EVAL = {"batch_size": 16, "grad_accum": 1, "eval_batches": 8, "bf16": False}


def load_fractions(tokens_per_expert_LE: torch.Tensor) -> list[list[float]]:
    """Share of each layer's routed assignments that each expert took, (L, E) as lists
    (:func:`smoe.monitor.stats.shares`)."""
    return stats.shares(tokens_per_expert_LE).tolist()


def load_imbalance(tokens_per_expert_LE: torch.Tensor) -> tuple[float, list[float]]:
    """(mean over layers, per layer) of max/mean tokens per expert; 0 for a layer with none
    (:func:`smoe.monitor.stats.max_over_mean`)."""
    per_layer = stats.max_over_mean(tokens_per_expert_LE).tolist()
    return (sum(per_layer) / len(per_layer) if per_layer else 0.0), per_layer


def round_nested(values: list, digits: int = 6) -> list:
    return [round_nested(v, digits) if isinstance(v, list) else round(v, digits) for v in values]


@torch.no_grad()
def evaluate_model(model: nn.Module, val: Sequence, *,
                   val_bytes_per_token: dict[str | None, float] | None = None,
                   domain_names: Sequence[str] = (), bf16: bool = False) -> dict[str, Any]:
    """Validation loss, bits per byte (overall and per domain), expert loads, and the
    per-domain routing counts ``domain_routing[domain][layer][expert]``: assignments of
    that domain's tokens to that expert (the router's choice, before any capacity drop)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    bpt = dict(val_bytes_per_token or {})
    domain_names = tuple(domain_names)
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext())
    nd = max(len(domain_names), 1)
    loss_sum, n_tok = 0.0, 0
    loss_D = torch.zeros(nd, dtype=torch.float64)
    tok_D = torch.zeros(nd, dtype=torch.float64)
    counts_LE = routing_LDE = None
    try:
        for batch in val:
            x_BT, y_BT = batch[0].to(device), batch[1].to(device)
            dom_T = batch[2].reshape(-1).to(device).long()
            with autocast:
                out = model(x_BT)
            V = out.logits.shape[-1]
            ce_T = F.cross_entropy(out.logits.float().reshape(-1, V), y_BT.reshape(-1),
                                   reduction="none")
            loss_sum += float(ce_T.double().sum())
            n_tok += ce_T.numel()
            loss_D += torch.bincount(dom_T, weights=ce_T.double(), minlength=nd).cpu()[:nd]
            tok_D += torch.bincount(dom_T, minlength=nd).double().cpu()[:nd]
            if not out.moe_infos:
                continue
            c = torch.stack([i.tokens_per_expert for i in out.moe_infos]).cpu()
            counts_LE = c if counts_LE is None else counts_LE + c
            E = c.shape[1]
            r = torch.zeros(len(out.moe_infos), nd, E, dtype=torch.long)
            for li, info in enumerate(out.moe_infos):
                if info.expert_indices is None:  # expert choice: no per-token choice
                    continue
                flat = (dom_T[:, None] * E + info.expert_indices).reshape(-1)
                r[li] = torch.bincount(flat, minlength=nd * E).cpu()[: nd * E].view(nd, E)
            routing_LDE = r if routing_LDE is None else routing_LDE + r
    finally:
        model.train(was_training)
    val_loss = loss_sum / max(n_tok, 1)
    row: dict[str, Any] = {"val_loss": val_loss, "val_tokens": n_tok}
    if bpt.get(None):
        row["val_bpb"] = val_loss / math.log(2) / bpt[None]
    if domain_names:
        by_loss, by_bpb = {}, {}
        for d, name in enumerate(domain_names):
            if tok_D[d] > 0:
                by_loss[name] = float(loss_D[d] / tok_D[d])
                if bpt.get(name):
                    by_bpb[name] = by_loss[name] / math.log(2) / bpt[name]
        row["val_loss_by_domain"] = by_loss
        if by_bpb:
            row["val_bpb_by_domain"] = by_bpb
    if counts_LE is not None:
        imb, per_layer = load_imbalance(counts_LE)
        row.update(val_load_imbalance=imb, val_load_imbalance_per_layer=round_nested(per_layer, 4),
                   val_expert_load=round_nested(load_fractions(counts_LE), 5),
                   moe_layers=[i for i, _ in model.moe_layers()])
        if domain_names and routing_LDE is not None:
            row["domain_routing"] = {name: routing_LDE[:, d].tolist()
                                     for d, name in enumerate(domain_names)}
    return row


def eval_run(run_dir: str | Path, eval_batches: int | None = None,
             device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None
             ) -> dict[str, Any]:
    """Evaluate a run's latest checkpoint on its validation split (the run's eval settings,
    or ``eval_batches`` batches)."""
    from smoe.data import DataConfig, prepare_data, val_batches
    from smoe.runs import load_run

    run = load_run(run_dir, device, dtype)
    train = run.config.get("train")
    if not train:  # an imported model: default settings, the default corpus
        train = dict(_IMPORTED_EVAL, seq_len=min(256, run.model.config.max_seq_len))
    grad_accum = int(train.get("grad_accum", 1))
    data_cfg = run.config.get("data") or {"tokenizer": run.tokenizer.kind}
    data = prepare_data(DataConfig(**data_cfg), run_dir=run.run_dir)
    n = eval_batches if eval_batches is not None else int(train.get("eval_batches", 8))
    val = val_batches(data.val, int(train["batch_size"]) // grad_accum, int(train["seq_len"]),
                      max_batches=n * grad_accum)
    bpt: dict[str | None, float] = {None: data.val.bytes_per_token()}
    for name in data.val.domain_names:
        if data.val.num_tokens(name):
            bpt[name] = data.val.bytes_per_token(name)
    row = evaluate_model(run.model, val, val_bytes_per_token=bpt,
                         domain_names=data.val.domain_names, bf16=bool(train.get("bf16")))
    row["step"] = run.step
    return row


def format_eval(row: dict[str, Any]) -> str:
    """The evaluation row of :func:`evaluate_model` as a short report."""
    lines = [f"step {row.get('step', '?')}: validation loss {row['val_loss']:.4f} nats/token"
             + (f", {row['val_bpb']:.4f} bits/byte" if "val_bpb" in row else "")
             + f" ({row.get('val_tokens', 0):,} tokens)"]
    for d, loss in row.get("val_loss_by_domain", {}).items():
        bpb = row.get("val_bpb_by_domain", {}).get(d)
        lines.append(f"  {d:<8} loss {loss:.4f}" + (f", {bpb:.4f} bits/byte" if bpb else ""))
    if "val_expert_load" in row:
        lines.append(f"expert load on validation (share of routed tokens; mean max/mean "
                     f"{row['val_load_imbalance']:.2f}):")
        lines.append(format_load_table(row["val_expert_load"], row.get("moe_layers")))
    return "\n".join(lines)
