"""Tests for ``smoe.plan``: exact parameter counts against transformers for every supported family,
the published sizes of Mixtral-8x7B / Qwen3-30B-A3B / DeepSeek-V3, weight bytes, errors and the CLI.

The transformers comparisons build the models on the meta device (no memory, milliseconds), so
they run on tiny configs *and* on the real published configs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from smoe.cli import main
from smoe.plan import (
    QUANT_FORMATS,
    SUPPORTED_MODEL_TYPES,
    PlanResult,
    plan_from_config,
    plan_from_path,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=101, intermediate_size=48)
MLA = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, vocab_size=101,
           intermediate_size=48, moe_intermediate_size=16, q_lora_rank=24, kv_lora_rank=16,
           qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
E4K2 = dict(num_experts_per_tok=2)

#: id -> (model_type, config kwargs); every variant switches on a different counted part.
CASES: dict[str, tuple[str, dict]] = {
    "mixtral": ("mixtral", dict(TINY, num_local_experts=4, **E4K2)),
    "mixtral-tied-head_dim": ("mixtral", dict(TINY, num_local_experts=4, head_dim=12,
                                              tie_word_embeddings=True, **E4K2)),
    "qwen2_moe-qkv_bias-shared": ("qwen2_moe", dict(TINY, moe_intermediate_size=16, num_experts=4,
                                                    shared_expert_intermediate_size=40, **E4K2)),
    "qwen2_moe-nobias-sparse_step-tied": ("qwen2_moe", dict(
        TINY, moe_intermediate_size=16, num_experts=4, shared_expert_intermediate_size=40,
        qkv_bias=False, decoder_sparse_step=2, tie_word_embeddings=True, **E4K2)),
    "qwen2_moe-mlp_only_layers": ("qwen2_moe", dict(
        TINY, moe_intermediate_size=16, num_experts=4, shared_expert_intermediate_size=40,
        mlp_only_layers=[0, 3], **E4K2)),
    "qwen3_moe-qk_norm-head_dim": ("qwen3_moe", dict(TINY, head_dim=12, moe_intermediate_size=16,
                                                     num_experts=4, **E4K2)),
    "qwen3_moe-bias-dense_layers": ("qwen3_moe", dict(
        TINY, head_dim=12, moe_intermediate_size=16, num_experts=4, attention_bias=True,
        decoder_sparse_step=2, mlp_only_layers=[1], **E4K2)),
    "olmoe-qk_norm-gqa": ("olmoe", dict(TINY, num_experts=4, **E4K2)),
    "olmoe-bias-tied": ("olmoe", dict(TINY, num_experts=4, attention_bias=True,
                                      tie_word_embeddings=True, **E4K2)),
    "deepseek_v3-mla-first_k_dense": ("deepseek_v3", dict(
        MLA, first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1, n_group=2,
        topk_group=1, **E4K2)),
    "deepseek_v3-no_q_lora-2shared-bias-tied": ("deepseek_v3", dict(
        MLA | {"q_lora_rank": None}, first_k_dense_replace=0, n_routed_experts=4,
        n_shared_experts=2, attention_bias=True, tie_word_embeddings=True, n_group=2,
        topk_group=1, **E4K2)),
    "deepseek_v3-mtp": ("deepseek_v3", dict(MLA, first_k_dense_replace=2, n_routed_experts=4,
                                            n_group=2, topk_group=1, num_nextn_predict_layers=1,
                                            **E4K2)),
    "deepseek_v2": ("deepseek_v2", dict(MLA, first_k_dense_replace=2, n_routed_experts=4,
                                        n_shared_experts=2, **E4K2)),
    "deepseek_v2-lite-mlp_bias": ("deepseek_v2", dict(MLA | {"q_lora_rank": None}, mlp_bias=True,
                                                      first_k_dense_replace=1, n_routed_experts=4,
                                                      n_shared_experts=1, **E4K2)),
    "gpt_oss-sinks-biases": ("gpt_oss", dict(TINY, head_dim=12, num_local_experts=4, **E4K2)),
    "gpt_oss-no_attention_bias-tied": ("gpt_oss", dict(TINY, num_local_experts=4, head_dim=8,
                                                       attention_bias=False,
                                                       tie_word_embeddings=True, **E4K2)),
    "phimoe-layernorm": ("phimoe", dict(TINY, num_local_experts=4, **E4K2)),
    "phimoe-biases-tied": ("phimoe", dict(TINY, num_local_experts=4, attention_bias=True,
                                          lm_head_bias=True, tie_word_embeddings=True, **E4K2)),
    "granitemoe": ("granitemoe", dict(TINY, num_local_experts=4, **E4K2)),
    "granitemoe-bias": ("granitemoe", dict(TINY, num_local_experts=4, attention_bias=True, **E4K2)),
    "dbrx-nested": ("dbrx", dict(d_model=32, n_heads=4, n_layers=3, vocab_size=101,
                                 attn_config={"kv_n_heads": 2, "rope_theta": 1e4},
                                 ffn_config={"ffn_hidden_size": 48, "moe_num_experts": 4,
                                             "moe_top_k": 2})),
    "llama4_text-interleave": ("llama4_text", dict(TINY, head_dim=12, intermediate_size_mlp=64,
                                                   num_local_experts=4, num_experts_per_tok=1,
                                                   interleave_moe_layer_step=2)),
    "llama4_text-moe_layers-tied": ("llama4_text", dict(TINY, intermediate_size_mlp=64,
                                                        num_local_experts=4, moe_layers=[0, 3],
                                                        tie_word_embeddings=True, **E4K2)),
    "jamba": ("jamba", dict(TINY, num_experts=4, attn_layer_period=2, attn_layer_offset=1,
                            expert_layer_period=2, expert_layer_offset=0, **E4K2)),
    "jamba-mamba_options": ("jamba", dict(TINY, num_experts=4, num_hidden_layers=5,
                                          mamba_proj_bias=True, mamba_conv_bias=False,
                                          mamba_dt_rank=5, mamba_d_state=8, mamba_expand=3,
                                          attn_layer_period=3, attn_layer_offset=2, **E4K2)),
    "llama-dense-bias": ("llama", dict(TINY, attention_bias=True, mlp_bias=True)),
    "mistral-dense": ("mistral", dict(TINY, head_dim=12)),
    "qwen3-dense-qk_norm": ("qwen3", dict(TINY, head_dim=12, tie_word_embeddings=True)),
}


def hf_param_count(model_type: str, kwargs: dict) -> int:
    """``sum(p.numel())`` of ``AutoModelForCausalLM.from_config`` built on the meta device."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    cfg = transformers.AutoConfig.for_model(model_type, **kwargs)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("case", CASES)
def test_total_matches_transformers_exactly(case, tmp_path):
    model_type, kwargs = CASES[case]
    expected = hf_param_count(model_type, kwargs)
    assert plan_from_config({"model_type": model_type, **kwargs}).total_params == expected
    # and from the config.json transformers itself writes
    transformers = pytest.importorskip("transformers")
    transformers.AutoConfig.for_model(model_type, **kwargs).save_pretrained(tmp_path)
    result = plan_from_path(tmp_path)
    assert result.total_params == expected
    assert sum(result.breakdown.values()) == result.total_params
    assert result.expert_params + result.non_expert_params == result.total_params
    assert result.active_params <= result.total_params


def test_every_family_has_a_transformers_case():
    own = set(SUPPORTED_MODEL_TYPES) - {"smoe", "grok-1", "grok1", "grok", "qwen3_5_moe"}
    assert {mt for mt, _ in CASES.values()} | {"llama4"} == own


# --- the published models ---------------------------------------------------------------------

MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 32000, "num_local_experts": 8,
    "num_experts_per_tok": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
    "rope_theta": 1e6, "sliding_window": None, "tie_word_embeddings": False, "hidden_act": "silu",
    "bos_token_id": 1, "eos_token_id": 2, "router_aux_loss_coef": 0.02, "torch_dtype": "bfloat16",
}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
    "num_experts_per_tok": 8, "vocab_size": 151936, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "norm_topk_prob": True, "attention_bias": False,
    "tie_word_embeddings": False, "max_position_embeddings": 40960, "rope_theta": 1e6,
    "rms_norm_eps": 1e-6, "sliding_window": None, "use_sliding_window": False,
    "max_window_layers": 48, "hidden_act": "silu", "torch_dtype": "bfloat16",
}
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "first_k_dense_replace": 3,
    "moe_layer_freq": 1, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc",
    "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "vocab_size": 129280, "num_nextn_predict_layers": 1,
    "tie_word_embeddings": False, "attention_bias": False, "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6, "hidden_act": "silu", "torch_dtype": "bfloat16",
}
HF_IGNORED = ("architectures", "model_type", "torch_dtype", "rope_theta", "topk_method",
              "scoring_func", "moe_layer_freq")


def _write(tmp_path: Path, cfg: dict, name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("cfg", [MIXTRAL_8X7B, QWEN3_30B_A3B, DEEPSEEK_V3],
                         ids=["mixtral", "qwen3", "deepseek_v3"])
def test_published_configs_match_transformers_exactly(cfg):
    kwargs = {k: v for k, v in cfg.items() if k not in HF_IGNORED}
    assert plan_from_config(cfg).total_params == hf_param_count(cfg["model_type"], kwargs)


def test_mixtral_8x7b_published(tmp_path):
    r = plan_from_path(_write(tmp_path, MIXTRAL_8X7B))
    assert r.total_params == 46_702_792_704
    assert abs(r.total_params / 46.7e9 - 1) < 0.01
    assert abs(r.active_params / 12.9e9 - 1) < 0.01          # Mistral counts the embeddings
    assert r.num_moe_layers == 32 and r.num_experts == 8 and r.top_k == 2


def test_qwen3_30b_a3b_published(tmp_path):
    r = plan_from_path(_write(tmp_path, QWEN3_30B_A3B))
    assert abs(r.total_params / 30.5e9 - 1) < 0.01
    # Qwen's "3.3B activated" is 3.353B truncated to one decimal (with embeddings and lm_head):
    # 1.6% above 3.3B; their "29.9B non-embedding" total likewise excludes embedding and lm_head.
    assert math.floor(r.active_params / 1e8) == 33
    assert abs(r.active_params / 3.3e9 - 1) < 0.02
    assert math.floor((r.total_params - r.embedding_params - r.lm_head_params) / 1e8) == 299


def test_deepseek_v3_published(tmp_path):
    r = plan_from_path(_write(tmp_path, DEEPSEEK_V3))
    assert abs(r.total_params / 671e9 - 1) < 0.01            # MTP module not included
    assert r.num_moe_layers == 58 and r.num_shared_experts == 1
    # DeepSeek's "37B activated" matches the count without the input embedding (36.63B, -1.0%);
    # with it the count is 37.55B (+1.5%).
    assert round(r.active_params_no_embedding / 1e9) == 37
    assert abs(r.active_params_no_embedding / 37e9 - 1) < 0.011
    # 671B + the MTP module (with its own embedding/head copies) ~ the 685B checkpoint
    assert abs((r.total_params + r.mtp_params) / 685e9 - 1) < 0.01
    assert any("num_nextn_predict_layers" in n for n in r.notes)


GPT_OSS_120B = {"model_type": "gpt_oss", "hidden_size": 2880, "intermediate_size": 2880,
                "num_hidden_layers": 36, "num_attention_heads": 64, "num_key_value_heads": 8,
                "head_dim": 64, "num_local_experts": 128, "num_experts_per_tok": 4,
                "vocab_size": 201088, "attention_bias": True, "sliding_window": 128,
                "tie_word_embeddings": False}
OLMOE_1B_7B = {"model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024,
               "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
               "num_experts": 64, "num_experts_per_tok": 8, "vocab_size": 50304,
               "tie_word_embeddings": False}
DEEPSEEK_V2_LITE = {"model_type": "deepseek_v2", "hidden_size": 2048, "intermediate_size": 10944,
                    "moe_intermediate_size": 1408, "num_hidden_layers": 27,
                    "num_attention_heads": 16, "first_k_dense_replace": 1,
                    "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
                    "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                    "qk_rope_head_dim": 64, "v_head_dim": 128, "vocab_size": 102400}


@pytest.mark.parametrize("cfg, total, active, with_embedding", [
    (MIXTRAL_8X7B, 46.7e9, 12.9e9, True),
    (QWEN3_30B_A3B, 30.5e9, 3.3e9, True),
    (OLMOE_1B_7B, 6.9e9, 1.3e9, True),
    (DEEPSEEK_V3, 671e9, 37e9, False),
    (DEEPSEEK_V2_LITE, 15.7e9, 2.4e9, False),
    (GPT_OSS_120B, 117e9, 5.1e9, False),
    (GPT_OSS_120B | {"num_hidden_layers": 24, "num_local_experts": 32}, 21e9, 3.6e9, False),
], ids=["mixtral", "qwen3", "olmoe", "deepseek_v3", "deepseek_v2_lite", "gpt_oss_120b",
        "gpt_oss_20b"])
def test_vendor_active_conventions(cfg, total, active, with_embedding):
    """Which of the two "active" conventions is closer to each vendor's published figure."""
    r = plan_from_config(cfg)
    assert abs(r.total_params / total - 1) < 0.01
    chosen, other = r.active_params, r.active_params_no_embedding
    if not with_embedding:
        chosen, other = other, chosen
    assert abs(chosen / active - 1) < 0.025
    assert abs(chosen - active) < abs(other - active)


# --- active parameters and bytes against hand formulas -----------------------------------------


def test_active_params_hand_formula_mixtral():
    h, i, layers, e, k, v = 4096, 14336, 32, 8, 2, 32000
    r = plan_from_config(MIXTRAL_8X7B)
    attention = 2 * h * h + 2 * h * 1024
    per_layer_active = attention + k * 3 * h * i + e * h + 2 * h   # + router + 2 norms
    expected = layers * per_layer_active + 2 * v * h + h            # embed, lm_head, final norm
    assert r.active_params == expected
    assert r.active_params_no_embedding == expected - v * h
    assert r.expert_params == layers * e * 3 * h * i


@pytest.mark.parametrize("case", ["deepseek_v3-mla-first_k_dense", "qwen2_moe-mlp_only_layers",
                                  "gpt_oss-sinks-biases", "llama4_text-moe_layers-tied"])
def test_active_is_total_minus_unused_experts(case):
    model_type, kwargs = CASES[case]
    r = plan_from_config({"model_type": model_type, **kwargs})
    h = kwargs["hidden_size"]
    inter = kwargs.get("moe_intermediate_size", kwargs["intermediate_size"])
    per_expert = 3 * h * inter + (2 * inter + h if model_type == "gpt_oss" else 0)
    unused = r.num_moe_layers * (r.num_experts - r.top_k) * per_expert
    assert r.active_params == r.total_params - unused
    assert r.expert_params == r.num_moe_layers * r.num_experts * per_expert
    tied = kwargs.get("tie_word_embeddings", False)
    embed = kwargs["vocab_size"] * h
    assert r.active_params_no_embedding == r.active_params - (0 if tied else embed)


def _quant_bytes(matrices, other_params, bits, group, scale_bytes):
    """Independent statement of the convention: weights at ``bits``, one scale per output row
    (``group=None``) or per ``group`` input elements, everything else bf16."""
    out = 2 * other_params
    for rows, cols, n in matrices:
        groups = 1 if group is None else -(-cols // group)
        out += n * (rows * cols * bits // 8 + rows * groups * scale_bytes)
    return out


def test_weight_bytes_convention():
    h, i, heads, kv, v, e = 200, 300, 4, 2, 101, 2  # 200 and 300 are not multiples of 128
    cfg = dict(model_type="mixtral", hidden_size=h, intermediate_size=i, num_hidden_layers=1,
               num_attention_heads=heads, num_key_value_heads=kv, vocab_size=v,
               num_local_experts=e, num_experts_per_tok=1)
    r = plan_from_config(cfg)
    hd = h // heads
    matrices = [(heads * hd, h, 1), (kv * hd, h, 2), (h, heads * hd, 1),
                (2 * i, h, e), (h, i, e)]
    linear = sum(rows * cols * n for rows, cols, n in matrices)
    other = r.total_params - linear  # embedding, lm_head, router, norms
    assert other == 2 * v * h + e * h + 3 * h
    assert r.weight_bytes["fp32"] == 4 * r.total_params
    assert r.weight_bytes["bf16"] == 2 * r.total_params
    assert r.weight_bytes["int8"] == _quant_bytes(matrices, other, 8, None, 4)
    assert r.weight_bytes["fp8"] == r.weight_bytes["int8"]
    assert r.weight_bytes["int4"] == _quant_bytes(matrices, other, 4, 128, 2)
    assert set(r.weight_bytes) == {"fp32", "bf16", "fp8", "int8", "int4"} == \
        {"fp32", "bf16", *QUANT_FORMATS}


def test_int4_is_4_125_bits_per_quantized_weight():
    r = plan_from_config(MIXTRAL_8X7B)  # every input dim is a multiple of 128
    quantized = r.breakdown["attention"] + r.breakdown["routed_experts"]
    kept = r.total_params - quantized
    assert r.weight_bytes["int4"] == quantized * 4.125 / 8 + 2 * kept


# --- nested configs ----------------------------------------------------------------------------


def test_llama4_text_config_counts_the_text_model_only(tmp_path):
    model_type, kwargs = CASES["llama4_text-interleave"]
    cfg = {"model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"],
           "text_config": {"model_type": "llama4_text", **kwargs},
           "vision_config": {"model_type": "llama4_vision_model", "hidden_size": 64}}
    r = plan_from_path(_write(tmp_path, cfg))
    assert r.model_type == "llama4_text"
    assert r.total_params == hf_param_count(model_type, kwargs)
    assert any("text_config only" in n for n in r.notes)
    assert r.num_moe_layers == 2


def test_text_config_inherits_top_level_tie_word_embeddings():
    inner = {"model_type": "mixtral", **CASES["mixtral"][1]}
    untied = plan_from_config({"model_type": "wrapper", "text_config": inner})
    tied = plan_from_config({"model_type": "wrapper", "tie_word_embeddings": True,
                             "text_config": inner})
    assert untied.total_params - tied.total_params == 101 * 32
    assert tied.active_params_no_embedding == tied.active_params


# --- errors --------------------------------------------------------------------------------------


def test_missing_file_and_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        plan_from_path(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        plan_from_path(tmp_path)


def test_invalid_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: invalid JSON"):
        plan_from_path(tmp_path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        plan_from_path(path)


@pytest.mark.parametrize("cfg, pattern", [
    ({"model_type": "gpt2", "hidden_size": 8}, r"'gpt2' is not a supported family.*mixtral"),
    ({"hidden_size": 8}, "no 'model_type' field, no known 'architectures'"),
    ({k: v for k, v in MIXTRAL_8X7B.items() if k != "hidden_size"},
     r"missing required field 'hidden_size'.*mixtral"),
    ({k: v for k, v in DEEPSEEK_V3.items() if k != "kv_lora_rank"}, "'kv_lora_rank'"),
    (MIXTRAL_8X7B | {"num_hidden_layers": "32"}, r"'num_hidden_layers' must be an integer"),
    (MIXTRAL_8X7B | {"num_experts_per_tok": 9}, "top_k=9 is larger"),
])
def test_config_errors_name_the_field(cfg, pattern, tmp_path):
    path = _write(tmp_path, cfg)
    with pytest.raises(ValueError, match=pattern) as info:
        plan_from_path(path)
    assert str(path) in str(info.value)


# --- API and CLI ----------------------------------------------------------------------------------

JSON_KEYS = {"total_params", "active_params", "active_params_no_embedding", "expert_params",
             "non_expert_params", "weight_bytes", "model_type", "num_layers", "num_moe_layers",
             "num_experts", "top_k", "embedding_params", "notes"}


def test_plan_result_to_dict_is_json():
    r = plan_from_config(QWEN3_30B_A3B)
    assert isinstance(r, PlanResult)
    d = json.loads(json.dumps(r.to_dict()))
    assert JSON_KEYS <= set(d)
    assert d["total_params"] == r.total_params
    assert "4.125 bits" in d["quantization"]["int4"]


def test_cli_json_and_table(tmp_path, capsys):
    _write(tmp_path, DEEPSEEK_V3)
    assert main(["plan", str(tmp_path / "config.json"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert JSON_KEYS <= set(out)
    assert set(out["weight_bytes"]) == {"fp32", "bf16", "fp8", "int8", "int4"}
    assert out["total_params"] == plan_from_config(DEEPSEEK_V3).total_params

    assert main(["plan", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "total parameters" in table and "671.03B" in table
    assert "with input embedding + lm_head" in table and "without input embedding" in table
    assert "int4" in table


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("smoe plan: error:") and "missing.json" in err
    assert err.count("\n") == 1
    _write(tmp_path, {"model_type": "gpt2"})
    assert main(["plan", str(tmp_path)]) == 2
    assert "not a supported family" in capsys.readouterr().err


def test_plan_works_without_transformers(tmp_path):
    path = _write(tmp_path, MIXTRAL_8X7B)
    code = ("import sys; sys.modules['transformers'] = None; from smoe.cli import main; "
            f"sys.exit(main(['plan', {str(path)!r}, '--json']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["total_params"] == 46_702_792_704


def test_console_script(tmp_path):
    script = Path(sys.executable).with_name("smoe")
    if not script.exists():
        pytest.skip("console script not installed")
    _write(tmp_path, QWEN3_30B_A3B)
    proc = subprocess.run([str(script), "plan", str(tmp_path), "--json"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["num_experts"] == 128
