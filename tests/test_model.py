"""The SMoE transformer: config validation and presets, counts, causality, losses, training step,
KV-cache generation, meta-device loading, layer placement and numerical parity with
transformers' Qwen3-MoE."""

from __future__ import annotations

import json
import math

import pytest
import torch

from smoe.config import PRESETS, ModelConfig, MoEConfig, preset
from smoe.inference import generate, sample_next
from smoe.model import KVCache, ModelOutput, SMoETransformer
from smoe.nn.experts import DenseMLP
from smoe.nn.moe import MoELayer

V = 64


def small_config(**changes) -> ModelConfig:
    """A fast model with GQA, qk-norm, one dense layer and 4 experts top-2."""
    base = dict(vocab_size=V, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                max_seq_len=32, qk_norm=True, ffn_size=48, first_dense_layers=1,
                moe=MoEConfig(hidden_size=32, expert_size=24, num_experts=4, top_k=2))
    base.update(changes)
    return ModelConfig(**base)


def build(config: ModelConfig, seed: int = 0) -> SMoETransformer:
    torch.manual_seed(seed)
    return SMoETransformer(config)


# -- config -----------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, field", [
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(num_heads=5, num_kv_heads=1), "num_heads"),
    (dict(num_heads=0), "num_heads"),
    (dict(moe_every=0), "moe_every"),
    (dict(first_dense_layers=-1), "first_dense_layers"),
    (dict(first_dense_layers=3), "first_dense_layers"),
    (dict(head_dim=7), "head_dim"),
    (dict(ffn_size=None), "ffn_size"),
    (dict(ffn_activation="tanh"), "ffn_activation"),
    (dict(qk_norm=1), "qk_norm"),
    (dict(dropout=1.0), "dropout"),
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(moe=MoEConfig(hidden_size=16, expert_size=8, num_experts=4)), "moe.hidden_size"),
])
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"^{field}="):
        small_config(**changes)


def test_unknown_preset_lists_known_names():
    with pytest.raises(ValueError, match="tiny-moe.*small-dense-wide"):
        preset("huge-moe")


def test_config_json_round_trip_and_replace():
    for cfg in (small_config(), preset("tiny-dense"), preset("small-moe")):
        again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg
    assert small_config().to_dict()["moe"]["num_experts"] == 4
    assert small_config().replace(num_layers=5).num_layers == 5
    with pytest.raises(ValueError, match="num_kv_heads"):
        small_config().replace(num_kv_heads=3)
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({**small_config().to_dict(), "n_embd": 3})
    assert preset("tiny-moe", max_seq_len=64).max_seq_len == 64


def test_presets_are_matched_families():
    moe, dense, wide = preset("tiny-moe"), preset("tiny-dense"), preset("tiny-dense-wide")
    assert (moe.vocab_size, moe.hidden_size, moe.num_layers, moe.num_heads, moe.num_kv_heads,
            moe.max_seq_len) == (257, 128, 4, 4, 2, 256)
    assert (moe.moe.num_experts, moe.moe.top_k, moe.moe.expert_size) == (8, 2, 256)
    assert moe.moe.router == "softmax_topk" and moe.moe.norm_topk_prob and not moe.qk_norm
    assert dense.moe is None and dense.ffn_size == 2 * 256
    assert wide.moe is None and wide.ffn_size == 8 * 256
    assert set(PRESETS) == {f"{s}-{k}" for s in ("tiny", "small", "micro")
                            for k in ("moe", "dense", "dense-wide")} | {"micro-moe32"}
    # the capacity experiment's family: same active FFN (2 x 128 = 256), 4x / 16x the experts
    m8, m32 = preset("micro-moe"), preset("micro-moe32")
    md, mw = preset("micro-dense"), preset("micro-dense-wide")
    assert (m8.hidden_size, m8.num_layers, m8.num_heads, m8.num_kv_heads) == (64, 4, 4, 2)
    assert (m8.moe.num_experts, m32.moe.num_experts, m8.moe.top_k, m32.moe.top_k) == (8, 32, 2, 2)
    assert m8.moe.expert_size == m32.moe.expert_size == 128
    assert (md.ffn_size, mw.ffn_size) == (256, 1024)
    # the same compute per token: only the router's extra rows (24 experts x 64 x 4 layers)
    assert m32.num_active_params(False) - m8.num_active_params(False) == (32 - 8) * 64 * 4


# -- counts -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_counts_match_built_model(name):
    cfg = preset(name)
    with torch.device("meta"):
        model = SMoETransformer(cfg)
    assert model.num_params() == sum(p.numel() for p in model.parameters()) == cfg.num_params()
    assert model.num_active_params() == cfg.num_active_params()
    assert (model.num_active_params(include_embedding=False)
            == cfg.num_active_params(include_embedding=False))


@pytest.mark.parametrize("moe_changes, model_changes", [
    (dict(num_shared_experts=2, shared_expert_gate=True), dict(tie_embeddings=True)),
    (dict(router="noisy_topk", router_bias=True), dict(qk_norm=False, ffn_activation="gelu")),
    (dict(activation="gelu", expert_bias=True, top_k=1), dict(head_dim=16, moe_every=2)),
])
def test_param_counts_of_moe_variants(moe_changes, model_changes):
    moe = MoEConfig(hidden_size=32, expert_size=24, num_experts=4, **moe_changes)
    cfg = small_config(moe=moe, **model_changes)
    with torch.device("meta"):
        model = SMoETransformer(cfg)
    assert model.num_params() == cfg.num_params()
    for emb in (True, False):
        assert model.num_active_params(emb) == cfg.num_active_params(emb)


def test_tiny_moe_counts_by_hand():
    cfg = preset("tiny-moe")
    D, Vb, L, E, K, Fe = 128, 257, 4, 8, 2, 256
    attn = D * D + 2 * D * 64 + D * D            # q, k, v (2 kv heads x 32), o
    expert = 3 * D * Fe                          # gate, up, down
    per_layer_total = attn + 2 * D + E * D + E * expert
    per_layer_active = attn + 2 * D + E * D + K * expert
    emb = 2 * Vb * D                             # embedding + untied lm_head
    assert cfg.num_params() == emb + L * per_layer_total + D
    assert cfg.num_active_params() == emb + L * per_layer_active + D == 1_054_080
    n = cfg.num_active_params(include_embedding=False)
    assert n == Vb * D + L * per_layer_active + D
    assert cfg.flops_per_token() == 6 * n + 12 * L * D * 256
    assert cfg.flops_per_token(seq_len=128) == 6 * n + 12 * L * D * 128


def test_dense_presets_match_active_and_total_params():
    for size in ("tiny", "small"):
        moe, dense, wide = (preset(f"{size}-{k}") for k in ("moe", "dense", "dense-wide"))
        routers = moe.num_layers * moe.moe.num_experts * moe.hidden_size
        assert moe.num_active_params() - dense.num_active_params() == routers
        assert moe.num_params() - wide.num_params() == routers
        assert dense.num_params() == dense.num_active_params()


# -- forward ----------------------------------------------------------------------------------
def test_causal_token_choice():
    for cfg in (small_config(), small_config(moe=MoEConfig(
            hidden_size=32, expert_size=24, num_experts=4, top_k=2, router="sigmoid_bias"))):
        model = build(cfg).eval()
        idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))
        t = 9
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 7) % V
        a, b = model(idx).logits, model(changed).logits
        torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], atol=1e-6, rtol=0)
        assert (a[:, t + 1] - b[:, t + 1]).abs().max() > 1e-3


def test_loss_at_init_is_log_vocab_and_outputs():
    model = build(preset("tiny-moe", num_layers=2, max_seq_len=64))
    idx = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -100
    out = model(idx, targets)
    assert isinstance(out, ModelOutput) and out.logits.shape == (4, 64, 257)
    assert abs(out.loss.item() - math.log(257)) < 0.05
    assert len(out.moe_infos) == 2 and out.aux_loss.item() > 0 and out.z_loss.item() > 0
    expected_aux = sum(i.aux_loss for i in out.moe_infos)
    torch.testing.assert_close(out.aux_loss, expected_aux)
    torch.testing.assert_close(out.total_loss, out.loss + out.aux_loss + out.z_loss)
    assert model(idx).loss is None


def test_one_step_reduces_loss():
    model = build(small_config())
    idx = torch.randint(0, V, (4, 32), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = model(idx[:, :-1], idx[:, 1:])
    before.total_loss.backward()
    opt.step()
    after = model(idx[:, :-1], idx[:, 1:])
    assert after.loss.item() < before.loss.item() - 1e-3


def test_dense_model_has_zero_aux_loss():
    model = build(small_config(moe=None))
    out = model(torch.zeros(1, 8, dtype=torch.long))
    assert out.aux_loss.item() == 0 and out.z_loss.item() == 0 and out.moe_infos == []
    assert list(model.moe_layers()) == []


@pytest.mark.parametrize("every, first, expected", [
    (1, 0, (0, 1, 2, 3, 4, 5)), (2, 0, (1, 3, 5)), (1, 2, (2, 3, 4, 5)), (2, 2, (3, 5)),
    (3, 1, (2, 5)),
])
def test_moe_layer_placement(every, first, expected):
    cfg = small_config(num_layers=6, moe_every=every, first_dense_layers=first)
    assert cfg.moe_layer_indices() == expected
    with torch.device("meta"):
        model = SMoETransformer(cfg)
    assert tuple(i for i, _ in model.moe_layers()) == expected
    for i, block in enumerate(model.layers):
        assert isinstance(block.ffn, MoELayer if i in expected else DenseMLP)


def test_init_scales_residual_projections():
    model = build(preset("tiny-moe"))
    std, out_std = 0.02, 0.02 / math.sqrt(8)
    assert abs(model.embed.weight.std().item() - std) < 2e-3
    assert abs(model.layers[0].attn.q_proj.weight.std().item() - std) < 2e-3
    assert abs(model.layers[0].attn.o_proj.weight.std().item() - out_std) < 1e-3
    assert abs(model.layers[0].ffn.experts.down_proj.std().item() - out_std) < 1e-3
    assert torch.equal(model.norm.weight, torch.ones(128))


def test_chunked_prefill_with_cache_equals_full_forward():
    model = build(small_config()).eval()
    idx = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(2))
    full = model(idx).logits
    cache = KVCache.for_model(model, batch_size=2)
    parts = [model(idx[:, :7], kv_cache=cache).logits,
             model(idx[:, 7:15], kv_cache=cache, start_pos=7).logits]
    parts += [model(idx[:, t:t + 1], kv_cache=cache, start_pos=t).logits for t in range(15, 20)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_meta_build_and_assign_load_gives_identical_logits():
    moe = MoEConfig(hidden_size=32, expert_size=24, num_experts=4, top_k=2, router="sigmoid_bias")
    for cfg in (small_config(), small_config(moe=moe, tie_embeddings=True)):
        ref = build(cfg).eval()
        idx = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(3))
        state = {k: v.clone() for k, v in ref.state_dict().items()}
        with torch.device("meta"):
            model = SMoETransformer(cfg)
        model.load_state_dict(state, assign=True)
        assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
        assert torch.equal(model.eval()(idx).logits, ref(idx).logits)
        model.train()(idx)  # the sigmoid_bias load counter was recreated, not left on meta
        model.update_router_biases()


def test_update_router_biases_moves_sigmoid_bias():
    moe = MoEConfig(hidden_size=32, expert_size=24, num_experts=4, top_k=2, router="sigmoid_bias")
    model = build(small_config(moe=moe))
    model(torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0)))
    model.update_router_biases()
    for _, layer in model.moe_layers():
        assert layer.router.expert_bias.abs().sum() > 0
    build(small_config()).update_router_biases()  # a no-op for other routers


# -- generation -------------------------------------------------------------------------------
def test_generate_with_cache_equals_without_cache():
    model = build(small_config())
    prompt = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(4))
    cached = generate(model, prompt, 20)
    plain = generate(model, prompt, 20, use_cache=False)
    assert cached.shape == (2, 25) and torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, plain)
    assert model.training  # mode restored
    one = generate(model, prompt[0].tolist(), 20)
    assert one.shape == (25,) and torch.equal(one, cached[0])
    sampled = generate(model, prompt, 20, temperature=0.8, top_p=0.9, seed=5)
    assert torch.equal(sampled, generate(model, prompt, 20, temperature=0.8, top_p=0.9, seed=5,
                                         use_cache=False))


def test_generate_seeds():
    model = build(small_config())
    prompt = [1, 2, 3]
    a = generate(model, prompt, 25, temperature=1.0, seed=11)
    b = generate(model, prompt, 25, temperature=1.0, seed=11)
    c = generate(model, prompt, 25, temperature=1.0, seed=12)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # a nucleus this small keeps only the most likely token: greedy
    assert torch.equal(generate(model, prompt, 10, temperature=1.0, top_p=1e-6, seed=1),
                       generate(model, prompt, 10))


def test_generate_eos_and_errors():
    model = build(small_config())
    greedy = generate(model, [1, 2, 3], 10)
    eos = int(greedy[5])
    out = generate(model, [1, 2, 3], 10, eos_id=eos)
    assert out.tolist() == greedy[:6].tolist()
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, list(range(30)), 5)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [1], 2, top_p=0.0)
    ec = small_config(moe=MoEConfig(hidden_size=32, expert_size=24, num_experts=4,
                                    router="expert_choice"))
    ec_model = build(ec)
    ec_model(torch.zeros(2, 8, dtype=torch.long))  # training forward is allowed
    with pytest.raises(ValueError, match="expert_choice"):
        generate(ec_model, [1, 2], 3)


def test_sample_next_top_p_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 0.7, g)) for _ in range(200)}
    assert draws == {0, 1}


# -- parity with transformers ---------------------------------------------------------------
def test_logits_match_transformers_qwen3_moe():
    transformers = pytest.importorskip("transformers")
    cfg = small_config(norm_eps=1e-6, rope_theta=1e4)
    model = build(cfg).eval()
    hf_cfg = transformers.Qwen3MoeConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=32, rms_norm_eps=1e-6, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, mlp_only_layers=[0], tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    hf = transformers.Qwen3MoeForCausalLM(hf_cfg).eval()
    names = {"embed.": "model.embed_tokens.", "norm.": "model.norm.", "lm_head.": "lm_head."}
    layer_names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                   "attn.": "self_attn.", "ffn.router.": "mlp.gate.", "ffn.": "mlp."}
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("layers."):
            new = "model." + key
            for ours, theirs in layer_names.items():
                new = new.replace(ours, theirs, 1)
        else:
            new = next(theirs + key[len(ours):] for ours, theirs in names.items()
                       if key.startswith(ours))
        state[new] = value
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert (missing, unexpected) == ([], [])
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits, hf(idx).logits, atol=1e-5, rtol=0)
