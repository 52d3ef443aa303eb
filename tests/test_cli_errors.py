"""Bad input through the command line: every case ends in exit status 2 and ONE line on stderr
that names the problem (no traceback), and leaves the files it was given as they were.

The cases run in-process through ``smoe.cli.main`` (a few as real subprocesses, to see what a
shell user sees); each checks the folder it touches by a snapshot of names, sizes and bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smoe.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the a house letter morning walk garden sister father friend evening visit young kind "
         "quiet long happy little great always never often said thought felt knew").split()
TINY = ["--steps", "2", "--batch-size", "2", "--seq-len", "16",
        "--eval-every", "0", "--eval-batches", "1", "--checkpoint-every", "1",
        "--warmup-steps", "1", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    text = "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(60))
    (root / "prose.txt").write_text(text + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("SMOE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    mp.undo()


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus) -> Path:
    """A trained tiny run (2 steps, a checkpoint at each: checkpoint/ and one previous)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert cli_main(["train", "--out", str(out), "--data", str(corpus), *TINY]) == 0
    assert (out / "previous-checkpoints" / "step-000001").is_dir()
    return out


def snapshot(folder: Path | None) -> dict[str, str] | None:
    if folder is None or not folder.exists():
        return None
    if folder.is_file():
        return {"": hashlib.sha256(folder.read_bytes()).hexdigest()}
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest()
                                         if p.is_file() else "dir")
            for p in sorted(folder.rglob("*"))}


def refused(capsys, args: list[str], *needles: str, folder: Path | None = None,
            code: int = 2) -> str:
    """Run ``smoe ARGS``: exit ``code``, one stderr line holding every needle, no traceback,
    ``folder`` unchanged. Returns the line."""
    capsys.readouterr()
    before = snapshot(folder)
    rc = cli_main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == code, (rc, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"smoe {args[0]}: error: ") or lines[0].startswith("smoe: error"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert snapshot(folder) == before, f"{folder} changed"
    return lines[0]


# -- smoe train: refused at the start ---------------------------------------------------------
TRAIN_CASES = [
    (["--steps", "0"], ["--steps", ">= 1"]),
    (["--steps", "ten"], ["--steps", "not an integer"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--seq-len", "-1"], ["--seq-len"]),
    (["--lr", "-1"], ["lr=-1.0", "invalid"]),
    (["--lr", "nan"], ["lr=nan"]),
    (["--lr", "0.001", "--min-lr", "0.1"], ["min_lr=0.1", "<= lr"]),
    (["--warmup-steps", "1000", "--steps", "3"], ["--warmup-steps 1000", "longer than the run"]),
    (["--warmup-steps", "-2"], ["--warmup-steps"]),
    (["--batch-size", "4", "--grad-accum", "3"], ["grad_accum=3", "divide"]),
    (["--router", "expert_choice"], ["expert_choice", "not causal", "--allow-noncausal-router"]),
    (["--set", "moe.router=expert_choice"], ["not causal"]),
    (["--router", "bogus"], ["--router", "bogus"]),
    (["--preset", "huge-moe"], ["unknown preset 'huge-moe'", "tiny-moe"]),
    (["--set", "model.preset=huge-moe"], ["unknown preset 'huge-moe'"]),
    (["--tokenizer", "words"], ["--tokenizer", "words"]),
    (["--num-experts", "0"], ["--num-experts", ">= 1"]),
    (["--top-k", "9"], ["top_k"]),
    (["--capacity-factor", "-1"], ["capacity_factor"]),
    (["--aux-loss-coef", "-1"], ["aux_loss_coef"]),
    (["--z-loss-coef", "inf"], ["z_loss_coef"]),
    (["--set", "moe.top_k"], ["--set", "SECTION.FIELD=VALUE"]),
    (["--set", "optim.lr=1"], ["unknown section 'optim'"]),
    (["--set", "train.learning_rate=1"], ["TrainConfig", "learning_rate"]),
    (["--set", "moe.num_expert=4"], ["MoEConfig", "num_expert"]),
    (["--set", "model.num_heads=3"], ["num_heads"]),
    (["--set", "model.moe=1"], ["[moe] section"]),
    (["--set", "data.val_fraction=0.9"], ["val_fraction"]),
    (["--set", "data.colour=1"], ["DataConfig", "colour"]),
    (["--set", "train.grad_clip=big"], ["grad_clip='big'"]),
    (["--dtype", "float16"], ["float16", "bfloat16"]),
    (["--dtype", "int8"], ["--dtype", "int8"]),
    (["--device", "cuda:7"], ["cuda:7"]),
    (["--device", "tpu"], ["tpu"]),
    (["--threads", "0"], ["--threads", ">= 1"]),
    (["--seq-len", "100000"], ["fewer than seq_len"]),
    (["--keep-checkpoints", "0"], ["--keep-checkpoints"]),
    (["--resume", "--init-from", "x"], ["--init-from", "--resume"]),
    (["--resume", "--overwrite"], ["--overwrite", "--resume"]),
]


@pytest.mark.parametrize("extra,needles", TRAIN_CASES, ids=[" ".join(c[0]) for c in TRAIN_CASES])
def test_train_refuses_at_the_start(capsys, tmp_path, corpus, extra, needles):
    out = tmp_path / "out"
    args = ["train", "--out", str(out), "--data", str(corpus), *TINY, *extra]
    # the later flag wins: put the case's flags last (argparse keeps the last value)
    refused(capsys, args, *needles)
    assert not out.exists()


def test_train_refusals_about_files(capsys, tmp_path, corpus, run):
    base = ["--data", str(corpus), *TINY]
    refused(capsys, ["train", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "nope"),
                     *TINY], "does not exist")
    (tmp_path / "blank.txt").write_text("  \n")
    refused(capsys, ["train", "--out", str(tmp_path / "o"), "--data",
                     str(tmp_path / "blank.txt"), *TINY], "empty")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    refused(capsys, ["train", "--out", str(a_file), *base], "not a folder", folder=a_file)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    refused(capsys, ["train", "--out", str(other), *base], "not an smoe run", folder=other)
    refused(capsys, ["train", "--out", str(other), *base, "--overwrite"], "not an smoe run",
            folder=other)
    refused(capsys, ["train", "--out", str(run), *base], "existing smoe run", "--resume",
            folder=run)
    refused(capsys, ["train", "--out", str(tmp_path / "none"), "--resume"], "nothing to resume")
    refused(capsys, ["train", "--out", str(run), "--resume", "--lr", "0.1"], "lr=0.1 differs",
            folder=run)
    refused(capsys, ["train", "--out", str(run), "--resume", "--steps", "1"],
            "before the run's checkpoint at step 2", folder=run)
    refused(capsys, ["train", "--out", str(run), "--resume", "--top-k", "1"],
            "keeps its model", folder=run)
    refused(capsys, ["train", "--out", str(tmp_path / "o"), *base, "--init-from",
                     str(tmp_path / "missing")], "does not exist")
    refused(capsys, ["train", "--out", str(tmp_path / "o"), *base, "--init-from", str(other)],
            "not an smoe run", folder=other)
    refused(capsys, ["train", "--out", str(tmp_path / "o"), "--init-from", str(run), *base,
                     "--preset", "tiny-moe"],
            "conflicts with --init-from", folder=run)
    for name, text, needles in (
            ("missing.toml", None, ["does not exist"]),
            ("bad.toml", "[train\nsteps = 1", ["not valid TOML"]),
            ("bad.json", "{\"train\": ", ["not valid JSON"]),
            ("sections.toml", "[optimizer]\nlr = 1\n", ["unknown section 'optimizer'"]),
            ("fields.toml", "[moe]\nexperts = 4\n", ["MoEConfig", "experts"]),
            ("notable.json", "[1, 2]", ["table of sections"]),
            ("flat.toml", "train = 3\n", ["[train] must be a table"]),
            ("run.yaml", "train: {}\n", [".toml or .json"])):
        cfg = tmp_path / name
        if text is not None:
            cfg.write_text(text)
        refused(capsys, ["train", "--out", str(tmp_path / "o"), *base, "--config", str(cfg)],
                *needles)
    assert not (tmp_path / "o").exists()


def test_failed_resume_changes_nothing(capsys, tmp_path, run):
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "config.json").write_text("{not json")
    refused(capsys, ["train", "--out", str(broken), "--resume"], "not valid JSON", folder=broken)
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    cfg = json.loads((moved / "config.json").read_text())
    cfg["data"]["paths"] = [str(tmp_path / "gone")]
    (moved / "config.json").write_text(json.dumps(cfg))
    # --steps 5 would change config.json; the data is gone, so nothing may change
    refused(capsys, ["train", "--out", str(moved), "--resume", "--steps", "5"], "does not exist",
            folder=moved)


# -- smoe generate / eval on damaged or wrong inputs ------------------------------------------
def _damaged(run: Path, tmp_path: Path, name: str, damage) -> Path:
    copy = tmp_path / name
    shutil.copytree(run, copy)
    damage(copy)
    return copy


def _truncate_all(folder: Path) -> None:
    for f in folder.rglob("model.safetensors"):
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])


def _bad_state_config(folder: Path) -> None:
    for f in folder.rglob("state.json"):
        state = json.loads(f.read_text())
        state["model_config"]["num_layers"] += 1
        f.write_text(json.dumps(state))


def test_generate_and_eval_refusals(capsys, tmp_path, run):
    g = ["generate"]
    refused(capsys, g + [str(tmp_path / "none"), "--prompt", "a"], "not an smoe run")
    (tmp_path / "plain").mkdir()
    refused(capsys, g + [str(tmp_path / "plain"), "--prompt", "a"], "not an smoe run")
    for extra, needle in ((["--max-new-tokens", "-1"], "--max-new-tokens"),
                          (["--temperature", "-1"], "--temperature"),
                          (["--top-p", "0"], "--top-p"),
                          (["--top-k", "0"], "--top-k"),
                          (["--stop", ""], "--stop"),
                          (["--prompt", ""], "prompt is empty"),
                          (["--prompt", "x" * 400], "context is 256"),
                          (["--device", "cuda:3"], "cuda:3"),
                          (["--dtype", "int8"], "--dtype"),
                          (["--threads", "0"], "--threads")):
        args = g + [str(run), "--prompt", "The ", *extra] if "--prompt" not in extra \
            else g + [str(run), *extra]
        refused(capsys, args, needle, folder=run)
    damaged = {
        "truncated": (_truncate_all, "no usable checkpoint"),
        "badconfig": (lambda f: (f / "config.json").write_text("{"), "not valid JSON"),
        "notrun": (lambda f: (f / "config.json").write_text('{"format": "x"}'),
                   "not an smoe run config"),
        "mismatch": (_bad_state_config, "do not fit"),
        "badtok": (lambda f: (f / "tokenizer.json").write_text("{oops"), "not valid JSON"),
        "notok": (lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json"),
        "emptyst": (lambda f: [p.write_bytes(b"") for p in f.rglob("model.safetensors")],
                    "no usable checkpoint"),
    }
    for name, (damage, needle) in damaged.items():
        folder = _damaged(run, tmp_path, name, damage)
        for cmd in (g + [str(folder), "--prompt", "The "], ["eval", str(folder)]):
            capsys.readouterr()
            before = snapshot(folder)
            rc = cli_main(cmd)
            err = capsys.readouterr().err
            last = err.strip().splitlines()[-1]
            assert rc == 2 and "Traceback" not in err and needle in last, (name, err)
            # damaged checkpoints are named first, one warning line each
            assert all(line.startswith("smoe: warning: checkpoint") for line in
                       err.strip().splitlines()[:-1]), err
            assert snapshot(folder) == before
    refused(capsys, ["eval", str(run), "--eval-batches", "0"], "--eval-batches", folder=run)
    refused(capsys, ["eval", str(run), "--device", "mps"], "mps", folder=run)


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(capsys, tmp_path, run):
    folder = _damaged(run, tmp_path, "newest", lambda f: (f / "checkpoint" / "model.safetensors")
                      .write_bytes((f / "checkpoint" / "model.safetensors").read_bytes()[:100]))
    capsys.readouterr()
    assert cli_main(["eval", str(folder)]) == 0
    out, err = capsys.readouterr()
    (warning,) = err.strip().splitlines()
    assert "checkpoint" in warning and "step 2" in warning and "truncated" in warning
    assert "step 1: validation loss" in out
    # resuming from the previous one redoes step 2 and writes a sound checkpoint again
    assert cli_main(["train", "--out", str(folder), "--resume"]) == 0
    from smoe.checkpoint import checkpoint_dir, read_state

    assert read_state(checkpoint_dir(folder, warn=False))["step"] == 2


# -- route / bench / top level ------------------------------------------------------------------
ROUTE_CASES = [
    (["--num-experts", "0"], "--num-experts"),
    (["--top-k", "9"], "top_k"),
    (["--router", "bogus"], "--router"),
    (["--tokens", "-5"], "--tokens"),
    (["--capacity-factor", "-1"], "capacity_factor"),
    (["--threads", "0"], "--threads"),
    (["--hidden-size", "abc"], "--hidden-size"),
    (["--device", "cuda"], "CUDA is not available"),
]


@pytest.mark.parametrize("extra,needle", ROUTE_CASES, ids=[" ".join(c[0]) for c in ROUTE_CASES])
def test_route_refusals(capsys, extra, needle):
    if extra[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    refused(capsys, ["route", *extra], needle)


@pytest.mark.parametrize("extra,needle", [
    (["--threads", "0"], "--threads 0"),
    (["--rounds", "0"], "--rounds"),
    (["--shapes", "nope"], "--shapes"),
    (["--tokens", "0"], "--tokens"),
    (["--modes", "sideways"], "--modes"),
])
def test_bench_refusals(capsys, extra, needle):
    refused(capsys, ["bench", "--quick", *extra], needle)


def test_top_level_refusals(capsys):
    for args, needle in ((["nonsense"], "invalid choice"),
                         (["train"], "--out"),
                         (["generate"], "RUN_DIR"),
                         (["plan"], "CONFIG")):
        capsys.readouterr()
        rc = cli_main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and needle in err[0] and "see `smoe" in err[0]


# -- export / import / plan: only "no traceback" (their messages are their modules') ------------
def test_export_import_plan_never_show_a_traceback(capsys, tmp_path, run):
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "heads.json").write_text(json.dumps({"model_type": "mixtral", "hidden_size": 4096,
                                                      "num_attention_heads": 33}))
    (tmp_path / "nonempty").mkdir()
    (tmp_path / "nonempty" / "x").write_text("x")
    (tmp_path / "hf").mkdir()
    cases = [["export", str(tmp_path / "none"), "--to", "hf", str(tmp_path / "e1")],
             ["export", str(run), "--to", "hf", str(tmp_path / "nonempty")],
             ["export", str(run), "--to", "gguf", str(tmp_path / "e2")],
             ["import", str(tmp_path / "none"), str(tmp_path / "i1")],
             ["import", str(tmp_path / "hf"), str(tmp_path / "i2")],
             ["import", str(tmp_path / "bad.json"), str(tmp_path / "i3")],
             ["plan", str(tmp_path / "none.json")],
             ["plan", str(tmp_path / "bad.json")],
             ["plan", str(tmp_path / "heads.json")]]
    for args in cases:
        capsys.readouterr()
        rc = cli_main(args)
        err = capsys.readouterr().err
        assert "Traceback" not in err, (args, err)
        assert rc != 0 or not err.strip(), (args, err)


# -- what a shell user sees -----------------------------------------------------------------------
def _smoe(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "smoe", *args], capture_output=True, text=True,
                          env=env, timeout=120, **kw)


def test_subprocess_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, run):
    r = _smoe(["train", "--out", str(tmp_path / "o"), "--steps", "3", "--warmup-steps", "10"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "longer than the run" in r.stderr
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    (bad / "tokenizer.json").write_text("{")
    r = _smoe(["generate", str(bad), "--prompt", "a"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not valid JSON" in r.stderr
    r = _smoe(["generate", str(bad), "--prompt", "a", "--debug"])
    assert r.returncode == 2 and "Traceback" in r.stderr and "not valid JSON" in r.stderr
