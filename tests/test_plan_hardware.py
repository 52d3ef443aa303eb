"""``smoe plan`` beyond counting: the shipped catalog, the seed statements of the MoE-memory
issue, KV-cache bytes against hand counts, the roofline, the GPU catalog and the CLI flags.

Every expected number is computed here by hand from the config (or is a published figure with
its tolerance stated); none is read back from the planner.
"""

from __future__ import annotations

import json
import math
import re

import pytest

from smoe.cli import main
from smoe.plan import (GPUS, Hardware, Schemes, catalog_names, gpu, hardware_plan, load_named,
                       measure_cpu, plan_from_config, plan_from_path)
from smoe.plan.roofline import expected_experts_touched

CATALOG = {"mixtral-8x7b", "deepseek-v3", "dbrx", "grok-1", "qwen3-235b-a22b",
           "llama-4-maverick", "gpt-oss-120b", "llama-3-70b"}


def test_catalog_ships_the_named_models_with_their_source():
    assert set(catalog_names()) == CATALOG
    for name in CATALOG:
        cfg = load_named(name)
        assert cfg["_source_url"].startswith("https://"), name
        r = plan_from_path(name)
        assert r.total_params > 40e9 and name in r.source


# --- seed statements (published figures; 1-5% tolerances as the statements are rounded) -------


def test_dense_70b_in_fp16_needs_about_140_gb():
    r = plan_from_path("llama-3-70b")
    assert r.num_experts == 0 and abs(r.total_params / 70.6e9 - 1) < 0.01
    assert abs(r.weight_bytes["bf16"] / 140e9 - 1) < 0.02


def test_400b_moe_fp16_800_gb_and_int4_like_a_100b_dense_fp16():
    r = plan_from_path("llama-4-maverick")
    assert abs(r.total_params / 400e9 - 1) < 0.01
    assert abs(r.weight_bytes["bf16"] / 800e9 - 1) < 0.01
    assert abs(r.weight_bytes["int4"] / (2 * 100e9) - 1) < 0.05     # 4.125 bits + bf16 rest
    assert abs(r.active_params_no_embedding / 17e9 - 1) < 0.05       # "17B active"


def test_mixtral_activates_12_9b_of_46_7b():
    r = plan_from_path("mixtral-8x7b")
    assert round(r.total_params / 1e8) == 467 and round(r.active_params / 1e8) == 129


def test_dbrx_fits_one_8x_a100_80gb_node_with_int8_or_int4():
    r = plan_from_path("dbrx")
    assert abs(r.total_params / 132e9 - 1) < 0.01 and abs(r.active_params / 36e9 - 1) < 0.02
    node = gpu("a100-80gb")
    for scheme in ("int8", "int4"):
        d = hardware_plan(r, node, count=8, schemes=Schemes(scheme), context=32768, batch=1)
        assert d["fits"] and d["gpus_needed"] <= 8
    # and a single A100-80GB is too small even at int8 (133 GB of weights)
    assert not hardware_plan(r, node, count=1, schemes=Schemes("int8"))["fits"]


def test_grok_1_314b_total_about_a_quarter_active():
    r = plan_from_path("grok-1")
    assert abs(r.total_params / 314e9 - 1) < 0.01   # 315.7B: norms/biases of the JAX model
    assert 0.24 < r.active_params / r.total_params < 0.28


def test_deepseek_v3_and_gpt_oss_and_qwen3_catalog_figures():
    assert abs(plan_from_path("deepseek-v3").total_params / 671e9 - 1) < 0.01
    assert abs(plan_from_path("gpt-oss-120b").total_params / 117e9 - 1) < 0.01
    q = plan_from_path("qwen3-235b-a22b")
    assert abs(q.total_params / 235e9 - 1) < 0.01 and abs(q.active_params / 22e9 - 1) < 0.02


# --- KV cache against hand counts -------------------------------------------------------------

TINY = dict(model_type="mixtral", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=50, intermediate_size=16, num_local_experts=4,
            num_experts_per_tok=2)


def _kv(cfg, **kw):
    return hardware_plan(plan_from_config(cfg), gpu("h100"), **kw)


def test_kv_gqa_hand_count():
    # 2 layers x (K and V) x 2 kv heads x head_dim 8 = 64 elements per token, bf16 -> 128 B
    d = _kv(TINY, context=10, batch=3)
    assert d["kv_bytes_per_token"] == 128
    assert d["kv_bytes"] == 3 * 10 * 128
    assert _kv(TINY, context=10, batch=3, kv_dtype="fp8")["kv_bytes"] == 3 * 10 * 64


def test_kv_mla_caches_the_latent_and_the_rope_key():
    cfg = dict(model_type="deepseek_v3", hidden_size=32, num_hidden_layers=3,
               num_attention_heads=4, vocab_size=50, intermediate_size=48,
               moe_intermediate_size=16, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
               qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=4, num_experts_per_tok=2,
               first_k_dense_replace=1, n_group=1, topk_group=1)
    assert _kv(cfg)["kv_bytes_per_token"] == 3 * (16 + 4) * 2
    v3 = hardware_plan(plan_from_path("deepseek-v3"), gpu("h100"))
    assert v3["kv_bytes_per_token"] == 61 * 576 * 2           # 70,272 bytes per token


def test_kv_sliding_layers_are_capped_at_the_window():
    cfg = dict(TINY, model_type="gpt_oss", head_dim=8, sliding_window=4,
               layer_types=["sliding_attention", "full_attention"])
    per = 2 * 2 * 8 * 2  # K+V x kv heads x head_dim x bf16, one layer
    assert _kv(cfg, context=10, batch=1)["kv_bytes"] == per * 4 + per * 10
    assert _kv(cfg, context=3, batch=2)["kv_bytes"] == 2 * (per * 3 + per * 3)
    # gpt-oss-120b: 18 of 36 layers keep 128 tokens
    d = hardware_plan(plan_from_path("gpt-oss-120b"), gpu("h100"), context=8192)
    assert d["kv_bytes"] == 18 * 1024 * 2 * 128 + 18 * 1024 * 2 * 8192


def test_kv_llama4_chunked_layers():
    d = hardware_plan(plan_from_path("llama-4-maverick"), gpu("h100"), context=16384)
    per = 2 * 8 * 128 * 2
    assert d["kv_bytes"] == 36 * per * 8192 + 12 * per * 16384


def test_kv_jamba_mamba_layers_keep_a_fixed_state():
    cfg = dict(TINY, model_type="jamba", num_hidden_layers=4, num_experts=4,
               attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8, mamba_d_conv=4,
               mamba_expand=2)
    cfg.pop("num_local_experts")
    per_attn = 2 * 2 * 8 * 2
    state = 2 * 32 * (8 + 4) * 2  # d_inner x (d_state + d_conv), bf16
    for context in (5, 50):
        assert _kv(cfg, context=context)["kv_bytes"] == 2 * per_attn * context + 2 * state


# --- roofline -----------------------------------------------------------------------------------


def test_expected_experts_touched():
    assert expected_experts_touched(8, 2, 1) == pytest.approx(2)
    assert expected_experts_touched(8, 2, 1000) == pytest.approx(8)
    assert expected_experts_touched(4, 2, 2) == pytest.approx(4 * (1 - 0.25))


def test_decode_roofline_hand_count():
    r = plan_from_config(TINY)
    hw = Hardware("toy", memory=1e9, bandwidth=1e6, flops=1e18)
    d = hardware_plan(r, hw, context=10, batch=1, schemes=Schemes("fp32"), kv_dtype="fp32")
    emb = 50 * 32
    per_expert = 3 * 32 * 16
    fixed = r.total_params - r.expert_params - emb        # everything but the input table
    # weights at fp32: the non-expert ones and K=2 experts in each of 2 layers; the fp32 cache
    # of 10 tokens x 64 elements
    assert d["decode_bytes_per_step"] == pytest.approx(4 * (fixed + 2 * 2 * per_expert)
                                                       + 10 * 128 * 2)
    assert d["decode_tokens_per_s"] == pytest.approx(1e6 / d["decode_bytes_per_step"])
    assert d["decode_bound"] == "memory"
    two = hardware_plan(r, hw, count=2, context=10, schemes=Schemes("fp32"), kv_dtype="fp32")
    assert two["decode_tokens_per_s"] == pytest.approx(2 * d["decode_tokens_per_s"])


def test_prefill_flops_hand_count():
    r = plan_from_config(TINY)
    d = hardware_plan(r, Hardware("toy", 1e9, 1e9, 1e12), context=8, batch=2)
    attn = 2 * (2 * 2 * 4 * 8 * 8 * 8 / 2)     # layers x (QK + AV) x heads x hd x S x S / 2
    assert d["prefill_flops"] == 2 * (2 * r.active_params_no_embedding * 8 + attn)
    assert d["prefill_seconds"] == pytest.approx(d["prefill_flops"] / 1e12)


def test_per_part_schemes_and_offload_split():
    r = plan_from_path("mixtral-8x7b")
    mixed = hardware_plan(r, gpu("h100"), schemes=Schemes("bf16", experts="int4"))
    assert mixed["schemes"]["routed_experts"] == "int4"
    assert mixed["schemes"]["attention"] == "bf16"
    assert mixed["weights_bytes_by_part"]["routed_experts"] == \
        r.weight_bytes_by_part["routed_experts"]["int4"]
    assert mixed["weights_bytes_by_part"]["attention"] == r.breakdown["attention"] * 2
    assert mixed["fits"] and mixed["offload"]["experts_per_layer_offloaded"] == 0
    # bf16 on one 80 GB card: 93 GB does not fit; the split keeps what the budget allows
    d = hardware_plan(r, gpu("h100"), schemes=Schemes("bf16"))
    per_expert = r.weight_bytes_by_part["routed_experts"]["bf16"] / (32 * 8)
    budget = 72e9 - (d["memory_needed_bytes"] - r.weight_bytes_by_part["routed_experts"]["bf16"])
    assert d["offload"]["experts_per_layer_on_gpu"] == math.floor(budget / (32 * per_expert))
    assert not d["fits"] and d["gpus_needed"] == 2
    off = d["offload"]
    assert off["winner"] in ("cpu_compute", "transfer")
    # at batch 1 the host reads the touched experts at 100 GB/s vs 25 GB/s over PCIe
    assert off["winner"] == "cpu_compute"
    assert off["cpu_compute_seconds_per_step"] < off["transfer_seconds_per_step"]


def test_gpu_catalog_and_unknown_names():
    assert {"a100-40gb", "a100-80gb", "h100-80gb", "h200", "b200", "l40s", "rtx-4090",
            "mi300x"} <= set(GPUS)
    assert gpu("H100").memory == 80e9 and gpu("h200").bandwidth == 4800e9
    with pytest.raises(ValueError, match=r"unknown accelerator 'tpu'.*a100-40gb.*cpu"):
        gpu("tpu")


def test_measure_cpu_gives_positive_figures():
    hw = measure_cpu(32 << 20, repeats=2)
    assert hw.name == "cpu" and hw.bandwidth > 1e8 and hw.flops > 1e8 and hw.memory > 1e9


def test_measured_cpu_decode_model_has_positive_figures():
    from smoe.plan.cpu import measure_kernel_rates, measure_layer_overhead

    rates = measure_kernel_rates(16 << 20, repeats=1)
    assert set(rates) == {"fp32", "bf16", "int8", "int4"} and min(rates.values()) > 1e7
    assert 1e-7 < measure_layer_overhead(steps=2, repeats=1) < 1.0


def _smoe_run_plan(tmp_path):
    """A native smoe run's config (2 layers of hidden 256, 8 experts of 512, top-2) planned."""
    from smoe.config import ModelConfig, MoEConfig

    cfg = ModelConfig(vocab_size=300, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_seq_len=64, moe=MoEConfig(hidden_size=256, expert_size=512,
                                                    num_experts=8, top_k=2))
    (tmp_path / "config.json").write_text(json.dumps({"format": "smoe-run",
                                                      "model": cfg.to_dict()}))
    return plan_from_path(tmp_path)


def test_decode_expected_adds_kernel_rates_and_layer_overhead_by_hand(tmp_path):
    plan = _smoe_run_plan(tmp_path)
    rates = {"fp32": 8e9, "int4": 4e9}
    hw = Hardware("cpu", 16e9, 10e9, 1e12, kernel_rates=rates, layer_overhead=250e-6)
    d = hardware_plan(plan, hw, schemes=Schemes("fp32", "int4"), context=16, kv_dtype="fp32",
                      compare_offload=False)
    # By hand: per layer attention q,o 256x256 + k,v 128x256 (head 64, 2 KV heads) in fp32; the
    # router 8x256 and two norms of 256 per layer, the final norm, an untied lm_head 300x256,
    # all fp32 (kept parts follow --weights fp32) at the fp32 rate; top-2 experts of
    # (2*512 + 512) x 256 int4 weights (4.125 bits) per layer at the int4 rate; KV cache
    # 2 layers x 16 tokens x (2 x 128) fp32 at the bandwidth; 2 layers x 250 us.
    attn = 2 * (2 * 256 * 256 + 2 * 128 * 256) * 4
    kept = (2 * (8 * 256 + 2 * 256) + 256 + 300 * 256) * 4
    experts = 2 * 2 * (3 * 512 * 256) * 4.125 / 8
    kv = 2 * 16 * 2 * 128 * 4
    step = (attn + kept) / 8e9 + experts / 4e9 + kv / 10e9 + 2 * 250e-6
    e = d["decode_expected"]
    assert e["step_seconds"] == pytest.approx(step, rel=0.01)
    assert e["tokens_per_s"] == pytest.approx(1 / step, rel=0.01)
    assert d["decode_tokens_per_s"] > e["tokens_per_s"]            # the roofline stays a bound
    plain = hardware_plan(plan, Hardware("x", 16e9, 10e9, 1e12), context=16)
    assert "decode_expected" not in plain                          # datasheet GPUs: roofline only


def test_cli_layer_overhead_flag_reaches_the_json(tmp_path, capsys):
    _smoe_run_plan(tmp_path)
    assert main(["plan", str(tmp_path), "--json", "--gpu", "h100", "--layer-overhead-us",
                 "100"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["decode_expected"]["overhead_seconds"] == pytest.approx(2 * 100e-6)


# --- CLI ----------------------------------------------------------------------------------------

NEW_KEYS = {"kv_bytes_per_token", "kv_bytes", "fits", "gpus_needed", "decode_tokens_per_s",
            "prefill_seconds"}
OLD_KEYS = {"total_params", "active_params", "active_params_no_embedding", "expert_params",
            "non_expert_params", "weight_bytes", "model_type", "num_layers", "num_moe_layers",
            "num_experts", "top_k", "embedding_params", "notes"}


def test_cli_json_keeps_old_keys_and_adds_the_new(capsys):
    assert main(["plan", "dbrx", "--json", "--gpu", "a100-80gb", "--count", "8", "--weights",
                 "int8", "--context", "2048", "--batch", "4"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert OLD_KEYS | NEW_KEYS <= set(d)
    assert d["fits"] is True and d["gpus_needed"] == 2 and d["batch"] == 4
    assert d["kv_bytes"] == 4 * 2048 * d["kv_bytes_per_token"]
    assert main(["plan", "dbrx", "--json", "--gpu", "a100-80gb", "--weights", "int4",
                 "--reserve", "0"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["usable_bytes_per_gpu"] == 80e9 and d["hardware"]["reserve"] == 0


def test_cli_table_and_cpu_with_given_bandwidth(capsys):
    assert main(["plan", "mixtral-8x7b", "--gpu", "cpu", "--gpu-bandwidth", "20",
                 "--gpu-flops", "1", "--weights", "int4", "--experts", "int4",
                 "--attention", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "decode roofline" in out and "cpu" in out and "KV cache" in out


@pytest.mark.parametrize("args, pattern", [
    (["--gpu", "tpu-v5"], "unknown accelerator 'tpu-v5'.*h100-80gb"),
    (["--weights", "int3"], "--weights: unknown scheme 'int3'"),
    (["--experts", "nf4"], "--experts: unknown scheme 'nf4'"),
    (["--count", "0"], "--count must be a positive integer"),
    (["--batch", "-1"], "--batch must be a positive integer"),
    (["--context", "0"], "--context must be a positive integer"),
    (["--kv-dtype", "fp6"], "--kv-dtype: unknown 'fp6'"),
    (["--reserve", "1"], r"--reserve must be in \[0, 1\)"),
    (["--gpu-memory", "0"], "--gpu-memory must be > 0"),
    (["--gpu", "cpu", "--gpu-bandwidth", "-5"], "--gpu-bandwidth must be > 0"),
    (["--ep", "3"], "--ep 3: ep=3 does not divide"),
    (["--ep", "0"], "--ep must be a positive integer"),
    (["--layer-overhead-us", "-1"], "--layer-overhead-us must be >= 0"),
])
def test_cli_bad_input_is_one_line(args, pattern, capsys):
    assert main(["plan", "mixtral-8x7b", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""                     # nothing printed before the error
    assert captured.err.count("\n") == 1
    assert re.search(pattern, captured.err), captured.err


def test_cli_unknown_name_lists_the_catalog(capsys):
    assert main(["plan", "mixtral-9x9b"]) == 2
    err = capsys.readouterr().err
    assert "not a catalog name" in err and "deepseek-v3" in err
