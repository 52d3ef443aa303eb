"""Caches and per-row positions: the static cache (chunked prefill, the old ``kv_cache=`` /
``start_pos=`` spelling), the slot cache (allocate/free, one forward over slots of different
lengths, mixed prefill and decode rows with padding), the cache's mask, and losses computed only
when read (a decode step runs the same operators whatever the loss coefficients).

Cached logits are compared with a full forward of each sequence at 1e-5: the same math in a
different summation order (masked attention over more keys, other rows in the MoE batch).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from smoe.config import ModelConfig, MoEConfig
from smoe.inference.cache import SlotCache, StaticCache, causal_position_mask
from smoe.model import KVCache, SMoETransformer

V = 64
TOL = dict(atol=1e-5, rtol=1e-5)


def small_model(seed: int = 0, max_seq_len: int = 40, **moe_changes) -> SMoETransformer:
    moe = MoEConfig(hidden_size=32, expert_size=24, num_experts=4, top_k=2, **moe_changes)
    cfg = ModelConfig(vocab_size=V, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                      max_seq_len=max_seq_len, qk_norm=True, ffn_size=48, first_dense_layers=1,
                      moe=moe)
    torch.manual_seed(seed)
    return SMoETransformer(cfg).eval()


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_static_cache_continues_rows_and_old_spelling_still_works():
    model = small_model()
    idx = torch.stack([tokens(20, 1), tokens(20, 2)])
    full = model(idx).logits
    cache = StaticCache.for_model(model, 2)
    parts = [model(idx[:, :6], cache=cache).logits, model(idx[:, 6:13], cache=cache).logits]
    parts += [model(idx[:, t:t + 1], cache=cache).logits for t in range(13, 20)]
    assert cache.lengths == [20, 20]
    torch.testing.assert_close(torch.cat(parts, 1), full, **TOL)
    assert KVCache is StaticCache
    old = KVCache.for_model(model, batch_size=2)
    again = [model(idx[:, :9], kv_cache=old, start_pos=0).logits,
             model(idx[:, 9:10], kv_cache=old, start_pos=9).logits]
    torch.testing.assert_close(torch.cat(again, 1), full[:, :10], **TOL)
    with pytest.raises(ValueError, match="batch size"):
        model(idx[:1, :2], cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(idx[:, :5], cache=StaticCache.for_model(model, 2, max_seq_len=4))
    with pytest.raises(ValueError, match="not both"):
        model(idx, cache=cache, kv_cache=old)


@torch.no_grad()
def test_slot_cache_decodes_slots_of_different_lengths_in_one_call():
    """Slots [3, 7, 9] with lengths 17, 4, 30 decode one token each in a single forward."""
    model = small_model(seed=3)
    cache = SlotCache.for_model(model, num_slots=10)
    slots = [cache.allocate() for _ in range(10)]
    assert slots == list(range(10)) and cache.num_free == 0
    for s in (0, 1, 2, 4, 5, 6, 8):
        cache.free(s)
    seqs = {3: tokens(18, 3), 7: tokens(5, 7), 9: tokens(31, 9)}
    for s, seq in seqs.items():  # prefill each alone, through a one-slot view
        model(seq[None, :-1], cache=cache.select([s]))
    assert [cache.length(s) for s in (3, 7, 9)] == [17, 4, 30]
    last_B1 = torch.stack([seqs[s][-1:] for s in (3, 7, 9)])
    logits = model(last_B1, cache=cache.select([3, 7, 9])).logits[:, -1]
    assert [cache.length(s) for s in (3, 7, 9)] == [18, 5, 31]
    for b, s in enumerate((3, 7, 9)):
        torch.testing.assert_close(logits[b], model(seqs[s][None]).logits[0, -1], **TOL)


@torch.no_grad()
def test_slot_cache_mixes_prefill_and_decode_rows_with_padding():
    """Continuous batching: one row decodes one token (left-padded to the chunk width) while
    another prefills three, in one forward over contiguous slots (views) and reversed (copies)."""
    model = small_model(seed=4)
    a, b = tokens(12, 40), tokens(9, 41)
    for order in ([0, 1], [1, 0]):
        cache = SlotCache.for_model(model, num_slots=2)
        cache.allocate(), cache.allocate()
        model(a[None, :11], cache=cache.select([0]))     # slot 0: 11 stored, decodes 1
        model(b[None, :6], cache=cache.select([1]))      # slot 1: 6 stored, prefills 3
        rows = {0: (torch.tensor([0, 0, a[11]]), torch.tensor([-1, -1, 11])),
                1: (b[6:9], torch.tensor([6, 7, 8]))}
        idx_BT = torch.stack([rows[s][0] for s in order])
        pos_BT = torch.stack([rows[s][1] for s in order])
        logits = model(idx_BT, positions_BT=pos_BT, cache=cache.select(order)).logits
        assert torch.isfinite(logits).all()
        got = {s: logits[i] for i, s in enumerate(order)}
        torch.testing.assert_close(got[0][-1], model(a[None]).logits[0, -1], **TOL)
        torch.testing.assert_close(got[1], model(b[None]).logits[0, 6:9], **TOL)
        assert cache.lengths == [12, 9]


def test_slot_allocation_errors():
    cache = SlotCache(num_layers=1, num_slots=2, max_seq_len=8, num_kv_heads=1, head_size=4)
    s0, s1 = cache.allocate(), cache.allocate()
    with pytest.raises(ValueError, match="in use"):
        cache.allocate()
    cache.free(s0)
    with pytest.raises(ValueError, match="slot=0"):
        cache.free(s0)
    with pytest.raises(ValueError, match="not allocated"):
        cache.select([s0, s1])
    with pytest.raises(ValueError, match="distinct"):
        cache.select([s1, s1])
    assert cache.allocate() == s0 and cache.length(s0) == 0
    with pytest.raises(ValueError, match="num_slots"):
        SlotCache(num_layers=1, num_slots=0, max_seq_len=8, num_kv_heads=1, head_size=4)


def test_causal_position_mask_by_hand():
    pos = torch.tensor([[-1, 0, 1], [3, 4, 5]])
    mask = causal_position_mask(pos, 6)
    assert mask[0].tolist() == [[True] * 6,
                                [True, False, False, False, False, False],
                                [True, True, False, False, False, False]]
    assert mask[1, 0].tolist() == [True] * 4 + [False] * 2
    assert mask[1, 2].tolist() == [True] * 6


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def test_decode_step_pays_nothing_for_losses():
    """With z-loss, Switch and sequence-wise losses on, one decode step runs exactly the
    operators it runs with them off; reading the output's losses then computes them."""
    counts = []
    for coefs in (dict(aux_loss_coef=0.0, z_loss_coef=0.0),
                  dict(aux_loss_coef=0.01, z_loss_coef=0.001, seq_aux_loss_coef=0.01)):
        model = small_model(seed=5, **coefs)
        cache = StaticCache.for_model(model, 1)
        model(tokens(6, 5)[None], cache=cache)
        with _CountOps() as mode:
            out = model(tokens(1, 6)[None], cache=cache)
        counts.append(mode.ops)
        assert "aten.logsumexp" not in mode.ops
    assert counts[0] == counts[1]
    assert float(out.z_loss) > 0 and float(out.aux_loss) > 0


@torch.no_grad()
def test_rewinding_a_row_forgets_what_came_after():
    """Writing at position p makes the row's length p + 1: later keys are stale and unseen."""
    model = small_model(seed=6)
    a, b = tokens(10, 60), tokens(4, 61)
    cache = StaticCache.for_model(model, 1)
    model(a[None], cache=cache)
    model(b[None, :2], positions_BT=torch.tensor([[3, 4]]), cache=cache)  # rewrite 3, 4
    assert cache.lengths == [5]
    logits = model(b[None, 2:], cache=cache).logits                      # continues at 5
    expected = model(torch.cat([a[:3], b])[None]).logits[:, -2:]
    torch.testing.assert_close(logits, expected, **TOL)
