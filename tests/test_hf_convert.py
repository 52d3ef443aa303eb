"""The Hugging Face format in and out (smoe.hf.convert, smoe.hf.keymaps, `smoe export/import`):
each family mapping gives transformers' logits and greedy tokens, import gives back the same
weights, an HF model survives import + export tensor for tensor, and what no family expresses
is refused by name."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from smoe.cli import main  # noqa: E402
from smoe.config import ModelConfig, MoEConfig  # noqa: E402
from smoe.data.tokenizer import ByteTokenizer  # noqa: E402
from smoe.hf.convert import (export_hf, hf_format_for, import_hf,  # noqa: E402
                             model_config_from_hf)
from smoe.hf.keymaps import KEYMAPS, TRANSFORMS, _layer_at_least  # noqa: E402
from smoe.hf.tokenizer import byte_tokenizer_json, is_byte_tokenizer  # noqa: E402
from smoe.inference import generate  # noqa: E402
from smoe.model import SMoETransformer  # noqa: E402
from smoe.train.checkpoint import save_checkpoint  # noqa: E402

V = 64
#: transformers builds zero-width shared experts (qwen2_moe, glm4_moe without one) with a warning
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")


def config(**changes) -> ModelConfig:
    base = dict(vocab_size=V, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                max_seq_len=32, ffn_size=48, rope_theta=5e4, norm_eps=1e-5, init_std=0.05)
    base.update(changes)
    return ModelConfig(**base)


def moe(**changes) -> MoEConfig:
    base = dict(hidden_size=32, expert_size=24, num_experts=4, top_k=2)
    base.update(changes)
    return MoEConfig(**base)


#: name -> (smoe config, the family it must export as)
CASES = {
    "mixtral": (config(moe=moe()), "mixtral"),
    "qwen3_moe": (config(qk_norm=True, first_dense_layers=1, moe=moe(norm_topk_prob=False)),
                  "qwen3_moe"),
    "qwen2_moe": (config(moe=moe(num_shared_experts=1, shared_expert_size=40,
                                 shared_expert_gate=True)), "qwen2_moe"),
    "llama": (config(moe=None, head_dim=16), "llama"),
    # beyond the four required mappings
    "qwen2_moe_ungated": (config(moe=moe(num_shared_experts=2)), "qwen2_moe"),
    "qwen2_moe_no_shared": (config(moe=moe(top_k=1, router="switch"), moe_every=2), "qwen2_moe"),
    "qwen3_tied": (config(moe=None, qk_norm=True, tie_embeddings=True), "qwen3"),
    "glm4_moe": (config(first_dense_layers=1, moe=moe(
        router="sigmoid_bias", num_experts=8, n_groups=4, topk_groups=2,
        routed_scaling_factor=2.5, num_shared_experts=1)), "glm4_moe"),
    "glm4_moe_qk_norm": (config(qk_norm=True, moe=moe(router="sigmoid_bias",
                                                      norm_topk_prob=False)), "glm4_moe"),
    "mixtral_topk_softmax": (config(moe=moe(router="topk_softmax"), tie_embeddings=True),
                             "mixtral"),
    # gpt-oss: clamped SwiGLU (a limit low enough to clamp), expert and router biases
    "gpt_oss": (config(moe=moe(router="topk_softmax", activation="swiglu_oai", expert_bias=True,
                               router_bias=True, activation_limit=0.5, activation_alpha=1.5)),
                "gpt_oss"),
    "gpt_oss_no_biases": (config(moe=moe(activation="swiglu_oai"), tie_embeddings=True),
                          "gpt_oss"),
}


def build(cfg: ModelConfig, seed: int = 0) -> SMoETransformer:
    """Random weights, with the norms and selection biases moved off their init."""
    torch.manual_seed(seed)
    model = SMoETransformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
        for _, layer in model.moe_layers():
            if layer.router.expert_bias is not None:
                layer.router.expert_bias.normal_(std=0.05)
            for b in (layer.router.bias, layer.experts.in_proj_bias,
                      layer.experts.down_proj_bias):
                if b is not None:
                    b.normal_(std=0.1)
    return model


def write_run(path, model: SMoETransformer, tokenizer=None, step: int = 7):
    """A run folder as smoe's trainer writes it (config.json + checkpoint/)."""
    path.mkdir()
    cfg = model.config.to_dict()
    (path / "config.json").write_text(json.dumps({"format": "smoe-run", "version": 1,
                                                  "model": cfg}))
    save_checkpoint(path, model.state_dict(), {}, {"step": step, "model_config": cfg})
    if tokenizer is not None:
        tokenizer.save(path)
    return path


def load_hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path),
                                                             dtype=torch.float32).eval()


def tokens(batch: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def load_run_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoint" / "model.safetensors"))


def one_line_error(capsys, argv) -> str:
    """Run the CLI, expecting exit 2 and one error line (transformers may warn before it)."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"smoe {argv[0]}: error:")]
    assert len(lines) == 1 and err.endswith(lines[0] + "\n") and "Traceback" not in err
    return lines[0]


def nothing_written(tmp_path, out="run") -> bool:
    return not (tmp_path / out).exists() and not any(
        p.name.startswith(".") for p in tmp_path.iterdir())


# -- export -> transformers -> import ---------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_export_matches_transformers_and_imports_back(tmp_path, name):
    cfg, family = CASES[name]
    model = build(cfg)
    run = write_run(tmp_path / "run", model)
    result = export_hf(run, tmp_path / "hf")
    assert (result.family, result.step) == (family, 7)
    on_disk = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert on_disk["model_type"] == family and on_disk["smoe_config"]["model"] == cfg.to_dict()
    hf = load_hf(tmp_path / "hf")
    assert type(hf).__name__ == result.architecture
    idx = tokens()
    with torch.no_grad():
        ours, theirs = model(idx).logits, hf(idx).logits
    assert max_diff(ours, theirs) <= 1e-5
    prompt = idx[:1, :5]
    with torch.no_grad():
        hf_ids = hf.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    assert torch.equal(hf_ids[0], generate(model, prompt[0], 8))

    back = import_hf(tmp_path / "hf", tmp_path / "back")
    assert back.used_smoe_config and back.config == cfg and back.family == family
    weights = load_run_weights(tmp_path / "back")
    original = model.state_dict()
    assert set(weights) == set(original)
    assert all(torch.equal(weights[k], v) for k, v in original.items())


def test_import_without_smoe_config_is_exact(tmp_path):
    """An HF folder without smoe's own config (edited, or never from smoe) is read from the HF
    config alone: an ungated shared expert comes back gated (zero gate, doubled weights), with
    the same logits."""
    cfg, _ = CASES["qwen2_moe_ungated"]
    model = build(cfg)
    export_hf(model, tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    hf_cfg = json.loads(path.read_text())
    del hf_cfg["smoe_config"]
    path.write_text(json.dumps(hf_cfg))
    back = import_hf(tmp_path / "hf", tmp_path / "back")
    assert not back.used_smoe_config
    m = back.config.moe
    assert m.shared_expert_gate and m.num_shared_experts == 1 and m.shared_size == 48
    assert m.z_loss_coef == 0.0
    assert m.aux_loss_coef == pytest.approx(cfg.moe.aux_loss_coef)  # x L/K, then x K/L
    with torch.device("meta"):
        again = SMoETransformer(back.config)
    again.load_state_dict(load_run_weights(tmp_path / "back"), assign=True)
    idx = tokens()
    with torch.no_grad():
        assert max_diff(again.eval()(idx).logits, model(idx).logits) <= 1e-5


# -- transformers -> import -> export -------------------------------------------------------
def hf_model(family: str):
    """A tiny transformers model of ``family`` with random weights (as smoe can import it)."""
    common = dict(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                  tie_word_embeddings=False)
    kinds = {
        "mixtral": lambda: transformers.MixtralConfig(
            intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, **common),
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
            intermediate_size=48, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
            norm_topk_prob=True, mlp_only_layers=[0], decoder_sparse_step=1, **common),
        "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
            intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40,
            num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2, **common),
        "glm4_moe": lambda: transformers.Glm4MoeConfig(
            intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=1.5,
            first_k_dense_replace=1, use_qk_norm=True, partial_rotary_factor=1.0,
            num_nextn_predict_layers=0, **common),
        "llama": lambda: transformers.LlamaConfig(intermediate_size=48, **common),
        # what smoe can run: every layer full attention (no sinks are set below)
        "gpt_oss": lambda: transformers.GptOssConfig(
            intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
            layer_types=["full_attention"] * 3, swiglu_limit=1.0, **common),
    }
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(kinds[family]()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.2)
            if name.endswith("_proj.bias"):  # smoe's attention has no biases
                p.zero_()
            if name.endswith(("_proj_bias", "router.bias")):
                p.normal_(std=0.1)
            if name.endswith("self_attn.sinks"):  # -inf: no sink, smoe's attention
                p.fill_(float("-inf"))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(std=0.05)
    return model


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe", "glm4_moe", "llama",
                                    "gpt_oss"])
def test_hf_model_survives_import_and_export(tmp_path, family):
    hf = hf_model(family)
    shard = "20KB" if family == "mixtral" else None  # shards + index on the way in
    hf.save_pretrained(str(tmp_path / "hf"), **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    back = import_hf(tmp_path / "hf", tmp_path / "run")
    assert back.family == family and not back.used_smoe_config
    with torch.device("meta"):
        model = SMoETransformer(back.config)
    model.load_state_dict(load_run_weights(tmp_path / "run"), assign=True)
    idx = tokens()
    with torch.no_grad():
        assert max_diff(model.eval()(idx).logits, hf(idx).logits) <= 1e-5

    export_hf(tmp_path / "run", tmp_path / "again")
    original = {}
    for f in (tmp_path / "hf").glob("*.safetensors"):
        original.update(load_file(str(f)))
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert set(again) == set(original)
    assert all(torch.equal(again[k], v) for k, v in original.items())
    redone = json.loads((tmp_path / "again" / "config.json").read_text())
    assert redone["model_type"] == family


def test_import_keeps_the_checkpoint_dtype_unless_told(tmp_path, capsys):
    """bf16 on disk stays bf16 (float32 buffers such as the selection bias stay float32);
    --dtype float32 casts; the run records its dtype and runs as it is stored."""
    hf = hf_model("glm4_moe").to(torch.bfloat16)
    hf.save_pretrained(str(tmp_path / "hf"))
    kept = import_hf(tmp_path / "hf", tmp_path / "kept")
    f32 = import_hf(tmp_path / "hf", tmp_path / "f32", dtype="float32")
    assert (kept.dtype, f32.dtype) == (torch.bfloat16, torch.float32)
    w_kept, w_f32 = load_run_weights(tmp_path / "kept"), load_run_weights(tmp_path / "f32")
    key, bias = "layers.1.ffn.experts.gate_up_proj", "layers.1.ffn.router.expert_bias"
    assert w_kept[key].dtype == torch.bfloat16 and w_f32[key].dtype == torch.float32
    assert w_kept[bias].dtype == torch.float32
    assert all(torch.equal(w_f32[k], v.float()) for k, v in w_kept.items())
    for run, name in (("kept", "bfloat16"), ("f32", "float32")):
        assert json.loads((tmp_path / run / "config.json").read_text())["dtype"] == name
    with torch.device("meta"):
        model = SMoETransformer(kept.config)
    model.load_state_dict(w_kept, assign=True)
    assert model.embed.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(tokens()).logits.float()).all()
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "cli")]) == 0
    assert "bfloat16" in capsys.readouterr().out
    assert load_run_weights(tmp_path / "cli")[key].dtype == torch.bfloat16
    # without a dtype in config.json: the dtype holding most bytes (read from the headers)
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items()
                                if k not in ("dtype", "torch_dtype")}))
    assert import_hf(tmp_path / "hf", tmp_path / "guessed").dtype == torch.bfloat16


def test_fused_expert_layout_is_read_too(tmp_path):
    """Some writers store the fused in-memory layout (gate_up_proj [E, 2F, D])."""
    model = build(CASES["mixtral"][0])
    export_hf(model, tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    state = load_file(str(path))
    fused = {}
    for key, value in state.items():
        if ".experts." not in key:
            fused[key] = value
    for i in range(3):
        pre = f"model.layers.{i}.block_sparse_moe.experts"
        fused[f"{pre}.gate_up_proj"] = model.layers[i].ffn.experts.gate_up_proj.detach().clone()
        fused[f"{pre}.down_proj"] = model.layers[i].ffn.experts.down_proj.detach().clone()
    save_file(fused, str(path), metadata={"format": "pt"})
    import_hf(tmp_path / "hf", tmp_path / "run")
    weights = load_run_weights(tmp_path / "run")
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


# -- tokenizer, dtype, shards -----------------------------------------------------------------
def test_byte_tokenizer_travels_and_generates_the_same_text(tmp_path):
    cfg = config(vocab_size=257, moe=moe())
    model = build(cfg)
    run = write_run(tmp_path / "run", model, ByteTokenizer())
    result = export_hf(run, tmp_path / "hf")
    assert result.tokenizer.startswith("byte-level")
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "héllo wörld 🤖\n\t x"
    assert tok(text, add_special_tokens=False)["input_ids"] == ByteTokenizer().encode(text)
    assert tok.eos_token_id == 256 and tok.decode(ByteTokenizer().encode(text)) == text
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["eos_token_id"] == 256

    back = import_hf(tmp_path / "hf", tmp_path / "back")
    assert back.tokenizer == "byte"
    assert json.loads((tmp_path / "back" / "tokenizer.json").read_text())["type"] == "smoe-byte"
    from smoe.train.run import generate_text, load_run

    loaded = load_run(tmp_path / "back")
    assert loaded.step == 0
    ours = generate_text(loaded, "ab", max_new_tokens=6, temperature=0.0)
    hf = load_hf(tmp_path / "hf")
    ids = tok("ab", return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=256)
    new = [int(i) for i in out[0, 2:] if int(i) != 256]
    assert tok.decode(new) == ours


def test_bpe_tokenizer_is_copied_both_ways(tmp_path):
    from smoe.data.tokenizer import BPETokenizer

    bpe = BPETokenizer.train(["the cat sat on the mat. " * 20, "def f(x): return x\n" * 20],
                             vocab_size=300, min_frequency=2)
    cfg = config(vocab_size=bpe.vocab_size, moe=None)
    run = write_run(tmp_path / "run", build(cfg), bpe)
    result = export_hf(run, tmp_path / "hf")
    assert result.tokenizer == "BPE (copied)"
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "the cat: def f(x)"
    assert tok(text, add_special_tokens=False)["input_ids"] == bpe.encode(text)
    assert tok.eos_token_id == bpe.eos_id
    assert import_hf(tmp_path / "hf", tmp_path / "back").tokenizer == "bpe"
    # an HF tokenizer without <|eos|> is left out, with a note
    spec = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    for t in spec["added_tokens"]:
        t["content"] = "<|endoftext|>"
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(spec))
    other = import_hf(tmp_path / "hf", tmp_path / "other")
    assert other.tokenizer is None and any("<|eos|>" in n for n in other.notes)
    assert not (tmp_path / "other" / "tokenizer.json").exists()


def test_byte_tokenizer_json_is_the_byte_table():
    spec = json.loads(byte_tokenizer_json())
    assert sorted(spec["model"]["vocab"].values()) == list(range(256))
    assert spec["added_tokens"][0]["id"] == 256 and is_byte_tokenizer(spec)
    spec["model"]["merges"] = [["a", "b"]]
    assert not is_byte_tokenizer(spec)


def test_export_dtype_and_shards(tmp_path):
    model = build(CASES["qwen3_moe"][0])
    result = export_hf(model, tmp_path / "hf", dtype="bfloat16", max_shard_bytes=20_000)
    assert "model.safetensors.index.json" in result.files and len(result.files) > 3
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f for f in result.files
                                                 if f.startswith("model-")}
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert hf.dtype == torch.bfloat16
    back = import_hf(tmp_path / "hf", tmp_path / "run")
    weights = load_run_weights(tmp_path / "run")
    for key, value in model.state_dict().items():
        assert torch.equal(weights[key], value.to(torch.bfloat16).float())
    assert back.config == model.config


# -- refusals ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg, feature", [
    (config(moe=moe(router="expert_choice")), "expert_choice"),
    (config(moe=moe(router="noisy_topk")), "noisy_topk"),
    (config(moe=moe(router="sparsemixer")), "sparsemixer"),
    (config(moe=moe(capacity_factor=1.25)), "capacity_factor"),
    (config(moe=moe(expert_bias=True)), "expert_bias"),
    (config(moe=moe(router_bias=True)), "router_bias"),
    (config(moe=moe(activation="gelu")), "moe.activation"),
    (config(moe=None, ffn_activation="geglu"), "ffn_activation"),
    (config(moe=moe(top_k=1, weights_on_input=True)), "weights_on_input"),
    (config(moe=moe(routed_scaling_factor=2.0)), "routed_scaling_factor"),
    (config(moe=moe(n_groups=2, topk_groups=1)), "n_groups"),
    (config(qk_norm=True, moe=moe(num_shared_experts=1)), "shared experts with qk_norm"),
    (config(moe=moe(router="sigmoid_bias", num_shared_experts=1, shared_expert_gate=True)),
     "shared_expert_gate"),
    (config(moe=moe(router="sigmoid_bias"), moe_every=2), "moe_every"),
    (config(moe=moe(router="sigmoid_bias", num_shared_experts=1, shared_expert_size=30)),
     "shared_expert_size"),
    (config(moe=moe(router="sigmoid_bias", n_groups=2, group_score="max")), "group_score"),
])
def test_refuses_what_no_family_expresses(tmp_path, cfg, feature):
    with pytest.raises(ValueError, match=feature):
        hf_format_for(cfg)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=feature):
        export_hf(SMoETransformer(cfg), tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_refusal_lists_every_feature():
    cfg = config(moe=moe(capacity_factor=1.0, expert_bias=True, activation="gelu"))
    with pytest.raises(ValueError, match="gelu.*capacity_factor.*expert_bias"):
        hf_format_for(cfg)


@pytest.mark.parametrize("changes, feature", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                          "original_max_position_embeddings": 64}}, "rope_type='yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"use_sliding_window": True, "sliding_window": 16}, "sliding_window"),
    ({"mlp_only_layers": [1]}, "MoE layers"),
])
def test_import_refuses_what_smoe_cannot_express(changes, feature):
    base = dict(model_type="qwen3_moe", vocab_size=V, hidden_size=32, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
                moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                max_position_embeddings=64, decoder_sparse_step=1)
    model_config_from_hf(base)  # the base is importable
    with pytest.raises(ValueError, match=feature):
        model_config_from_hf({**base, **changes})


def test_import_refuses_nonzero_qkv_bias_and_other_families(tmp_path):
    hf = hf_model("qwen2_moe")
    with torch.no_grad():
        hf.model.layers[0].self_attn.q_proj.bias.fill_(0.1)
    hf.save_pretrained(str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=r"q_proj\.bias is not zero"):
        import_hf(tmp_path / "hf", tmp_path / "run")
    assert not (tmp_path / "run").exists()
    (tmp_path / "oss").mkdir()
    (tmp_path / "oss" / "config.json").write_text(json.dumps({"model_type": "gpt_oss"}))
    with pytest.raises(ValueError, match="gpt_oss.*cannot be imported"):
        import_hf(tmp_path / "oss", tmp_path / "run")
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    hf_cfg["quantization_config"] = {"quant_method": "fp8"}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_cfg))
    with pytest.raises(ValueError, match="quantization_config.*fp8"):
        import_hf(tmp_path / "hf", tmp_path / "run")


def test_edited_hf_config_wins_over_smoe_config(tmp_path):
    model = build(CASES["mixtral"][0])
    export_hf(model, tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    hf_cfg = json.loads(path.read_text())
    hf_cfg["router_aux_loss_coef"] = 0.5
    path.write_text(json.dumps(hf_cfg))
    back = import_hf(tmp_path / "hf", tmp_path / "run")
    assert not back.used_smoe_config and any("describes another model" in n for n in back.notes)
    assert back.config.moe.aux_loss_coef == pytest.approx(0.5 * 2 / 3)


def test_import_skips_mtp_layers_and_refuses_unknown_tensors(tmp_path):
    """GLM-4.5 checkpoints carry multi-token-prediction layers after the last decoder layer,
    which the causal LM never runs; any other unknown tensor is refused by name."""
    hf = hf_model("glm4_moe")
    hf.save_pretrained(str(tmp_path / "hf"))
    path = tmp_path / "hf" / "model.safetensors"
    state = load_file(str(path))
    state["model.layers.3.eh_proj.weight"] = torch.zeros(32, 64)
    save_file(state, str(path), metadata={"format": "pt"})
    import_hf(tmp_path / "hf", tmp_path / "run")
    state["model.layers.0.mlp.extra.weight"] = torch.zeros(2, 2)
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"no place.*model\.layers\.0\.mlp\.extra\.weight"):
        import_hf(tmp_path / "hf", tmp_path / "run2")


def test_import_never_reads_pickle(tmp_path):
    hf_model("llama").config.save_pretrained(str(tmp_path / "hf"))
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="never reads pickle"):
        import_hf(tmp_path / "hf", tmp_path / "run")


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_hf(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="not an smoe run"):
        export_hf(tmp_path / "plain", tmp_path / "out")
    run = write_run(tmp_path / "run", build(CASES["llama"][0]))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        export_hf(run, tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["x"]
    (tmp_path / "empty").mkdir()
    export_hf(run, tmp_path / "empty")  # an empty folder is fine
    with pytest.raises(FileNotFoundError, match="no config.json"):
        import_hf(tmp_path / "plain", tmp_path / "out")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folders left


# -- the key tables ---------------------------------------------------------------------------
def test_key_tables_are_consistent():
    for family, rules in KEYMAPS.items():
        for rule in rules:
            assert rule.transform in TRANSFORMS
            assert all(p.startswith(("model.", "lm_head.")) for p in rule.hf), (family, rule)
            if rule.transform.startswith("experts"):
                assert all("{e}" in p for p in rule.hf)
    import re

    pattern = re.compile(f"^{_layer_at_least(46)}$")
    assert [n for n in (9, 45, 46, 47, 99, 100, 460) if pattern.match(str(n))] == [
        46, 47, 99, 100, 460]


# -- the command line -------------------------------------------------------------------------
def test_cli_export_and_import(tmp_path, capsys):
    cfg = CASES["qwen3_moe"][0].replace(vocab_size=257)
    run = write_run(tmp_path / "run", build(cfg), ByteTokenizer())
    assert main(["export", str(run), "--to", "hf", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "as qwen3_moe (Qwen3MoeForCausalLM)" in out and "from_pretrained" in out
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    out = capsys.readouterr().out
    assert "imported" in out and "smoe generate" in out and "exact round trip" in out
    assert main(["export", str(run), "--to", "hf", str(tmp_path / "hf")]) == 2
    assert "not empty" in capsys.readouterr().err
    bad = write_run(tmp_path / "bad", build(config(moe=moe(router="expert_choice"))))
    assert main(["export", str(bad), "--to", "hf", str(tmp_path / "x")]) == 2
    assert "expert_choice" in capsys.readouterr().err
