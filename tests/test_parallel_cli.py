"""The torchrun commands: ``torchrun --nproc_per_node 4 -m smoe train ... --expert-parallel 2``
(DP 2 x EP 2) against one process, a resume at another layout, and ``smoe generate
--expert-parallel 2``. Real processes on 127.0.0.1 (gloo), timeouts, killed by PID.

Tolerance: 1e-5 on the logged float32 losses (same math, reduction order differs across
ranks; measured differences are ~1e-6).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
TORCHRUN = Path(sys.executable).with_name("torchrun")
TOL = 1e-5
ARGS = ["--preset", "tiny-moe", "--steps", "4", "--batch-size", "8", "--seq-len", "32",
        "--eval-every", "0", "--eval-batches", "2", "--checkpoint-every", "2", "--log-every", "1",
        "--no-progress"]

pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # torchrun and the workers it started
        out, err = p.communicate()
        raise AssertionError(f"timed out: {' '.join(cmd)}\n{err[-3000:]}")
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}:\n{err[-3000:]}"
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    return _run([str(TORCHRUN), "--nproc_per_node", str(nproc), "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", f"127.0.0.1:{_port()}", "-m", "smoe", *args])


def _losses(run: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    import textwrap

    path.write_text(Path(textwrap.__file__).read_text() * 3)
    return path


@pytest.mark.timeout(900)
def test_torchrun_train_dp2_ep2_equals_one_process_resumes_at_another_layout(tmp_path, data):
    single, ep = tmp_path / "single", tmp_path / "ep"
    _run([sys.executable, "-m", "smoe", "train", "--out", str(single), "--data", str(data),
          *ARGS])
    res = _torchrun(4, "train", "--out", str(ep), "--data", str(data), *ARGS,
                    "--expert-parallel", "2")
    assert res.stdout.count("trained to step 4") == 1  # rank 0 alone prints
    a, b = _losses(single), _losses(ep)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        for key in ("loss", "aux_loss", "z_loss", "grad_norm"):
            assert abs(a[step][key] - b[step][key]) < TOL * max(1, abs(a[step][key])), \
                (step, key, a[step][key], b[step][key])
        assert a[step]["expert_load"] == b[step]["expert_load"]
    # The EP run's step-2 checkpoint resumes with one process (EP 2 -> EP 1): same losses.
    resumed = tmp_path / "resumed"
    shutil.copytree(ep, resumed)
    shutil.rmtree(resumed / "checkpoint")
    (resumed / "previous-checkpoints" / "step-000002").rename(resumed / "checkpoint")
    _run([sys.executable, "-m", "smoe", "train", "--out", str(resumed), "--resume",
          "--no-progress"])
    c = _losses(resumed)
    for step in (3, 4):
        assert abs(a[step]["loss"] - c[step]["loss"]) < TOL, (step, a[step], c[step])
    # Generation: the same tokens under torchrun with EP 2 as in one process.
    gen = ["generate", str(single), "--prompt", "def wrap(", "--max-new-tokens", "16",
           "--temperature", "0.8", "--seed", "1", "--no-stream"]
    one = _run([sys.executable, "-m", "smoe", *gen]).stdout
    four = _torchrun(4, *gen, "--expert-parallel", "2").stdout
    assert one == four and one.startswith("def wrap(")
