"""Generation from prompts of different lengths (left-padded, positions -1 on padding): greedy
output equals generating each prompt alone, with and without the cache; the padded prefill's
logits equal each prompt's own within float tolerance; eos and the list return type."""

from __future__ import annotations

import pytest
import torch

from smoe.config import ModelConfig, MoEConfig
from smoe.inference import generate
from smoe.inference.generate import left_pad
from smoe.model import SMoETransformer

V = 64


def small_model(seed: int = 0, **moe_changes) -> SMoETransformer:
    moe = MoEConfig(hidden_size=32, expert_size=24, num_experts=4, top_k=2, **moe_changes)
    cfg = ModelConfig(vocab_size=V, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                      max_seq_len=48, qk_norm=True, ffn_size=48, first_dense_layers=1, moe=moe)
    torch.manual_seed(seed)
    return SMoETransformer(cfg).eval()


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_bias"])
def test_batch_of_different_lengths_equals_each_alone(router):
    model = small_model(router=router)
    ps = prompts([7, 1, 12, 4])
    alone = [generate(model, p, 10) for p in ps]
    for use_cache in (True, False):
        batch = generate(model, ps, 10, use_cache=use_cache)
        assert isinstance(batch, list) and len(batch) == 4
        for got, want, p in zip(batch, alone, ps):
            assert got.tolist()[:len(p)] == p and len(got) == len(p) + 10
            assert torch.equal(got, want)


def test_padded_prefill_logits_equal_each_prompt_alone():
    """Float tolerance: the padded rows run through masked attention over more keys and the
    sorted MoE path with other rows; the values differ from alone only by summation order."""
    model = small_model(seed=1)
    ps = prompts([5, 9, 2], seed=1)
    idx_BT, positions_BT = left_pad(ps)
    assert positions_BT[0].tolist() == [-1] * 4 + list(range(5))
    with torch.no_grad():
        logits = model(idx_BT, positions_BT=positions_BT).logits
        for b, p in enumerate(ps):
            own = model(torch.tensor([p])).logits[0]
            torch.testing.assert_close(logits[b, -len(p):], own, atol=1e-5, rtol=1e-5)
            assert torch.isfinite(logits[b]).all()  # padding rows too


def test_eos_cuts_each_row_and_zero_new_tokens():
    model = small_model(seed=2)
    ps = prompts([3, 6], seed=2)
    free = [generate(model, p, 8) for p in ps]
    eos = int(free[0][3 + 2])  # row 0's third new token
    out = generate(model, ps, 8, eos_id=eos)
    first = free[0][3:].tolist().index(eos)
    assert out[0].tolist() == free[0][:3 + first + 1].tolist()
    hits = free[1][6:].tolist()
    expected = free[1] if eos not in hits else free[1][:6 + hits.index(eos) + 1]
    assert out[1].tolist() == expected.tolist()
    assert [r.tolist() for r in generate(model, ps, 0)] == ps


def test_prompt_list_errors():
    model = small_model()
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, [[1, 2], []], 3)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1] * 40, [2]], 10)
