"""gpt-oss and DeepSeek-V3 across the Hugging Face boundary: what is exact is converted (checked
against transformers' own modules), what smoe's model cannot compute is refused by name.

The round trips of gpt-oss (smoe -> transformers logits and greedy tokens -> smoe, and a
transformers-saved gpt-oss folder -> smoe logits -> the same tensors back) run with the other
families in test_hf_convert.py (CASES "gpt_oss*", hf_model("gpt_oss")).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from test_hf_convert import (V, build, config, hf_model, moe, nothing_written,  # noqa: E402
                             one_line_error, tokens)

from smoe.hf.convert import export_hf, hf_format_for, import_hf  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")


# -- gpt-oss ----------------------------------------------------------------------------------
def oai(**changes):
    return moe(router="topk_softmax", activation="swiglu_oai", expert_bias=True,
               router_bias=True, **changes)


@pytest.mark.parametrize("cfg, feature", [
    (config(moe=oai(num_shared_experts=1)), "gpt_oss has no shared expert"),
    (config(moe=oai(), first_dense_layers=1), "MoE block in every layer"),
    (config(moe=oai(), qk_norm=True), "qk_norm"),
    (config(moe=oai().replace(router="softmax_topk", norm_topk_prob=False)),
     "without norm_topk_prob"),
    (config(moe=oai().replace(router="sigmoid_bias")), "router='sigmoid_bias'"),
    (config(moe=oai(routed_scaling_factor=2.0)), "routed scaling"),
    (config(moe=moe(expert_bias=True, router_bias=True)),
     "expert_bias=True, router_bias=True with activation='swiglu'"),
])
def test_gpt_oss_export_refuses_what_it_cannot_express(cfg, feature):
    with pytest.raises(ValueError, match=feature):
        hf_format_for(cfg)


def test_gpt_oss_layout_on_disk(tmp_path):
    """The interleaved, input x output expert layout transformers reads, and what the
    attention gets so that it is smoe's."""
    model = build(config(moe=oai()))
    export_hf(model, tmp_path / "hf")
    from safetensors.torch import load_file

    hf = load_file(str(tmp_path / "hf" / "model.safetensors"))
    experts = model.layers[0].ffn.experts
    gate, up = experts.gate_up_proj.detach().chunk(2, dim=1)      # [E, F, D]
    on_disk = hf["model.layers.0.mlp.experts.gate_up_proj"]        # [E, D, 2F]
    assert torch.equal(on_disk[..., 0::2], gate.transpose(1, 2))
    assert torch.equal(on_disk[..., 1::2], up.transpose(1, 2))
    b_gate, b_up = experts.gate_up_proj_bias.detach().chunk(2, dim=1)
    assert torch.equal(hf["model.layers.0.mlp.experts.gate_up_proj_bias"][:, 1::2], b_up)
    assert torch.equal(hf["model.layers.0.mlp.experts.gate_up_proj_bias"][:, 0::2], b_gate)
    assert torch.isneginf(hf["model.layers.2.self_attn.sinks"]).all()
    assert not hf["model.layers.1.self_attn.o_proj.bias"].any()
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["layer_types"] == ["full_attention"] * 3
    assert cfg["sliding_window"] == model.config.max_seq_len


def released_like_gpt_oss(tmp_path, **changes):
    """A tiny gpt-oss as released: sliding-window layers, YaRN RoPE, learned sinks."""
    cfg = transformers.GptOssConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=24, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=64, sliding_window=8, **changes)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp_path / "hf"))


def test_released_gpt_oss_is_refused_naming_each_feature(tmp_path, capsys):
    released_like_gpt_oss(tmp_path)
    err = one_line_error(capsys, ["import", str(tmp_path / "hf"), str(tmp_path / "run")])
    for feature in ("sliding_window=8 on 1 of 2 layers", "rope_type='yarn'",
                    "attention sinks"):
        assert feature in err
    assert nothing_written(tmp_path)


def test_learned_sinks_and_attention_biases_are_refused(tmp_path):
    released_like_gpt_oss(tmp_path, layer_types=["full_attention"] * 2,
                          rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.sinks holds learned attention"):
        import_hf(tmp_path / "hf", tmp_path / "run")
    assert nothing_written(tmp_path)

    hf = hf_model("gpt_oss")  # sinks -inf, attention biases zero: importable
    with torch.no_grad():
        hf.model.layers[1].self_attn.v_proj.bias.fill_(0.5)
    hf.save_pretrained(str(tmp_path / "hf2"))
    with pytest.raises(ValueError, match=r"v_proj\.bias is not zero"):
        import_hf(tmp_path / "hf2", tmp_path / "run")
    assert nothing_written(tmp_path)


# -- DeepSeek-V3 ------------------------------------------------------------------------------
def deepseek_v3_config(**changes):
    base = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=24,
                n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4,
                topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1,
                kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4,
                v_head_dim=8, max_position_embeddings=64,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    base.update(changes)
    return transformers.DeepseekV3Config(**base)


def test_deepseek_v3_import_is_refused_naming_mla(tmp_path, capsys):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(deepseek_v3_config())
    hf.save_pretrained(str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=r"multi-head latent attention \(MLA: kv_lora_rank=16"):
        import_hf(tmp_path / "hf", tmp_path / "run")
    err = one_line_error(capsys, ["import", str(tmp_path / "hf"), str(tmp_path / "run")])
    assert "glm4_moe" in err and "deepseek_v3" in err
    assert nothing_written(tmp_path)


def test_deepseek_v3_moe_is_smoe_sigmoid_bias_exported_as_glm4_moe(tmp_path):
    """The DeepSeek-V3 MoE block (sigmoid scores, selection bias, 4 groups of which 2 are
    searched, routed scaling 2.5, a shared expert) is exact in smoe: transformers' own
    DeepseekV3MoE, given the MoE weights smoe exports as glm4_moe, computes smoe's layer."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = config(first_dense_layers=1, moe=moe(
        router="sigmoid_bias", num_experts=8, n_groups=4, topk_groups=2,
        routed_scaling_factor=2.5, num_shared_experts=1))
    model = build(cfg)
    result = export_hf(model, tmp_path / "hf")
    assert result.family == "glm4_moe"
    glm = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"),
                                                            dtype=torch.float32)
    block = DeepseekV3MoE(deepseek_v3_config()).eval()
    block.load_state_dict(glm.model.layers[1].mlp.state_dict(), strict=True)
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours, _ = model.layers[1].ffn(x)
        theirs = block(x)
    # float32, the same operations in a different order (expert loop vs grouped GEMM): the
    # outputs are O(1), so 1e-5 is a few ulps of accumulated rounding, far below any routing
    # difference (a different expert changes outputs by O(0.1)).
    assert (ours - theirs).abs().max().item() <= 1e-5
    idx = tokens()
    with torch.no_grad():
        assert (model(idx).logits - glm(idx).logits).abs().max().item() <= 1e-5


def test_quantized_gpt_oss_is_refused_for_its_architecture_first(tmp_path):
    """The released gpt-oss is MXFP4-quantized: the reason that matters (what smoe's model
    lacks) comes first, since unquantized weights would not help."""
    released_like_gpt_oss(tmp_path)
    path = tmp_path / "hf" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="sliding_window=8") as info:
        import_hf(tmp_path / "hf", tmp_path / "run")
    assert "quantization_config" not in str(info.value)
