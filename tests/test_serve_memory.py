"""`smoe serve` with the memory transforms, as real servers on 127.0.0.1 (subprocesses killed by
PID): experts offloaded behind a half-size cache (``--offload 0.5``, predict and lru) and a run
quantized by ``smoe quantize`` (int4 experts and attention, alone and offloaded). Each server's greedy
completions equal in-process greedy generation of the same model: the resident float model for
the offloaded float run, the loaded quantized model for the quantized run. The engine batches
requests, so the expected texts are compared on two prompts sent together too.
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import pytest

pytest.importorskip("httpx")
pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

pytestmark = pytest.mark.slow

from test_serve import PROMPT, Server, _greedy, folders  # noqa: E402,F401 - the run fixture

PROMPTS = (PROMPT, "the quiet river ")


@pytest.fixture(scope="module")
def quantized(folders):
    from smoe.cli import main as cli_main

    root, run, _ = folders
    out = root / "tiny-q4"
    assert cli_main(["quantize", str(run), "--experts", "int4", "--group-size", "32",
                     "--attention", "int4", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def servers(folders, quantized):
    root, run, _ = folders
    started = {
        "offload-predict": Server(run, root, "--offload", "0.5", "--offload-policy", "predict",
                                  "--offload-store", str(root / "store-predict.safetensors")),
        "q4": Server(quantized, root),
        "q4-offload-lru": Server(quantized, root, "--offload", "0.5", "--offload-policy", "lru"),
    }
    try:
        yield {name: s.wait_ready() for name, s in started.items()}
    finally:
        for s in started.values():
            s.stop()


def _completions(server: Server, model: str, n: int) -> list[str]:
    """The greedy completion of each prompt, the prompts sent at once (co-batched)."""
    client = server.client()

    def one(prompt: str) -> str:
        return client.completions.create(model=model, prompt=prompt, max_tokens=n,
                                         temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(one, PROMPTS))


def test_offloaded_server_completes_like_the_resident_model(servers, folders):
    _, run, _ = folders
    want = [_greedy(run, p, 12) for p in PROMPTS]
    assert all(w for w in want)   # the model says something: the comparison has content
    assert _completions(servers["offload-predict"], "tiny", 12) == want
    log = Path(servers["offload-predict"].log.name).read_text()
    import re

    kept, total = map(int, re.search(r"experts offloaded \(predict, (\d+) of (\d+)",
                                     log).groups())
    assert 0 < kept < total   # a real split: some experts are read from the store


def test_quantized_run_is_served_as_it_generates_in_process(servers, quantized):
    want = [_greedy(quantized, p, 12) for p in PROMPTS]
    assert _completions(servers["q4"], "tiny-q4", 12) == want
    assert _completions(servers["q4-offload-lru"], "tiny-q4", 12) == want


def test_bad_offload_fraction_is_refused_before_loading(folders, tmp_path):
    import subprocess
    import sys

    from test_serve import REPO, _env

    _, run, _ = folders
    r = subprocess.run([sys.executable, "-m", "smoe", "serve", str(run), "--offload", "1.5"],
                       env=_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "--offload 1.5 must be a fraction in (0, 1]" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
