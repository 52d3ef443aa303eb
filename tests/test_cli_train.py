"""`smoe train` never loses work: SIGINT/SIGTERM checkpoint and exit, the last N checkpoints are
kept, a resume with a new --steps continues the learning rate without a jump, a failed start is
retried with --overwrite; and the model/training settings reach the library (config files,
--set, explicit flags, log lines without a progress bar)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from smoe.checkpoint import checkpoint_dir, read_state
from smoe.cli import main as cli_main
from smoe.train import TrainConfig, lr_at
from smoe.train.metrics import read_metrics
from smoe.train.optim import rescheduled

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the a house letter morning walk garden sister father friend evening visit young kind "
         "quiet long happy little great always never often said thought felt knew").split()
SMALL = ["--batch-size", "2", "--seq-len", "16", "--eval-every", "0", "--eval-batches", "1",
         "--warmup-steps", "1", "--no-progress", "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(1)
    text = "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(60))
    (root / "prose.txt").write_text(text + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", SMOE_CACHE_DIR=str(tmp_path_factory.mktemp("cache")),
             PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO / "src"))
    return e


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, env):
    monkeypatch.setenv("SMOE_CACHE_DIR", env["SMOE_CACHE_DIR"])
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _lrs(run: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_metrics(run) if "loss" in r}


# -- the schedule rule ------------------------------------------------------------------------
def test_a_new_steps_stretches_the_rest_of_the_cosine_without_a_jump():
    old = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    for new_steps in (160, 60, 41):                    # longer, shorter, one more update
        new = rescheduled(old, 40, new_steps)
        # the same arithmetic on the same numbers at the resume step: exactly equal
        assert lr_at(40, new) == lr_at(40, old)
        after = [lr_at(i, new) for i in range(40, new_steps + 1)]
        assert all(a >= b for a, b in zip(after, after[1:]))   # still decaying, never rising
        assert after[-1] == pytest.approx(1e-4, rel=1e-12)      # min_lr at the new end
    stretched = rescheduled(old, 40, 160)
    # the largest step between consecutive rates is no larger than the original's
    worst = max(abs(lr_at(i + 1, stretched) - lr_at(i, stretched)) for i in range(40, 160))
    assert worst <= max(abs(lr_at(i + 1, old) - lr_at(i, old)) for i in range(10, 100))
    # resumed twice: the second anchor continues from the first
    twice = rescheduled(stretched, 100, 120)
    assert lr_at(100, twice) == lr_at(100, stretched) and lr_at(120, twice) == pytest.approx(1e-4)
    # in warm-up nothing needs an anchor; before the checkpoint is refused
    assert rescheduled(old, 5, 200) == old.replace(steps=200)
    with pytest.raises(ValueError, match="before the run's checkpoint at step 40"):
        rescheduled(old, 40, 30)


# -- signals ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint_and_resume_continues(corpus, env, tmp_path, capsys, sig,
                                                          code):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--data", str(corpus), "--steps", "400",
            "--checkpoint-every", "1000", "--seed", "5", *SMALL]
    # `python -m smoe` would re-execute itself with tcmalloc first: this is the same main()
    main = "import sys; from smoe.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", main, *args], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if len(read_metrics(out)) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before the signal: {proc.stderr.read()}"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"smoe train: {sig.name}: stopped at step") and "--resume" in last
    step = int(last.split("stopped at step ")[1].split(",")[0])
    assert 3 <= step < 400
    # nothing lost: the checkpoint holds the last logged step (checkpoint_every was 1000)
    assert read_state(checkpoint_dir(out))["step"] == step == max(_lrs(out))
    before = _lrs(out)

    # resumed with a shorter run: the rest of the cosine is compressed, no jump
    new_steps = step + 4
    assert cli_main(["train", "--out", str(out), "--resume", "--steps", str(new_steps),
                     "--no-progress"]) == 0
    lrs = _lrs(out)
    assert sorted(lrs) == list(range(1, new_steps + 1))
    assert all(lrs[s] == before[s] for s in before)
    old = TrainConfig(steps=400, batch_size=2, seq_len=16, warmup_steps=1)
    assert lrs[step + 1] == pytest.approx(lr_at(step, old), rel=1e-12)     # continuous
    assert all(lrs[s] >= lrs[s + 1] for s in range(step, new_steps))
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["steps"] == new_steps
    assert config["train"]["resume_anchor"][0] == step


def test_the_last_n_checkpoints_are_kept(corpus, tmp_path):
    out = tmp_path / "run"
    assert cli_main(["train", "--out", str(out), "--data", str(corpus), "--steps", "5",
                     "--checkpoint-every", "1", "--keep-checkpoints", "3", *SMALL]) == 0
    assert read_state(out / "checkpoint")["step"] == 5
    kept = sorted(p.name for p in (out / "previous-checkpoints").iterdir())
    assert kept == ["step-000003", "step-000004"]
    assert [read_state(out / "previous-checkpoints" / k)["step"] for k in kept] == [3, 4]


def test_a_failed_start_is_retried_with_overwrite(corpus, tmp_path, capsys, monkeypatch):
    import smoe.train.loop as loop

    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--data", str(corpus), "--steps", "2", *SMALL]

    def out_of_memory(self, batch):
        raise MemoryError

    monkeypatch.setattr(loop.Trainer, "train_step", out_of_memory)
    capsys.readouterr()
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("smoe train: error: out of memory: try a smaller --batch-size (or "
                       "--grad-accum), a smaller model or --seq-len, or --dtype bfloat16")
    assert checkpoint_dir(out) is None and (out / "config.json").is_file()
    monkeypatch.undo()
    assert cli_main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main([*args, "--overwrite"]) == 0
    assert read_state(checkpoint_dir(out))["step"] == 2


# -- settings reach the library -------------------------------------------------------------------
def test_config_file_set_and_flags_in_that_order(corpus, tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text('[model]\npreset = "tiny-moe"\nnum_layers = 2\n\n'
                   '[moe]\nnum_experts = 4\ntop_k = 1\nrouter = "sigmoid_bias"\n\n'
                   '[train]\nsteps = 2\nlr = 0.002\n\n[data]\nval_fraction = 0.1\n')
    out = tmp_path / "run"
    assert cli_main(["train", "--out", str(out), "--data", str(corpus), *SMALL, "--config",
                     str(cfg), "--set", "moe.top_k=2", "--set", "moe.z_loss_coef=0",
                     "--set", "train.lr=1e-3", "--aux-loss-coef", "0.05"]) == 0
    config = json.loads((out / "config.json").read_text())
    moe = config["model"]["moe"]
    assert config["model"]["num_layers"] == 2
    assert (moe["num_experts"], moe["top_k"], moe["router"]) == (4, 2, "sigmoid_bias")
    assert (moe["aux_loss_coef"], moe["z_loss_coef"]) == (0.05, 0)
    assert config["train"]["lr"] == 1e-3 and config["train"]["min_lr"] == pytest.approx(1e-4)
    assert config["data"]["val_fraction"] == 0.1
    out2 = tmp_path / "run2"
    cfg2 = tmp_path / "run.json"
    cfg2.write_text(json.dumps({"moe": {"num_experts": 6}, "train": {"steps": 1}}))
    assert cli_main(["train", "--out", str(out2), "--data", str(corpus), *SMALL, "--config",
                     str(cfg2), "--top-k", "3"]) == 0
    moe = json.loads((out2 / "config.json").read_text())["model"]["moe"]
    assert (moe["num_experts"], moe["top_k"]) == (6, 3)


def test_no_progress_prints_a_line_per_log_every(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    capsys.readouterr()
    assert cli_main(["train", "--out", str(out), "--data", str(corpus), "--steps", "4",
                     "--log-every", "2", *SMALL]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines()
             if line.startswith("step ") and " loss " in line and "/4" in line]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"]
    assert all("lr " in line and "tok/s" in line for line in lines)


def test_help_lists_presets_routers_and_defaults(capsys):
    from smoe.cli.train import TRAIN_DEFAULTS
    from smoe.config import PRESETS, ROUTERS

    defaults = TrainConfig()
    assert {k: getattr(defaults, k) for k in TRAIN_DEFAULTS} == TRAIN_DEFAULTS
    assert cli_main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in PRESETS) and all(r in text for r in ROUTERS)
    assert "(default 200)" in text and "(default 0.003)" in text and "stretched" in text


def test_the_parser_imports_no_torch():
    code = ("import smoe.cli, sys; smoe.cli.build_parser(); "
            "assert 'torch' not in sys.modules, 'torch imported'; import smoe; smoe.__version__; "
            "assert 'torch' not in sys.modules")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
