"""Autoregressive generation from :class:`smoe.model.SMoETransformer` with a KV cache.

Legend: B batch, T prompt length, V vocabulary.

    cache = KVCache.for_model(model, B, T + max_new_tokens)
    logits = model(prompt, kv_cache=cache, start_pos=0).logits[:, -1]      # prefill
    repeat: token = sample_next(logits); logits = model(token, kv_cache=cache, start_pos=t)

``use_cache=False`` recomputes the whole prefix at every step: the slow, obvious twin that the
tests hold the cached path equal to.

Length: prompt + max_new_tokens must fit in ``config.max_seq_len``, else ``ValueError``. No
sliding window: RoPE positions past max_seq_len were never trained, and cropping a cached
prefix would need its keys recomputed, so we refuse rather than silently change the context.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from smoe.model import KVCache, SMoETransformer

__all__ = ["generate", "sample_next"]


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


@torch.no_grad()
def generate(model: SMoETransformer, prompt_ids: torch.Tensor | Sequence[int],
             max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, eos_id: int | None = None, *,
             use_cache: bool = True) -> torch.Tensor:
    """Continue ``prompt_ids`` ((T,), (B, T) or a list of ints) by up to ``max_new_tokens``.

    Returns the prompt followed by the new tokens, a LongTensor on the model's device with the
    prompt's rank. ``temperature=0`` is greedy. Sampling draws from a local generator seeded
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
    idx = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    squeeze = idx.dim() == 1
    idx_BT = idx.unsqueeze(0) if squeeze else idx
    if idx_BT.dim() != 2 or idx_BT.shape[1] == 0:
        raise ValueError(f"prompt_ids must be a non-empty (T,) or (B, T) sequence, got shape "
                         f"{tuple(idx.shape)}")
    B, T = idx_BT.shape
    if T + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt length {T} + max_new_tokens {max_new_tokens} exceeds "
                         f"max_seq_len={cfg.max_seq_len}: shorten the prompt or generate less")
    if max_new_tokens == 0:
        return idx

    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        cache = KVCache.for_model(model, B, T + max_new_tokens) if use_cache else None
        logits_BV = model(idx_BT, kv_cache=cache, start_pos=0).logits[:, -1]
        done_B = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            next_B = sample_next(logits_BV, temperature, top_p, generator)
            if eos_id is not None:
                next_B = next_B.masked_fill(done_B, eos_id)
                done_B |= next_B == eos_id
            idx_BT = torch.cat([idx_BT, next_B[:, None]], dim=1)
            if step == max_new_tokens - 1 or (eos_id is not None and bool(done_B.all())):
                break
            if use_cache:
                out = model(next_B[:, None], kv_cache=cache, start_pos=idx_BT.shape[1] - 1)
            else:
                out = model(idx_BT)
            logits_BV = out.logits[:, -1]
    finally:
        model.train(was_training)
    return idx_BT[0] if squeeze else idx_BT
