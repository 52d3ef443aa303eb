"""The trainer: schedule, optimizer groups, accumulation, loss going down, checkpoints that
survive a crash mid-write, exact resume after SIGKILL (real subprocesses), the CLI's bad-input
errors, metrics.jsonl, and the generate/eval commands on a trained run.

Runs use a small two-domain corpus written into a temporary folder (no system corpus needed)
and one CPU thread, so that a worker of ``pytest -n 2`` does not fight the other for cores.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from smoe.cli import main as cli_main
from smoe.config import ModelConfig, MoEConfig
from smoe.data import Batcher, ByteTokenizer, DataConfig, prepare_data
from smoe.model import SMoETransformer
from smoe.train import TrainConfig, Trainer, apply_loss_overrides, lr_at, param_groups
from smoe import checkpoint as ckpt
from smoe.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the a house letter morning walk garden sister father friend evening visit young "
         "kind quiet long happy little great always never often said thought felt knew went "
         "came saw wrote of to in with for at by on and but which who her his their she he "
         "they was were had could would should might very much more rather").split()

# The subprocess runs: small enough to be quick, big enough to checkpoint (tiny-moe, 4 x 32).
RUN_ARGS = ["--preset", "tiny-moe", "--steps", "12", "--checkpoint-every", "4", "--batch-size",
            "4", "--seq-len", "32", "--eval-every", "0", "--eval-batches", "2", "--seed", "3",
            "--lr", "0.003", "--warmup-steps", "2", "--no-progress"]


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """prose.txt (seeded sentences, ~40 KB) and code.py (two stdlib modules)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    paragraphs = []
    for _ in range(160):
        sentences = []
        for _ in range(rng.randint(2, 5)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(5, 14))]
            sentences.append(" ".join(words).capitalize() + ".")
        paragraphs.append(" ".join(sentences))
    (root / "prose.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    import shlex

    code = Path(textwrap.__file__).read_text() + Path(shlex.__file__).read_text()
    (root / "code.py").write_text(code, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """Environment of the subprocess runs: one thread, a private data cache."""
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
             SMOE_CACHE_DIR=str(tmp_path_factory.mktemp("cache")), PYTHONUNBUFFERED="1")
    return e


@pytest.fixture(autouse=True)
def _one_thread_private_cache(monkeypatch, env):
    monkeypatch.setenv("SMOE_CACHE_DIR", env["SMOE_CACHE_DIR"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _smoe(args: list[str], env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smoe", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, corpus_dir, env) -> Path:
    """An uninterrupted 12-step run made by the real command (the reference for resume)."""
    out = tmp_path_factory.mktemp("runs") / "full"
    r = _smoe(["train", "--out", str(out), "--data", str(corpus_dir), *RUN_ARGS], env)
    assert r.returncode == 0, r.stderr
    return out


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def _tiny_model(seed: int = 0, **moe) -> SMoETransformer:
    torch.manual_seed(seed)
    m = MoEConfig(hidden_size=32, expert_size=32, num_experts=4, top_k=2, **moe)
    return SMoETransformer(ModelConfig(vocab_size=257, hidden_size=32, num_layers=2,
                                       num_heads=2, num_kv_heads=1, max_seq_len=64, moe=m))


def _data(corpus_dir):
    """The corpus's data (the split hashes each file's path relative to the folder given, so
    it is the same in every session, whatever the temporary folder's name)."""
    return prepare_data(DataConfig(paths=(str(corpus_dir),)))


# -- schedule, config, optimizer ------------------------------------------------------------
def test_schedule_values_at_known_steps():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    assert lr_at(0, cfg) == pytest.approx(1e-4)          # (0 + 1) / 10 of the peak
    assert lr_at(4, cfg) == pytest.approx(5e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)          # warmup ends at the peak
    assert lr_at(10, cfg) == pytest.approx(1e-3)         # cosine starts at the peak
    assert lr_at(55, cfg) == pytest.approx(5.5e-4)       # half way: (lr + min_lr) / 2
    assert lr_at(100, cfg) == pytest.approx(1e-4)        # min_lr at the end, and after
    assert lr_at(500, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(i, cfg) for i in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))     # monotone decay
    assert lr_at(0, TrainConfig(steps=10, warmup_steps=0, lr=2e-3, min_lr=0.0)) == 2e-3


@pytest.mark.parametrize("changes, field", [
    ({"batch_size": 6, "grad_accum": 4}, "grad_accum"),
    ({"lr": 1e-4, "min_lr": 1e-3}, "min_lr"),
    ({"betas": (0.9, 1.0)}, "betas[1]"),
    ({"steps": 0}, "steps"),
    ({"bf16": "yes"}, "bf16"),
    ({"aux_loss_coef": -1.0}, "aux_loss_coef"),
])
def test_train_config_rejects_bad_values(changes, field):
    with pytest.raises(ValueError, match=rf"^{field.replace('[', '.').replace(']', '.')}="):
        TrainConfig(**changes)


def test_train_config_round_trips_through_json():
    cfg = TrainConfig(steps=7, betas=(0.8, 0.9), aux_loss_coef=0.0)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_no_weight_decay_on_norms_biases_embeddings():
    model = _tiny_model(router_bias=True)
    groups = {g["name"]: set(g["param_names"]) for g in param_groups(model, 0.1)}
    assert "embed.weight" in groups["no_decay"]
    assert {"norm.weight", "layers.0.attn_norm.weight"} <= groups["no_decay"]
    assert "layers.0.ffn.router.bias" in groups["no_decay"]
    assert {"layers.0.attn.q_proj.weight", "layers.0.ffn.router.weight", "lm_head.weight",
            "layers.1.ffn.experts.down_proj"} <= groups["decay"]
    assert not groups["decay"] & groups["no_decay"]


# -- the loop -------------------------------------------------------------------------------
def test_loss_decreases_over_30_steps(corpus_dir):
    data = _data(corpus_dir)
    cfg = TrainConfig(steps=30, batch_size=8, seq_len=32, lr=3e-3, min_lr=3e-4, warmup_steps=3)
    trainer = Trainer(_tiny_model(), cfg, Batcher(data.train, 8, 32, seed=0))
    losses = []
    trainer.fit(on_log=lambda row: losses.append(row["loss"]))
    assert len(losses) == 30 and losses[0] == pytest.approx(math.log(257), abs=0.3)
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5, losses


def test_two_half_batches_equal_one_full_batch(corpus_dir):
    """grad_accum=2 on halves gives the gradient, and so the step, of one full batch.

    The balance loss is a product of batch means, not a mean, so it is off here (the z-loss is
    a mean and stays). The step is checked with SGD: AdamW's first step is lr * g / (|g| + eps),
    a sign, which turns 1e-9 rounding noise on a near-zero gradient entry into a full step."""
    data = _data(corpus_dir)
    batch = Batcher(data.train, 8, 32, seed=1).batch_at(0)
    results = []
    for accum in (1, 2):
        cfg = TrainConfig(steps=5, batch_size=8, seq_len=32, grad_accum=accum, lr=1e-2,
                          warmup_steps=0, aux_loss_coef=0.0)
        model = _tiny_model(seed=5)
        trainer = Trainer(model, cfg, Batcher(data.train, 8, 32))
        sgd = torch.optim.SGD(model.parameters(), lr=0.5)
        grads = {}
        sgd.register_step_pre_hook(lambda opt, args, kwargs, model=model, grads=grads: grads.update(
            {n: p.grad.clone() for n, p in model.named_parameters()}))
        trainer.optimizer = sgd
        row = trainer.train_step(batch)
        results.append((model, row, grads))
    (m1, r1, g1), (m2, r2, g2) = results
    assert r1["loss"] == pytest.approx(r2["loss"], abs=1e-6)
    assert r1["z_loss"] == pytest.approx(r2["z_loss"], abs=1e-7)
    assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-5)
    assert set(g1) == set(g2) and len(g1) == len(list(m1.parameters()))
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], atol=1e-5, rtol=0, msg=name)
    for (name, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, atol=1e-5, rtol=0, msg=name)


def test_loss_overrides_reach_the_layers():
    model = _tiny_model()
    apply_loss_overrides(model, TrainConfig(aux_loss_coef=0.0, z_loss_coef=0.5))
    for _, layer in model.moe_layers():
        assert layer.config.aux_loss_coef == 0.0 and layer.router.config.z_loss_coef == 0.5
    assert model.config.moe.z_loss_coef == 0.5


def test_bias_balancing_runs_once_per_optimizer_step(corpus_dir):
    """update_router_biases runs after each update (not each micro-batch) and moves each
    expert's bias by gamma * sign(mean load - its load)."""
    data = _data(corpus_dir)
    cfg = TrainConfig(steps=3, batch_size=4, seq_len=32, warmup_steps=0, grad_accum=2)
    model = _tiny_model(router="sigmoid_bias")
    calls, rows = [], []
    real = model.update_router_biases
    model.update_router_biases = lambda: (calls.append(1), real())[1]
    trainer = Trainer(model, cfg, Batcher(data.train, 4, 32))
    rows.append(trainer.train_step(next(trainer.batcher)))
    gamma = model.config.moe.bias_update_rate
    for (_, layer), load in zip(model.moe_layers(), rows[0]["expert_load"]):
        mean = sum(load) / len(load)
        expected = [gamma * ((mean > f) - (mean < f)) for f in load]
        assert layer.router.expert_bias.tolist() == pytest.approx(expected)
        assert int(layer.load_since_update.sum()) == 0          # consumed by the update
    trainer.fit()
    assert len(calls) == 3
    model = _tiny_model(router="sigmoid_bias")
    Trainer(model, cfg.replace(bias_update=False), Batcher(data.train, 4, 32)).fit()
    assert all(float(layer.router.expert_bias.abs().sum()) == 0 for _, layer in model.moe_layers())


# -- checkpoints ----------------------------------------------------------------------------
def _trainer(data, run_dir, steps=6, **kw):
    cfg = TrainConfig(steps=steps, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2,
                      checkpoint_every=2, eval_every=0, **kw)
    return Trainer(_tiny_model(seed=2), cfg, Batcher(data.train, 4, 32, seed=4),
                   run_dir=run_dir)


def _fit_losses(trainer) -> dict[int, float]:
    out = {}
    trainer.fit(on_log=lambda row: out.__setitem__(row["step"], row["loss"]))
    return out


def test_crash_while_writing_keeps_the_previous_checkpoint(corpus_dir, tmp_path, monkeypatch):
    data = _data(corpus_dir)
    reference = _fit_losses(_trainer(data, tmp_path / "ref"))

    run = tmp_path / "run"
    real_save, calls = ckpt.save_tensors, []

    def failing_save(tensors, path):
        calls.append(path)
        if len(calls) == 4:          # step 4: the model file is written, the optimizer's fails
            raise OSError("disk full (simulated)")
        real_save(tensors, path)

    monkeypatch.setattr(ckpt, "save_tensors", failing_save)
    with pytest.raises(OSError, match="simulated"):
        _fit_losses(_trainer(data, run))
    monkeypatch.setattr(ckpt, "save_tensors", real_save)
    folder = ckpt.checkpoint_dir(run)
    assert folder == run / "checkpoint" and ckpt.read_state(folder)["step"] == 2
    assert not list(run.glob("checkpoint.tmp-*"))

    resumed = _trainer(data, run)
    resumed.load_checkpoint(folder)
    assert resumed.step == 2
    losses = _fit_losses(resumed)
    assert losses == {s: reference[s] for s in range(3, 7)}


def test_crash_between_the_renames_uses_the_previous_checkpoint(corpus_dir, tmp_path,
                                                                 monkeypatch):
    data = _data(corpus_dir)
    reference = _fit_losses(_trainer(data, tmp_path / "ref"))
    run = tmp_path / "run"
    real_rename, renames = os.rename, []

    def crashing_rename(src, dst):
        renames.append(Path(dst).name)
        if renames == ["checkpoint", "step-000002", "checkpoint"]:  # step 4: old moved away
            raise OSError("power cut (simulated)")
        real_rename(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", crashing_rename)
    with pytest.raises(OSError, match="simulated"):
        _fit_losses(_trainer(data, run))
    monkeypatch.setattr(ckpt.os, "rename", real_rename)
    assert not (run / "checkpoint").exists()
    folder = ckpt.checkpoint_dir(run)
    assert folder == run / "previous-checkpoints" / "step-000002"
    assert ckpt.read_state(folder)["step"] == 2

    resumed = _trainer(data, run)
    resumed.load_checkpoint(folder)
    assert _fit_losses(resumed) == {s: reference[s] for s in range(3, 7)}
    assert ckpt.checkpoint_dir(run) == run / "checkpoint"      # the next saves rotated it
    assert sorted(p.name for p in (run / "previous-checkpoints").iterdir()) == ["step-000004"]


def test_resume_restores_the_rng_of_a_noisy_router(corpus_dir, tmp_path):
    """noisy_topk draws from the global RNG in training: exact resume needs its saved state."""
    import shutil

    data = _data(corpus_dir)

    def make(run):
        cfg = TrainConfig(steps=4, batch_size=4, seq_len=32, warmup_steps=1, checkpoint_every=2,
                          eval_every=0)
        return Trainer(_tiny_model(seed=2, router="noisy_topk"), cfg,
                       Batcher(data.train, 4, 32, seed=4), run_dir=run)

    saved = tmp_path / "step2"
    reference = {}

    def on_log(row):
        reference[row["step"]] = row["loss"]
        if row["step"] == 3:                                 # the step-2 checkpoint exists
            shutil.copytree(tmp_path / "run" / "checkpoint", saved)

    make(tmp_path / "run").fit(on_log=on_log)
    torch.manual_seed(123)                                   # some other RNG state
    resumed = make(tmp_path / "other")
    resumed.load_checkpoint(saved)
    assert _fit_losses(resumed) == {3: reference[3], 4: reference[4]}


def test_checkpoint_files_are_safetensors_and_json(trained_run):
    folder = trained_run / "checkpoint"
    assert sorted(p.name for p in folder.iterdir()) == [
        "model.safetensors", "optimizer.safetensors", "state.json"]
    state = json.loads((folder / "state.json").read_text())
    assert state["step"] == 12 and state["batcher"]["step"] == 12
    assert all(isinstance(b, int) and 0 <= b < 256 for b in state["rng"]["torch"])
    assert state["train_config"]["steps"] == 12
    opt = ckpt.load_optimizer_state(folder)
    assert "embed.weight/exp_avg" in opt and float(opt["embed.weight/step"]) == 12.0


# -- exact resume after SIGKILL --------------------------------------------------------------
_SLOW = ("import sys, time; import smoe.train.loop as L; f = L.Trainer.train_step; "
         "L.Trainer.train_step = lambda self, b: (time.sleep(120 if self.step >= 8 else 0), "
         "f(self, b))[1]; "
         "from smoe.cli import main; sys.exit(main(sys.argv[1:]))")


def test_sigkill_then_resume_logs_the_same_losses(trained_run, corpus_dir, env, tmp_path):
    out = tmp_path / "killed"
    # The same command, but once the checkpoint of step 8 is written the next step blocks, so
    # the kill lands there whatever the machine's load (no race with the end of the run).
    proc = subprocess.Popen([sys.executable, "-c", _SLOW, "train", "--out", str(out), "--data",
                             str(corpus_dir), *RUN_ARGS], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = out / "checkpoint" / "state.json"
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads(state.read_text())["step"] >= 8:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert ckpt.read_state(ckpt.checkpoint_dir(out))["step"] == 8
    assert max(_losses(out)) < 12

    r = _smoe(["train", "--out", str(out), "--resume", "--no-progress"], env)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout and "from step 8" in r.stdout
    full, resumed = _losses(trained_run), _losses(out)
    assert sorted(resumed) == list(range(1, 13))
    assert [resumed[s] for s in range(9, 13)] == [full[s] for s in range(9, 13)]  # exact
    assert resumed == full


# -- bad inputs -------------------------------------------------------------------------------
def _cli(args, capsys) -> tuple[int, str]:
    rc = cli_main(args)
    return rc, capsys.readouterr().err


def test_missing_or_empty_data_path(tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = _cli(["train", "--out", str(out), "--data", str(tmp_path / "nope.txt")], capsys)
    assert rc == 2 and "does not exist" in err and not out.exists()
    (tmp_path / "empty.txt").write_text("  \n")
    rc, err = _cli(["train", "--out", str(out), "--data", str(tmp_path / "empty.txt")], capsys)
    assert rc == 2 and "empty" in err and not out.exists()


def test_unknown_preset(tmp_path, corpus_dir, capsys):
    out = tmp_path / "run"
    rc, err = _cli(["train", "--out", str(out), "--preset", "huge-moe", "--data",
                    str(corpus_dir)], capsys)
    assert rc == 2 and "unknown preset 'huge-moe'" in err and "tiny-moe" in err
    assert not out.exists()


def test_folder_with_other_files_is_left_alone(tmp_path, corpus_dir, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc, err = _cli(["train", "--out", str(out), "--data", str(corpus_dir)], capsys)
    assert rc == 2 and "not an smoe run" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"
    rc, err = _cli(["train", "--out", str(out), "--resume"], capsys)
    assert rc == 2 and "not an smoe run" in err


def test_existing_run_needs_resume(trained_run, corpus_dir, capsys):
    before = (trained_run / "metrics.jsonl").read_text()
    rc, err = _cli(["train", "--out", str(trained_run), "--data", str(corpus_dir)], capsys)
    assert rc == 2 and "existing smoe run" in err and "--resume" in err
    rc, err = _cli(["train", "--out", str(trained_run), "--resume", "--lr", "0.1"], capsys)
    assert rc == 2 and "lr=0.1 differs" in err
    rc, err = _cli(["train", "--out", str(trained_run), "--resume", "--preset", "small-moe"],
                   capsys)
    assert rc == 2 and "preset='small-moe' differs" in err
    assert (trained_run / "metrics.jsonl").read_text() == before


def test_resume_of_a_missing_folder(tmp_path, capsys):
    rc, err = _cli(["train", "--out", str(tmp_path / "none"), "--resume"], capsys)
    assert rc == 2 and "nothing to resume" in err


# -- metrics and the commands on a trained run ----------------------------------------------
def test_metrics_jsonl_and_tensorboard(trained_run):
    rows = read_metrics(trained_run)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 13))
    for r in train:
        assert {"step", "loss", "tokens_per_s", "lr", "aux_loss", "z_loss", "load_imbalance",
                "expert_load", "load_imbalance_per_layer", "grad_norm"} <= set(r)
        assert r["tokens_per_s"] > 0 and 1.0 <= r["load_imbalance"] <= 8.0
        assert len(r["expert_load"]) == 4 and sum(r["expert_load"][0]) == pytest.approx(1, abs=1e-3)
    assert train[0]["lr"] == pytest.approx(0.0015) and train[1]["lr"] == pytest.approx(0.003)
    (ev,) = evals                                       # eval_every 0: only the final one
    assert ev["step"] == 12
    assert ev["val_bpb"] == pytest.approx(ev["val_loss"] / math.log(2), rel=0.01)
    assert set(ev["val_loss_by_domain"]) == {"prose", "code"}
    routing = ev["domain_routing"]
    assert set(routing) == {"prose", "code"} and len(routing["code"]) == 4
    assert sum(map(sum, (routing["prose"][0], routing["code"][0]))) == ev["val_tokens"] * 2
    assert list((trained_run / "tb").glob("events.out.tfevents.*"))
    config = json.loads((trained_run / "config.json").read_text())
    assert config["format"] == "smoe-run" and config["model"]["vocab_size"] == 257


def test_generate_command(trained_run, capsys):
    args = ["generate", str(trained_run), "--prompt", "The letter ", "--max-new-tokens", "24",
            "--seed", "1"]
    assert cli_main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("The letter ") and len(first.rstrip("\n")) > len("The letter ")
    assert cli_main(args) == 0
    assert capsys.readouterr().out == first             # same seed, same text


def test_eval_command(trained_run, capsys):
    assert cli_main(["eval", str(trained_run), "--by-domain"]) == 0
    out = capsys.readouterr().out
    assert "step 12: validation loss" in out and "bits/byte" in out
    assert "max/mean" in out and "prose" in out and "code" in out
    table = [ln for ln in out.splitlines() if ln.lstrip().startswith(("0 ", "3 "))]
    assert len(table) >= 2 and all(ln.count("%") == 8 for ln in table)
    final = [r for r in read_metrics(trained_run) if "val_loss" in r][-1]
    loss = float(out.split("validation loss ")[1].split()[0])
    assert loss == pytest.approx(final["val_loss"], abs=1e-4)   # the same batches


# -- --init-from: a new run from another run's (or an import's) model ----------------------
INIT_ARGS = ["--steps", "10", "--batch-size", "4", "--seq-len", "32", "--eval-every", "0",
             "--eval-batches", "2", "--lr", "0.003", "--warmup-steps", "2", "--no-progress"]


def test_init_from_starts_a_new_run_at_the_source_model(trained_run, corpus_dir, tmp_path,
                                                        capsys):
    """The new run's step-0 evaluation is the source model's (the same weights, the same
    validation batches; equal within float32 kernel differences); then it trains from step 0 with a fresh optimizer and schedule."""
    from smoe.train import eval_run

    out = tmp_path / "new"
    rc = cli_main(["train", "--out", str(out), "--init-from", str(trained_run), "--data",
                   str(corpus_dir), *INIT_ARGS])
    assert rc == 0, capsys.readouterr().err
    assert "initialized from" in capsys.readouterr().out
    rows = read_metrics(out)
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 10]
    source_final = [r for r in read_metrics(trained_run) if "val_loss" in r][-1]
    assert source_final["step"] == 12
    # The same weights and validation batches, but the source's figure was computed in the
    # training process and this one after a reload: the float32 kernels may differ (oneDNN and
    # MKL pick per CPU and per memory layout), which moves a 32k-token mean by ~1e-9 relative.
    # 1e-6 relative is far below what one training step changes (~1e-2).
    same = dict(rel=1e-6)
    assert evals[0]["val_loss"] == pytest.approx(source_final["val_loss"], **same)
    assert evals[0]["val_loss"] == pytest.approx(eval_run(trained_run)["val_loss"], **same)
    for domain, loss in source_final["val_loss_by_domain"].items():
        assert evals[0]["val_loss_by_domain"][domain] == pytest.approx(loss, **same)
    assert set(evals[0]["val_loss_by_domain"]) == set(source_final["val_loss_by_domain"])
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 11))
    assert all(math.isfinite(r["loss"]) for r in train)
    assert train[0]["lr"] == pytest.approx(0.0015)                      # the warmup, anew
    assert evals[1]["val_loss"] < evals[0]["val_loss"]                  # it trains
    state = ckpt.read_state(out / "checkpoint")
    assert state["step"] == 10 and state["batcher"]["step"] == 10
    assert float(ckpt.load_optimizer_state(out / "checkpoint")["embed.weight/step"]) == 10.0
    config = json.loads((out / "config.json").read_text())
    source = json.loads((trained_run / "config.json").read_text())
    assert config["model"] == source["model"] and config["preset"] == "tiny-moe"
    assert config["init_from"] == {"path": str(trained_run.resolve()), "step": 12}
    assert (out / "tokenizer.json").read_text() == (trained_run / "tokenizer.json").read_text()
    # and it resumes like any run
    assert cli_main(["train", "--out", str(out), "--resume", "--steps", "11",
                     "--no-progress"]) == 0
    assert ckpt.read_state(out / "checkpoint")["step"] == 11
    assert [r["step"] for r in read_metrics(out) if "val_loss" in r] == [0, 10, 11]


def _small_vocab_run(path: Path, vocab: int = 64) -> Path:
    """A run folder (config.json + checkpoint/) of a model with ``vocab`` ids, no tokenizer."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, max_seq_len=64,
                      moe=MoEConfig(hidden_size=32, expert_size=32, num_experts=4, top_k=2))
    model = SMoETransformer(cfg)
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"format": "smoe-run", "version": 1,
                                                  "model": cfg.to_dict()}))
    ckpt.save_checkpoint(path, model.state_dict(), {}, {"step": 0,
                                                       "model_config": cfg.to_dict()})
    return path


def test_init_from_refusals(trained_run, corpus_dir, tmp_path, capsys):
    out = tmp_path / "new"
    base = ["train", "--out", str(out), "--data", str(corpus_dir), *INIT_ARGS]

    def refused(*args) -> str:
        rc, err = _cli([*base, *args], capsys)
        assert rc == 2 and not out.exists(), err
        return err

    assert "does not exist" in refused("--init-from", str(tmp_path / "nowhere"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hello")
    assert "is not an smoe run" in refused("--init-from", str(other))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((trained_run / "config.json").read_text())
    assert "has no checkpoint" in refused("--init-from", str(bare))
    for flag, value in (("--preset", "tiny-moe"), ("--router", "switch")):
        err = refused("--init-from", str(trained_run), flag, value)
        assert "conflicts with --init-from" in err and f"{flag[2:]}={value!r}" in err
    err = refused("--init-from", str(trained_run), "--tokenizer", "bpe")
    assert "differs from the byte tokenizer" in err
    assert "--resume" in refused("--init-from", str(trained_run), "--resume")
    small = _small_vocab_run(tmp_path / "small")
    assert "has no tokenizer.json: pass --tokenizer byte" in refused("--init-from", str(small))
    err = refused("--init-from", str(small), "--tokenizer", "byte")
    assert "257 ids, more than the vocab_size=64" in err
    err = refused("--init-from", str(small), "--tokenizer", "bpe")
    assert "has no tokenizer.json" in err
    ByteTokenizer().save(small)
    assert "257 ids, more than the vocab_size=64" in refused("--init-from", str(small))
    # a source that is the output folder itself
    rc, err = _cli(["train", "--out", str(trained_run), "--init-from", str(trained_run),
                    *INIT_ARGS], capsys)
    assert rc == 2 and "is the output folder" in err


def test_init_from_an_imported_hf_mixtral(corpus_dir, tmp_path, monkeypatch, capsys):
    """transformers Mixtral -> smoe import -> --init-from: the first step's loss is the HF
    model's cross-entropy on that batch, the step-0 evaluation its loss on the validation
    batches, and the run trains."""
    import torch.nn.functional as F

    from smoe.data import val_batches
    from smoe.hf.convert import import_hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.MixtralConfig(
        vocab_size=257, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, intermediate_size=24,
        num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    torch.manual_seed(3)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    imported = import_hf(tmp_path / "hf", tmp_path / "imported")
    assert imported.tokenizer is None                                    # no tokenizer.json

    out = tmp_path / "new"
    rc = cli_main(["train", "--out", str(out), "--init-from", str(tmp_path / "imported"),
                   "--tokenizer", "byte", "--data", str(corpus_dir), "--steps", "3",
                   "--batch-size", "4", "--seq-len", "32", "--eval-every", "0",
                   "--eval-batches", "2", "--lr", "0.003", "--warmup-steps", "1", "--seed", "5",
                   "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    rows = read_metrics(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert [r["step"] for r in evals] == [0, 3]

    data = prepare_data(DataConfig(paths=(str(corpus_dir),)))
    x_BT, y_BT, _ = Batcher(data.train, 4, 32, seed=5).batch_at(0)
    with torch.no_grad():
        logits = hf(x_BT.long()).logits
        ce = F.cross_entropy(logits.reshape(-1, 257).float(), y_BT.reshape(-1).long())
        total, n = 0.0, 0
        for batch in val_batches(data.val, 4, 32, max_batches=2):
            out_logits = hf(batch[0].long()).logits.reshape(-1, 257).float()
            total += float(F.cross_entropy(out_logits, batch[1].reshape(-1).long(),
                                           reduction="sum"))
            n += batch[1].numel()
    assert losses[0] == pytest.approx(float(ce), abs=1e-4)
    assert evals[0]["val_loss"] == pytest.approx(total / n, abs=1e-4)
    assert evals[1]["val_loss"] < evals[0]["val_loss"]
    config = json.loads((out / "config.json").read_text())
    assert config["init_from"]["imported_from"]["model_type"] == "mixtral"
    assert json.loads((out / "tokenizer.json").read_text())["vocab_size"] == 257
