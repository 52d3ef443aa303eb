"""Autoregressive generation from :class:`smoe.model.SMoETransformer` with a KV cache.

Legend: B batch, T prompt length (the longest prompt), V vocabulary.

    cache = StaticCache.for_model(model, B, T + max_new_tokens)
    logits = model(prompt_BT, positions_BT=positions, cache=cache).logits[:, -1]   # prefill
    repeat: token = sample_next(logits); logits = model(token_B1, cache=cache).logits[:, -1]

Prompts of different lengths are **left-padded**: every row's last prompt token sits in the last
column, so one ``logits[:, -1]`` gives every row's next token; padding tokens get position -1,
which the cache neither stores nor lets anyone attend to, and real tokens keep positions
0..len-1, so each row computes what it would alone. (Co-batched rows share the MoE layers:
with a token-choice dropless router rows stay independent; a capacity factor lets rows compete
for expert slots, as in any batch.)

``use_cache=False`` recomputes the whole prefix at every step: the slow, obvious twin that the
tests hold the cached path equal to; it is also the twin a batching engine is held equal to.

Length: prompt + max_new_tokens must fit in ``config.max_seq_len``, else ``ValueError``. No
sliding window: RoPE positions past max_seq_len were never trained, and cropping a cached
prefix would need its keys recomputed, so we refuse rather than silently change the context.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from smoe.inference.cache import StaticCache
from smoe.model import SMoETransformer

__all__ = ["generate", "sample_next", "left_pad"]


def sample_next(logits_BV: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row, (B,): arg-max for ``temperature == 0``, else a sample from
    softmax(logits / temperature) restricted to the smallest set of tokens whose probability
    reaches ``top_p`` (nucleus sampling, Holtzman et al. 2019, arXiv 1904.09751)."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs_BV = F.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)
    sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
    # Drop a token when the tokens before it already reach top_p (the first always stays).
    drop_BV = sorted_BV.cumsum(dim=-1) - sorted_BV >= top_p
    choice_B1 = torch.multinomial(sorted_BV.masked_fill(drop_BV, 0.0), 1, generator=generator)
    return order_BV.gather(-1, choice_B1).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int] | torch.Tensor], pad_id: int = 0,
             device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx_BT, positions_BT) for prompts of different lengths, left-padded with ``pad_id``:
    real tokens at positions 0..len-1, padding at -1 (what the model and caches skip)."""
    rows = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in prompts]
    if not rows or any(r.numel() == 0 for r in rows):
        raise ValueError("prompts must be a non-empty list of non-empty token sequences")
    T = max(r.numel() for r in rows)
    idx_BT = torch.full((len(rows), T), pad_id, dtype=torch.long)
    positions_BT = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        idx_BT[b, T - r.numel():] = r
        positions_BT[b, T - r.numel():] = torch.arange(r.numel())
    return idx_BT.to(device), positions_BT.to(device)


def _is_prompt_list(prompt_ids) -> bool:
    return (isinstance(prompt_ids, (list, tuple)) and len(prompt_ids) > 0
            and not isinstance(prompt_ids[0], int)
            and not (isinstance(prompt_ids[0], torch.Tensor) and prompt_ids[0].dim() == 0))


@torch.no_grad()
def generate(model: SMoETransformer,
             prompt_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int] | torch.Tensor],
             max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, eos_id: int | None = None, *,
             use_cache: bool = True) -> torch.Tensor | list[torch.Tensor]:
    """Continue ``prompt_ids`` ((T,), (B, T), a list of ints, or a list of prompts of any
    lengths) by up to ``max_new_tokens``.

    Returns the prompt followed by the new tokens, a LongTensor on the model's device with the
    prompt's rank; for a list of prompts, a list of 1-D LongTensors (each stops after its
    ``eos_id``). Prompts of different lengths are left-padded (see the module docstring);
    greedy generation of a list equals generating each prompt alone. ``temperature=0`` is
    greedy. Sampling draws from a local generator seeded
    with ``seed`` (the same seed gives the same tokens; the global RNG is untouched); ``None``
    seeds it nondeterministically. With ``eos_id`` a row that emitted it is padded with it and
    generation stops once every row has. The model runs in eval mode (restored afterwards).
    """
    cfg = model.config
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a non-negative integer")
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature!r} must be >= 0 (0 is greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1]")
    if any(layer.config.router == "expert_choice" for _, layer in model.moe_layers()):
        raise ValueError("router='expert_choice' is not causal (each expert picks tokens from "
                         "the whole batch), so the model cannot generate; use a token-choice "
                         "router such as softmax_topk")
    device = model.embed.weight.device
    ragged = _is_prompt_list(prompt_ids)
    positions_BT = None
    if ragged:
        idx_BT, positions_BT = left_pad(prompt_ids, device=device)
        lengths = [int(n) for n in (positions_BT.amax(dim=1) + 1).tolist()]
        squeeze = False
    else:
        idx = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
        squeeze = idx.dim() == 1
        idx_BT = idx.unsqueeze(0) if squeeze else idx
        if idx_BT.dim() != 2 or idx_BT.shape[1] == 0:
            raise ValueError(f"prompt_ids must be a non-empty (T,) or (B, T) sequence, got "
                             f"shape {tuple(idx.shape)}")
    B, T = idx_BT.shape
    if T + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt length {T} + max_new_tokens {max_new_tokens} exceeds "
                         f"max_seq_len={cfg.max_seq_len}: shorten the prompt or generate less")
    if max_new_tokens == 0:
        return _unpad(idx_BT, lengths, T, eos_id) if ragged else idx

    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        cache = StaticCache.for_model(model, B, T + max_new_tokens) if use_cache else None
        logits_BV = model(idx_BT, positions_BT=positions_BT, cache=cache).logits[:, -1]
        done_B = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            next_B = sample_next(logits_BV, temperature, top_p, generator)
            if eos_id is not None:
                next_B = next_B.masked_fill(done_B, eos_id)
                done_B |= next_B == eos_id
            idx_BT = torch.cat([idx_BT, next_B[:, None]], dim=1)
            if step == max_new_tokens - 1 or (eos_id is not None and bool(done_B.all())):
                break
            if positions_BT is not None and not use_cache:
                positions_BT = torch.cat([positions_BT, positions_BT[:, -1:] + 1], dim=1)
            if use_cache:  # the cache continues each row after its own length
                out = model(next_B[:, None], cache=cache)
            else:
                out = model(idx_BT, positions_BT=positions_BT)
            logits_BV = out.logits[:, -1]
    finally:
        model.train(was_training)
    if ragged:
        return _unpad(idx_BT, lengths, T, eos_id)
    return idx_BT[0] if squeeze else idx_BT


def _unpad(idx_BT: torch.Tensor, lengths: list[int], T: int,
           eos_id: int | None) -> list[torch.Tensor]:
    """Each row without its left padding, cut after its first generated ``eos_id``."""
    rows = []
    for b, n in enumerate(lengths):
        row = idx_BT[b, T - n:]
        if eos_id is not None:
            hits = (row[n:] == eos_id).nonzero()
            if hits.numel():
                row = row[:n + int(hits[0]) + 1]
        rows.append(row)
    return rows
