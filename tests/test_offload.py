"""Offloaded experts (smoe.inference.offload): the same greedy tokens as the resident model for
every policy and budget (float and int4 experts, native and a patched transformers model); the
online cache's hit counts equal an offline replay of its own recorded trace; Belady's bound on
hand-made traces; prefetch statistics; bad input.

Tolerance: the resident prefill runs a grouped GEMM, the offloaded one a matmul per expert
(``expert_forward``): the same float32 math summed in another order, so logits agree to
~1e-6 relative; compared at 1e-4 of the logits' magnitude. Decoding steps run the same
``expert_forward`` on the same tensors in both models.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # noqa: E402 - before transformers is imported

import pytest
import torch

from smoe.config import ModelConfig, MoEConfig
from smoe.inference import generate
from smoe.inference.offload import (
    OffloadedExperts,
    belady_hit_rate,
    check_store,
    offload,
    simulate_hit_rate,
)
from smoe.inference.quantize import quantize
from smoe.model import SMoETransformer


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(seed: int = 0, E: int = 8, K: int = 2) -> SMoETransformer:
    torch.manual_seed(seed)
    m = MoEConfig(hidden_size=64, expert_size=64, num_experts=E, top_k=K, init_std=0.2)
    return SMoETransformer(ModelConfig(vocab_size=257, hidden_size=64, num_layers=3,
                                       num_heads=4, num_kv_heads=2, max_seq_len=96,
                                       moe=m)).eval()


PROMPT = [72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]


@pytest.mark.parametrize("policy", ["lru", "lfu", "predict"])
@pytest.mark.parametrize("budget", [0.25, 0.5, 1.0])
def test_offloaded_model_generates_the_resident_tokens(policy, budget, tmp_path):
    model = _model()
    want = generate(model, PROMPT, 20, temperature=0.0)
    idx = torch.tensor([PROMPT])
    with torch.no_grad():
        logits = model(idx).logits
    off = offload(model, budget=budget, policy=policy, store=tmp_path / "experts.safetensors")
    try:
        assert all(isinstance(layer.experts, OffloadedExperts) for _, layer in model.moe_layers())
        assert off.capacity == int(budget * 24)
        with torch.no_grad():
            got = model(idx).logits
        assert (got - logits).abs().max() <= 1e-4 * logits.abs().max()
        assert generate(model, PROMPT, 20, temperature=0.0).tolist() == want.tolist()
        s = off.stats(seconds=1.0)
        assert s["accesses"] == len(off.trace) > 0
        assert 0 <= s["hit_rate"] <= 1 and s["bytes_moved"] > 0
        if policy != "predict":  # demand fetching: the online cache is the replayed policy
            assert s["hit_rate"] == pytest.approx(simulate_hit_rate(off.trace, off.capacity,
                                                                    policy))
            assert off.hits + off.misses == s["accesses"]    # no prefetch, nothing late
            assert s["bytes_moved"] == off.misses * off.expert_bytes
            assert belady_hit_rate(off.trace, off.capacity) >= s["hit_rate"] - 1e-12
        if budget == 1.0 and policy != "predict":
            assert off.misses <= 24                          # each expert loaded once at most
    finally:
        off.close()


def test_full_budget_after_warming_moves_nothing(tmp_path):
    model = _model()
    off = offload(model, budget=1.0, policy="lru")
    try:
        off.warm()
        generate(model, PROMPT, 5, temperature=0.0)
        s = off.stats()
        assert s["hit_rate"] == 1.0 and s["bytes_moved"] == 0
    finally:
        off.close()
    assert not off.store.exists()   # a temporary store is removed by close()


def test_predict_with_every_candidate_has_full_recall():
    model = _model(E=8)
    off = offload(model, budget=0.25, policy="predict", prefetch_extra=8)
    try:
        generate(model, PROMPT, 6, temperature=0.0)
        s = off.stats()
        assert s["prefetch_recall"] == 1.0          # all experts predicted: none missed
        # precision = used / predicted, with every expert of layers 1..L-1 predicted each step
        assert 0 < s["prefetch_precision"] < 1 and s["prefetched"] > 0
    finally:
        off.close()


def test_demand_fetch_does_not_wait_behind_queued_prefetches():
    """With the prefetch thread blocked, the predictions of each layer queue up; a demand fetch
    of a queued expert cancels it and loads it itself, so decoding finishes (and equals the
    resident model) instead of waiting for the thread."""
    import threading

    model = _model(E=8)
    want = generate(model, PROMPT, 8, temperature=0.0)
    off = offload(model, budget=0.25, policy="predict", prefetch_extra=2)
    gate = threading.Event()
    off._pool.submit(gate.wait, 60)            # the worker is busy until the gate opens
    got: list[torch.Tensor] = []
    runner = threading.Thread(target=lambda: got.append(generate(model, PROMPT, 8,
                                                                 temperature=0.0)))
    try:
        runner.start()
        runner.join(timeout=60)
        assert not runner.is_alive(), "decode waited for the blocked prefetch thread"
        assert torch.equal(got[0], want)
        assert off.prefetched == 0 and off.misses > 0   # every load was a demand load
    finally:
        gate.set()
        off.close()


def test_int4_experts_offloaded_equal_resident_int4():
    model = _model()
    quantize(model, experts="int4", group_size=32)
    want = generate(model, PROMPT, 12, temperature=0.0)
    idx = torch.tensor([PROMPT])
    with torch.no_grad():
        logits = model(idx).logits
    off = offload(model, budget=0.5, policy="predict")
    try:
        with torch.no_grad():   # the same kernels on the same tensors: bitwise equal
            assert torch.equal(model(idx).logits, logits)
        assert generate(model, PROMPT, 12, temperature=0.0).tolist() == want.tolist()
        assert off.expert_bytes < 64 * 128 * 4 * 1.5 // 6   # packed 4-bit, not float
    finally:
        off.close()


def test_belady_on_hand_traces():
    a, b, c, d = (0, 0), (0, 1), (0, 2), (0, 3)
    # capacity 2, a b c a b c: Belady keeps a then b: hits at the second a and the last c
    # (evict the one used farthest away each time): misses a, b, c(evict b), a hit, b (evict a),
    # c hit -> 2 hits of 6.
    assert belady_hit_rate([a, b, c, a, b, c], 2) == pytest.approx(2 / 6)
    assert simulate_hit_rate([a, b, c, a, b, c], 2, "lru") == 0.0      # LRU thrashes
    assert belady_hit_rate([a, b, a, b, c, d], 2) == pytest.approx(2 / 6)
    assert simulate_hit_rate([a, a, b, c, a, d, a], 2, "lfu") == pytest.approx(3 / 7)
    assert belady_hit_rate([], 3) == 0.0


def test_patched_transformers_model_generates_the_same_tokens():
    transformers = pytest.importorskip("transformers")
    import smoe.hf

    transformers.utils.logging.set_verbosity_error()
    config = transformers.AutoConfig.for_model(
        "mixtral", vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, intermediate_size=32,
        num_local_experts=6, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not ("norm" in name and p.dim() == 1):
                p.normal_(std=0.2)
    smoe.hf.patch(model)
    ids = torch.tensor([[5, 9, 17, 33, 41, 8]])
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, **kw)
    off = offload(model, budget=0.5, policy="predict")
    try:
        with torch.no_grad():
            assert torch.equal(model.generate(ids, **kw), want)
        assert off.stats()["accesses"] > 0
    finally:
        off.close()


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="policy='mru' is invalid"):
        offload(_model(), policy="mru")
    with pytest.raises(ValueError, match="below one expert"):
        offload(_model(), budget=0.01)
    with pytest.raises(ValueError, match="budget=0 is invalid"):
        offload(_model(), budget=0)
    model = _model()
    store = tmp_path / "s.safetensors"
    off = offload(model, budget=0.5, policy="lru", store=store)
    off.close()
    check_store(store)
    data = store.read_bytes()
    store.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        check_store(store)
    with pytest.raises(FileNotFoundError, match="missing"):
        check_store(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="already offloaded"):
        offload(model)
    # a failed offload leaves the model as it was
    fresh = _model()
    kinds = [type(layer.experts) for _, layer in fresh.moe_layers()]
    with pytest.raises(ValueError):
        offload(fresh, budget=1e-9)
    assert [type(layer.experts) for _, layer in fresh.moe_layers()] == kinds


# -- the command ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    import random

    from smoe.cli import main as cli_main

    root = tmp_path_factory.mktemp("orun")
    rng = random.Random(1)
    words = "the house letter garden sister morning walk said quiet long evening".split()
    (root / "data").mkdir()
    (root / "data" / "prose.txt").write_text(
        "\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(400)),
        encoding="utf-8")
    old_cache = os.environ.get("SMOE_CACHE_DIR")
    os.environ["SMOE_CACHE_DIR"] = str(root / "cache")   # private, for this module
    try:
        run = root / "run"
        assert cli_main(["train", "--out", str(run), "--data", str(root / "data"), "--preset",
                         "tiny-moe", "--steps", "1", "--batch-size", "2", "--seq-len", "32",
                         "--eval-every", "0", "--eval-batches", "1", "--no-progress"]) == 0
        yield run
    finally:
        if old_cache is None:
            os.environ.pop("SMOE_CACHE_DIR", None)
        else:
            os.environ["SMOE_CACHE_DIR"] = old_cache


def test_generate_with_offload_prints_the_same_text(trained_run, tmp_path, capsys):
    import json

    from smoe.cli import main as cli_main

    args = ["generate", str(trained_run), "--prompt", "the garden", "--max-new-tokens", "16",
            "--temperature", "0", "--no-stream", "--threads", "1"]
    assert cli_main(args) == 0
    want = capsys.readouterr().out
    stats = tmp_path / "stats.json"
    store = tmp_path / "store.safetensors"
    assert cli_main(args + ["--offload", "0.5", "--offload-policy", "predict", "--stats-json",
                            str(stats), "--offload-store", str(store)]) == 0
    assert capsys.readouterr().out == want
    s = json.loads(stats.read_text())
    for key in ("hit_rate", "bytes_moved_per_token", "prefetch_precision", "prefetch_recall",
                "stall_s", "tokens_per_s"):
        assert key in s, key
    assert 0 <= s["hit_rate"] <= 1 and s["accesses"] > 0
    assert cli_main(args + ["--offload", "1.5"]) == 2
    assert "--offload 1.5 must be a fraction" in capsys.readouterr().err
