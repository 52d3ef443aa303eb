"""`smoe generate` and `smoe.runs`: streaming, stop strings, top-k, the prompt from stdin, the
context messages, and load_run's fixed order (transforms on the meta model, then weights, then
device and dtype)."""

from __future__ import annotations

import io
import random
import sys
from pathlib import Path

import pytest
import torch

from smoe.cli import main as cli_main
from smoe.runs import generate_text, load_run

WORDS = "the a house letter morning walk garden sister father friend evening".split()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One thread: tiny matrices gain nothing from more, and a busy machine loses a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    corpus = tmp_path_factory.mktemp("corpus")
    rng = random.Random(2)
    (corpus / "prose.txt").write_text("\n\n".join(
        " ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(50)) + "\n")
    mp = pytest.MonkeyPatch()
    mp.setenv("SMOE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    out = tmp_path_factory.mktemp("runs") / "run"
    try:
        assert cli_main(["train", "--out", str(out), "--data", str(corpus), "--steps", "3",
                         "--batch-size", "2", "--seq-len", "32", "--eval-every", "0",
                         "--eval-batches", "1", "--warmup-steps", "1", "--no-progress",
                         "--device", "cpu"]) == 0
    finally:
        mp.undo()
    return out


@pytest.fixture(scope="module")
def loaded(run):
    return load_run(run)


def test_streaming_pieces_add_up_to_the_text(loaded):
    pieces: list[str] = []
    plain = generate_text(loaded, "The ", 40, temperature=0.0)
    streamed = generate_text(loaded, "The ", 40, temperature=0.0, on_text=pieces.append)
    assert streamed == plain and "".join(pieces) == plain
    assert len(pieces) > 5                       # it came out as it was produced


def test_stop_strings_end_the_text_before_them(loaded):
    plain = generate_text(loaded, "The ", 60, temperature=0.0)
    stop = plain[8:10]
    assert len(stop) == 2 and stop in plain
    pieces: list[str] = []
    text = generate_text(loaded, "The ", 60, temperature=0.0, stop=[stop, "\x00never"],
                         on_text=pieces.append)
    assert text == plain[:plain.find(stop)] and "".join(pieces) == text


def test_top_k_one_is_greedy(loaded):
    greedy = generate_text(loaded, "a ", 30, temperature=0.0)
    for seed in (0, 1):
        assert generate_text(loaded, "a ", 30, temperature=1.5, top_k=1, seed=seed) == greedy
    with pytest.raises(ValueError, match="top_k=0"):
        generate_text(loaded, "a ", 3, top_k=0)


def test_context_cap_and_trained_length_are_said_in_one_line(loaded):
    notes: list[str] = []
    limit = loaded.model.config.max_seq_len       # 256: tiny-moe's context
    prompt = "the garden " * 24                   # 264 bytes > limit
    with pytest.raises(ValueError, match=f"context is {limit}"):
        generate_text(loaded, prompt, 10)
    prompt = prompt[:limit - 4]
    text = generate_text(loaded, prompt, 50, temperature=0.0, log=notes.append)
    assert len(loaded.tokenizer.encode(text)) <= 4
    assert len(notes) == 2 and all("\n" not in n for n in notes)
    assert f"context is {limit} tokens" in notes[0] and "at most 4 new tokens" in notes[0]
    assert "trained on sequences of 32 tokens" in notes[1]
    notes.clear()
    generate_text(loaded, "The ", 20, temperature=0.0, log=notes.append)
    assert notes == []                             # 4 + 20 <= 32: nothing to say


def test_cli_streams_reads_stdin_and_warns(run, capsys, monkeypatch):
    args = ["generate", str(run), "--max-new-tokens", "20", "--temperature", "0", "--threads",
            "1"]
    assert cli_main([*args, "--prompt", "The ", "--no-stream"]) == 0
    once = capsys.readouterr()
    assert cli_main([*args, "--prompt", "The "]) == 0
    streamed = capsys.readouterr()
    assert streamed.out == once.out and once.out.startswith("The ")
    assert once.err == ""
    for extra in ([], ["--prompt", "-"]):
        monkeypatch.setattr(sys, "stdin", io.StringIO("The \n"))
        assert cli_main([*args, *extra]) == 0
        assert capsys.readouterr().out == once.out
    assert cli_main([*args, "--prompt", "The ", "--max-new-tokens", "40"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: the model was trained on sequences")


def test_load_run_order_transforms_on_meta_then_weights_device_dtype(run):
    seen = {}

    def transforms(model):
        seen["device"] = next(model.parameters()).device.type
        return None

    r = load_run(run, "cpu", "bfloat16", transforms=transforms)
    assert seen["device"] == "meta"
    p = next(r.model.parameters())
    assert p.dtype == torch.bfloat16 and p.device.type == "cpu" and not r.model.training
    ref = load_run(run)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        a = r.model(ids).logits.float()
        b = ref.model(ids).logits
    # bfloat16 keeps 8 bits of mantissa: logits of order 1-10 agree to a few 1e-2
    torch.testing.assert_close(a, b, atol=0.15, rtol=0.05)
    assert r.checkpoint == run / "checkpoint" and r.step == 3
