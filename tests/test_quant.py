"""Quantized experts and linears (smoe.inference.quantize): every quantized path is held to its
reference twin (dequantize, then the fp32 module) for every router, T = 0, 1 and a long batch,
native and patched transformers models; the quantization math's error bounds; save / load of a
quantized run through the real commands; bad input.

Tolerance. The kernels take bfloat16 activations (8 significant bits: a relative rounding of at
most 2^-9 per element) and return bfloat16; the twin runs in float32 on the same dequantized
weights. Two or three such roundings per projection and a float32 accumulation give errors of
about 1% of the output's magnitude, so outputs are compared as
max |y - y_ref| <= 0.03 * max |y_ref| (+ a tiny absolute floor for all-zero outputs).
"""

from __future__ import annotations

import copy
import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # noqa: E402 - before transformers is imported

import pytest
import torch

from smoe.cli import main as cli_main
from smoe.config import ROUTERS, ModelConfig, MoEConfig
from smoe.inference.quantize import FORMAT_VERSION, QuantConfig, quantize, weight_bytes
from smoe.inference.quantized_linears import Int4Linear, Int8Linear, QuantizedLinear
from smoe.inference.quantized_modules import (
    Int4Experts,
    Int8Experts,
    _pack_cpu_int4,
    _unpack_cpu_int4,
    dequantize_int4,
    dequantize_int8,
    pack_nibbles,
    quantize_int4,
    quantize_int8,
    unpack_nibbles,
)
from smoe.model import SMoETransformer
from smoe.nn.moe import MoELayer

SCHEMES = [("int8", 128), ("int4", 32), ("int4", 64), ("bf16", 128)]
ROUTER_TOP_K = {"switch": 1, "sparsemixer": 2}


def close(y: torch.Tensor, ref: torch.Tensor, rel: float = 0.03) -> None:
    err = (y.float() - ref.float()).abs().max().item() if y.numel() else 0.0
    bound = rel * (ref.abs().max().item() if ref.numel() else 0.0) + 1e-6
    assert err <= bound, f"max error {err:.3g} > {bound:.3g}"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the math ---------------------------------------------------------------------------------
def test_int8_error_is_at_most_half_a_step():
    w = torch.randn(48, 64) * torch.logspace(-2, 1, 48)[:, None]   # rows of very different scale
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16 and q.abs().max() <= 127
    err = (dequantize_int8(q, s) - w).abs()
    assert (err <= 0.5 * s.float()[:, None] * 1.01 + 1e-7).all()
    assert err.max() > 0  # quantization did happen


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_error_is_about_half_a_step_per_group(group):
    w = torch.randn(32, 256) + torch.linspace(-3, 3, 256)          # groups with an offset
    q, sz = quantize_int4(w, group)
    assert q.min() >= 0 and q.max() <= 15 and sz.shape == (256 // group, 32, 2)
    step = sz[..., 0].float().t().repeat_interleave(group, dim=1)   # [N, K]
    err = (dequantize_int4(q, sz) - w).abs()
    # bfloat16 rounding of scale and zero may stretch a group's end by ~1% of its range.
    assert (err <= 0.5 * step + 0.02 * 15 * step).all()
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q)


def test_cpu_int4_packing_round_trips_exactly():
    q = torch.randint(0, 16, (64, 256), dtype=torch.uint8)
    assert torch.equal(_unpack_cpu_int4(_pack_cpu_int4(q), 256, 64), q)


# -- layers: every router, T = 0, 1, long -------------------------------------------------------
def _layer(router: str, *, bias: bool = False, gated: bool = True, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    cfg = MoEConfig(hidden_size=64, expert_size=128, num_experts=6,
                    top_k=ROUTER_TOP_K.get(router, 2), router=router, init_std=0.2,
                    expert_bias=bias, activation="swiglu" if gated else "gelu")
    layer = MoELayer(cfg)
    if bias:
        with torch.no_grad():
            layer.experts.in_proj_bias.normal_(std=0.3)
            layer.experts.down_proj_bias.normal_(std=0.3)
    return layer.eval()


@pytest.mark.parametrize("scheme,group", SCHEMES)
@pytest.mark.parametrize("router", ROUTERS)
def test_quantized_layer_equals_its_reference_twin(router, scheme, group):
    layer = _layer(router)
    kw = {"group_size": group} if scheme == "int4" else {}
    from smoe.inference.quantized_modules import EXPERT_SCHEMES

    layer.experts = EXPERT_SCHEMES[scheme].from_experts(layer.experts, **kw)
    twin = copy.deepcopy(layer)
    twin.experts = layer.experts.reference()
    for T in (0, 1, 2, 67):
        x = torch.randn(T, 64)
        with torch.no_grad():
            y, info = layer(x)
            y_ref, info_ref = twin(x)
        assert torch.equal(info.tokens_per_expert, info_ref.tokens_per_expert)
        close(y, y_ref)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_biases_and_plain_activation(scheme):
    for gated, bias in ((True, True), (False, False)):
        layer = _layer("softmax_topk", bias=bias, gated=gated, seed=1)
        kw = {"group_size": 64} if scheme == "int4" else {}
        cls = Int8Experts if scheme == "int8" else Int4Experts
        layer.experts = cls.from_experts(layer.experts, **kw)
        twin = copy.deepcopy(layer)
        twin.experts = layer.experts.reference()
        x = torch.randn(40, 64)
        with torch.no_grad():
            close(layer(x)[0], twin(x)[0])
            close(layer(x[:1])[0], twin(x[:1])[0])


def test_dequantized_weights_are_near_the_originals():
    layer = _layer("softmax_topk")
    w = layer.experts.gate_up_proj.detach().clone()
    for cls, kw, rel in ((Int8Experts, {}, 0.01), (Int4Experts, {"group_size": 32}, 0.15)):
        q = cls.from_experts(layer.experts, **kw)
        err = (q.dequantized("in") - w).abs().max() / w.abs().max()
        assert 0 < err < rel


def test_state_dict_is_portable_after_the_kernel_layout():
    layer = _layer("softmax_topk")
    q = Int4Experts.from_experts(layer.experts, group_size=64)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    with torch.no_grad():
        q(torch.randn(5, 64), torch.tensor([5, 0, 0, 0, 0, 0]))   # converts to the CPU layout
    after = q.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- whole models -----------------------------------------------------------------------------
def _model(seed: int = 0, **moe) -> SMoETransformer:
    torch.manual_seed(seed)
    m = MoEConfig(hidden_size=64, expert_size=128, num_experts=4, top_k=2, init_std=0.1,
                  num_shared_experts=1, **moe)
    cfg = ModelConfig(vocab_size=257, hidden_size=64, num_layers=3, num_heads=4,
                      num_kv_heads=2, max_seq_len=64, moe=m, ffn_size=128,
                      first_dense_layers=1)   # a dense FFN layer, then two MoE layers
    return SMoETransformer(cfg).eval()


def _check_layerwise(model, layers, run) -> int:
    """Run ``run()`` on the quantized model while recording the input and output of every MoE
    layer and quantized linear; then hold each against its twin (the layer with dequantized fp32
    experts, ``QuantizedLinear.reference()``) on the same input. Layer by layer, because a bf16
    difference upstream may flip a later router's top-k choice: that is quantization, not a
    bug, and would make an end-to-end comparison meaningless. Returns the calls checked."""
    calls = []
    modules = list(layers) + [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    hooks = [m.register_forward_hook(lambda mod, args, out: calls.append((mod, args[0], out)))
             for m in modules]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    twins = {}
    for mod, x, out in calls:
        if id(mod) not in twins:
            if isinstance(mod, QuantizedLinear):
                twins[id(mod)] = mod.reference()
            else:
                twin = copy.copy(mod)   # shares router and shared experts; own experts slot
                twin._modules = dict(mod._modules)
                twin.experts = mod.experts.reference()
                twins[id(mod)] = twin
        with torch.no_grad():
            y = out[0] if isinstance(out, tuple) else out
            y_ref = twins[id(mod)](x)
            y_ref = y_ref[0] if isinstance(y_ref, tuple) else y_ref
        close(y, y_ref)
    return len(calls)


@pytest.mark.parametrize("experts,attention,dense", [("int8", "int8", "int8"),
                                                     ("int4", None, None), ("int4", "int8", None),
                                                     ("bf16", None, "int8"),
                                                     ("int4", "int4", "int4")])
def test_quantized_model_equals_its_twin(experts, attention, dense):
    model = _model()
    float_bytes = weight_bytes(model)["experts"]
    quantize(model, experts=experts, attention=attention, dense=dense, group_size=64)
    ratio = {"int8": 4, "int4": 6, "bf16": 2}[experts]
    assert weight_bytes(model)["experts"] * ratio <= float_bytes * 1.05
    if attention:
        linear = {"int8": Int8Linear, "int4": Int4Linear}[attention]
        assert isinstance(model.layers[0].attn.q_proj, linear)
    if dense:
        assert all(type(m) is not torch.nn.Linear for m in model.layers[0].ffn.modules())
    idx = torch.randint(0, 257, (2, 24))
    layers = [layer for _, layer in model.moe_layers()]
    assert _check_layerwise(model, layers, lambda: (model(idx), model(idx[:1, :1]))) >= 4


def test_training_a_quantized_model_is_refused():
    model = _model()
    quantize(model, experts="int4", group_size=64)
    model.train()
    with pytest.raises(RuntimeError, match="inference only"):
        model(torch.randint(0, 257, (1, 4)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(experts="int3"), "experts='int3' is invalid"),
    (dict(experts="int4", group_size=48), "group_size=48 is invalid"),
    (dict(experts="int8", attention="int2"), "attention='int2' is invalid"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize(_model(), **kwargs)


def test_group_size_that_does_not_divide_changes_nothing():
    torch.manual_seed(0)
    m = MoEConfig(hidden_size=64, expert_size=96, num_experts=4, top_k=2)
    model = SMoETransformer(ModelConfig(vocab_size=257, hidden_size=64, num_layers=1,
                                        num_heads=4, num_kv_heads=2, max_seq_len=32, moe=m))
    before = type(model.layers[0].ffn.experts)
    with pytest.raises(ValueError, match="does not divide the experts' expert_size"):
        quantize(model, experts="int4", group_size=64, attention="int8")
    assert type(model.layers[0].ffn.experts) is before
    assert type(model.layers[0].attn.q_proj) is torch.nn.Linear


def test_int4_attention_group_size_that_does_not_divide_changes_nothing():
    torch.manual_seed(0)
    m = MoEConfig(hidden_size=96, expert_size=128, num_experts=4, top_k=2)
    model = SMoETransformer(ModelConfig(vocab_size=257, hidden_size=96, num_layers=1,
                                        num_heads=4, num_kv_heads=2, max_seq_len=32, moe=m))
    with pytest.raises(ValueError, match="does not divide the input width 96 of attention"):
        quantize(model, experts="int8", group_size=64, attention="int4")
    assert type(model.layers[0].attn.q_proj) is torch.nn.Linear
    assert type(model.layers[0].ffn.experts) is not Int8Experts


def test_int4_linear_state_dict_round_trips_after_the_kernel_layout():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48, bias=True)
    q = Int4Linear.from_linear(lin, group_size=32)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    x = torch.randn(3, 5, 128)
    with torch.no_grad():
        y = q(x)                                  # converts to the CPU kernel's layout
        close(y, q.reference()(x))
        assert (q.dequantized() - lin.weight).abs().max() < 0.15 * lin.weight.abs().max()
    after = q.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    fresh = Int4Linear(128, 48, bias=True, group_size=32)
    fresh.load_state_dict(after)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), y)


def test_newer_format_is_refused():
    with pytest.raises(ValueError, match="newer smoe"):
        QuantConfig.from_dict({"format_version": FORMAT_VERSION + 1, "experts": "int4"})


# -- patched transformers models --------------------------------------------------------------
HF_BASE = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
               bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
HF_CASES = {
    "mixtral": dict(intermediate_size=64, num_local_experts=6, num_experts_per_tok=2),
    "qwen3_moe": dict(intermediate_size=96, moe_intermediate_size=64, num_experts=6,
                      num_experts_per_tok=2, norm_topk_prob=True, head_dim=16),
    "deepseek_v3": dict(intermediate_size=96, moe_intermediate_size=64, n_routed_experts=8,
                        num_experts_per_tok=3, n_shared_experts=1, n_group=4, topk_group=2,
                        first_k_dense_replace=1, routed_scaling_factor=2.5, num_key_value_heads=4,
                        kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
                        v_head_dim=8),
    "gpt_oss": dict(intermediate_size=64, num_local_experts=6, num_experts_per_tok=2,
                    head_dim=16, layer_types=["sliding_attention", "full_attention"],
                    sliding_window=8),
}


def _hf_model(family: str):
    transformers = pytest.importorskip("transformers")
    import smoe.hf

    transformers.utils.logging.set_verbosity_error()
    config = transformers.AutoConfig.for_model(family, **{**HF_BASE, **HF_CASES[family]})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not ("norm" in name and p.dim() == 1):
                p.normal_(std=0.1)
    smoe.hf.patch(model.eval())
    return model


@pytest.mark.parametrize("family", list(HF_CASES))
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_patched_transformers_model_equals_its_twin(family, scheme):
    import smoe.hf

    model = _hf_model(family)
    quantize(model, experts=scheme, attention="int8" if scheme == "int8" else None,
             group_size=32)
    layers = smoe.hf.patched_layers(model)
    for name, layer in layers.items():
        assert isinstance(layer.experts, Int8Experts if scheme == "int8" else Int4Experts), name
    if scheme == "int8":
        assert any(isinstance(m, Int8Linear) for m in model.modules())
    ids = torch.randint(3, 96, (2, 12))
    n = _check_layerwise(model, layers.values(), lambda: (model(ids), model(ids[:, :1])))
    assert n >= 2 * len(layers)


# -- quantized runs through the commands ------------------------------------------------------
@pytest.fixture(scope="module")
def float_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("qrun")
    rng = random.Random(0)
    words = "the house letter garden sister morning walk said quiet long evening".split()
    text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(400))
    (root / "data").mkdir()
    (root / "data" / "prose.txt").write_text(text, encoding="utf-8")
    old_cache = os.environ.get("SMOE_CACHE_DIR")
    os.environ["SMOE_CACHE_DIR"] = str(root / "cache")   # private, for this module
    try:
        run = root / "run"
        rc = cli_main(["train", "--out", str(run), "--data", str(root / "data"), "--preset",
                       "tiny-moe", "--steps", "1", "--batch-size", "2", "--seq-len", "32",
                       "--eval-every", "0", "--eval-batches", "1", "--no-progress"])
        assert rc == 0
        yield run
    finally:
        if old_cache is None:
            os.environ.pop("SMOE_CACHE_DIR", None)
        else:
            os.environ["SMOE_CACHE_DIR"] = old_cache


def test_quantize_command_writes_a_run_that_generate_and_eval_read(float_run, tmp_path, capsys):
    from safetensors import safe_open

    out = tmp_path / "q4"
    assert cli_main(["quantize", str(float_run), "--experts", "int4", "--group-size", "128",
                     "--attention", "int8", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["format_version"] == FORMAT_VERSION
    assert cfg["quantization"]["experts"] == "int4"
    with safe_open(str(out / "checkpoint" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("layers.0.ffn.experts.gate_up_proj_qweight").dtype == torch.uint8
        assert f.get_tensor("layers.0.attn.q_proj.qweight").dtype == torch.int8
    assert not any(k.endswith("experts.gate_up_proj") for k in keys)  # no float experts
    # Loading builds on meta and swaps the modules: the packed tensors, never float experts.
    from smoe.inference.quantize import load_quantized
    from smoe.runs import load_run

    run_q = load_quantized(out)
    assert isinstance(run_q.model.layers[0].ffn.experts, Int4Experts)
    run_f = load_run(float_run)
    twin_ref = copy.deepcopy(run_f.model)
    quantize(twin_ref, experts="int4", attention="int8")
    idx = torch.randint(0, 257, (1, 16))
    with torch.no_grad():  # the saved-and-loaded model computes what the in-memory one does
        assert torch.equal(run_q.model(idx).logits, twin_ref(idx).logits)
    capsys.readouterr()
    assert cli_main(["generate", str(out), "--prompt", "the house", "--max-new-tokens", "8",
                     "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("the house")
    assert cli_main(["eval", str(out), "--eval-batches", "1"]) == 0
    assert "loss" in capsys.readouterr().out


def test_failed_quantize_leaves_nothing(float_run, tmp_path, capsys):
    out = tmp_path / "bad"
    assert cli_main(["quantize", str(float_run), "--experts", "int4", "--group-size", "48",
                     "--out", str(out)]) == 2
    assert "group_size=48 is invalid" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".bad.tmp-*"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    assert cli_main(["quantize", str(float_run), "--experts", "int8", "--out",
                     str(tmp_path / "full")]) == 2
    assert (tmp_path / "full" / "x").read_text() == "keep"


def test_newer_quantized_run_is_refused_in_one_line(float_run, tmp_path, capsys):
    out = tmp_path / "q8"
    assert cli_main(["quantize", str(float_run), "--experts", "int8", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization"]["format_version"] = FORMAT_VERSION + 1
    (out / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert cli_main(["eval", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "newer smoe" in err and "\n" not in err
