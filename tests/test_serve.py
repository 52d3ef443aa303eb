"""`smoe serve` as a real server on 127.0.0.1 (a subprocess, killed by PID), driven by the
official ``openai`` client and raw HTTP: completions equal to in-process greedy generation,
streaming equal to the non-streamed text, chat with and without a chat template, the error
statuses and bodies, the API key, the bounded queue (429 + Retry-After), disconnects freeing
slots, /metrics through prometheus_client's parser, and a graceful drain on SIGTERM.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
WORDS = "the a letter house river stone light garden window morning friend quiet road".split()
PROMPT = "The letter "


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               SMOE_CACHE_DIR=str(tmp / "cache"), PYTHONUNBUFFERED="1")
    return env


class Server:
    """``smoe serve`` in a subprocess; ``stop()`` kills it by PID."""

    def __init__(self, model: Path, tmp: Path, *args: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smoe", "serve", str(model), "--port", str(self.port),
             "--threads", "1", *args], env=_env(tmp), cwd=REPO, stdout=self.log,
            stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180.0) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {Path(self.log.name).read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"server not ready: {Path(self.log.name).read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.log.close()

    def client(self, **kw) -> openai.OpenAI:
        kw.setdefault("api_key", "none")
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=120, **kw)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A 2-step tiny-moe run trained by the real command, and its HF export with a chat
    template added to the tokenizer config."""
    from smoe.cli import main as cli_main

    root = tmp_path_factory.mktemp("serve")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    text = "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(200))
    (corpus / "prose.txt").write_text(text + "\n")
    os.environ.setdefault("SMOE_CACHE_DIR", str(root / "cache"))
    run = root / "tiny"
    assert cli_main(["train", "--out", str(run), "--data", str(corpus), "--preset", "tiny-moe",
                     "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-every",
                     "0", "--checkpoint-every", "2", "--no-progress"]) == 0
    from smoe.hf import export_hf

    hf = root / "tiny-hf"
    export_hf(run, hf)
    cfg_path = hf / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n"
                            "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    cfg_path.write_text(json.dumps(cfg))
    return root, run, hf


@pytest.fixture(scope="module")
def servers(folders):
    root, run, hf = folders
    a = Server(run, root, "--max-batch", "4", "--max-queue", "2", "--max-tokens", "64",
               "--max-prompt-tokens", "100")
    b = Server(hf, root, "--api-key", "sekret", "--served-model-name", "chatty")
    try:
        yield a.wait_ready(), b.wait_ready()
    finally:
        a.stop()
        b.stop()


def _greedy(run: Path, prompt: str, n: int) -> str:
    import torch

    from smoe.inference import generate
    from smoe.train.run import load_run

    loaded = load_run(run)
    ids = loaded.tokenizer.encode(prompt)
    with torch.no_grad():
        out = generate(loaded.model, ids, n, eos_id=loaded.tokenizer.eos_id)[len(ids):].tolist()
    if loaded.tokenizer.eos_id in out:
        out = out[:out.index(loaded.tokenizer.eos_id)]
    return loaded.tokenizer.decode(out)


def test_completions_stream_and_usage(servers, folders):
    a, _ = servers
    client = a.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    expected = _greedy(folders[1], PROMPT, 12)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.choices[0].text == expected
    assert r.usage.prompt_tokens == len(PROMPT.encode()) and r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # Seeded sampling repeats; a stop string cuts the text before it.
    s1, s2 = (client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10,
                                        temperature=1.0, seed=7).choices[0].text
              for _ in range(2))
    assert s1 == s2
    if len(expected.strip()) > 2:
        stop = expected.strip()[1:3]
        cut = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12,
                                        temperature=0, stop=[stop]).choices[0]
        assert cut.text == expected[:expected.index(stop)] and cut.finish_reason == "stop"


def test_chat_with_and_without_a_template(servers):
    a, b = servers
    with pytest.raises(openai.BadRequestError) as e:
        a.client().chat.completions.create(model="tiny",
                                           messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 400 and "chat template" in str(e.value)
    with pytest.raises(openai.AuthenticationError):
        b.client().chat.completions.create(model="chatty",
                                           messages=[{"role": "user", "content": "hi"}])
    chat = b.client(api_key="sekret")
    r = chat.chat.completions.create(model="chatty", max_tokens=8, temperature=0,
                                     messages=[{"role": "user", "content": "hello"}])
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens >= 1
    prompt_len = len("<user>hello\n<assistant>".encode())
    assert r.usage.prompt_tokens == prompt_len
    stream = chat.chat.completions.create(model="chatty", max_tokens=8, temperature=0,
                                          stream=True,
                                          messages=[{"role": "user", "content": "hello"}])
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == r.choices[0].message.content


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "x", "n": 2}, 400, "n"),
    ({"prompt": "x", "max_tokens": 65}, 400, "max_tokens"),
    ({"prompt": "x" * 101}, 400, "prompt"),
    ({"prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ({"prompt": "x", "model": "other"}, 404, "model"),
    ({"prompt": "x", "max_tokens": "many"}, 422, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, 422, "temperature"),
    ({"max_tokens": 3}, 422, "prompt"),
])
def test_errors_have_openai_bodies(servers, body, status, param):
    a, _ = servers
    r = httpx.post(a.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


def test_malformed_json_and_client_errors(servers):
    a, _ = servers
    r = httpx.post(a.url + "/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    with pytest.raises(openai.BadRequestError) as e:
        a.client().completions.create(model="tiny", prompt="x", max_tokens=1000)
    assert "max_tokens" in str(e.value)


def test_prompt_plus_max_tokens_beyond_the_context_is_400(servers, folders):
    _, b = servers
    context = json.loads((folders[1] / "config.json").read_text())["model"]["max_seq_len"]
    r = httpx.post(b.url + "/v1/completions", headers={"authorization": "Bearer sekret"},
                   json={"prompt": "x" * (context - 8), "max_tokens": 16}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "max_tokens" and err["code"] == "context_length_exceeded"
    assert str(context) in err["message"]


def test_api_key_401_with_an_openai_body(servers):
    _, b = servers
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "sekret"}):
        for method, path, body in (("GET", "/v1/models", None),
                                   ("POST", "/v1/completions", {"prompt": "x"})):
            r = httpx.request(method, b.url + path, json=body, headers=headers, timeout=60)
            assert r.status_code == 401, (headers, path, r.text)
            err = r.json()["error"]
            assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
            assert "Bearer" in err["message"]
    # Health and metrics stay open to the load balancer and the scraper; the key opens /v1.
    assert httpx.get(b.url + "/health", timeout=60).status_code == 200
    assert httpx.get(b.url + "/metrics", timeout=60).status_code == 200
    r = httpx.get(b.url + "/v1/models", headers={"authorization": "Bearer sekret"}, timeout=60)
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "chatty"


def _open_stream(url: str, opened: list, errors: list,
                 barrier: threading.Barrier | None = None) -> None:
    try:
        client = httpx.Client(timeout=120)
        request = client.build_request("POST", url + "/v1/completions",
                                       json={"prompt": PROMPT, "max_tokens": 64, "stream": True})
        if barrier is not None:
            barrier.wait(60)
        opened.append((client, client.send(request, stream=True)))
    except Exception as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)


def _health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=30).json()


def _wait_idle(url: str, limit_s: float = 60) -> dict:
    """/health once nothing runs or waits (what an earlier test started has drained)."""
    deadline = time.monotonic() + limit_s
    while (h := _health(url))["running"] or h["waiting"]:
        assert time.monotonic() < deadline, h
        time.sleep(0.1)
    return h


def test_queue_limit_429_and_disconnect_frees_slots(servers):
    """24 streams of 64 tokens released together by one barrier against max_batch 4 +
    max_queue 2: the first six to arrive are admitted whatever the timing (200), and the others
    arrive within milliseconds, while those six still have up to 64 engine steps each to run, so
    some must find the queue full (429 with Retry-After and an OpenAI-style body). Timing decides
    only how many get 429, not whether one does. Then every client leaves mid-stream and the
    server frees every slot and queue place."""
    a, _ = servers
    _wait_idle(a.url)
    opened, errors = [], []
    barrier = threading.Barrier(24)
    threads = [threading.Thread(target=_open_stream, args=(a.url, opened, errors, barrier))
               for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(opened) == 24
    statuses = [r.status_code for _, r in opened]
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 6, statuses
    full = [r for _, r in opened if r.status_code == 429]
    assert full, statuses
    r = full[0]
    r.read()
    assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
    for client, resp in opened:   # the clients leave mid-stream
        resp.close()
        client.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        h = _health(a.url)
        if h["running"] == 0 and h["waiting"] == 0:
            break
        time.sleep(0.2)
    assert h["running"] == 0 and h["waiting"] == 0, h
    ok = httpx.post(a.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_metrics_parse_with_prometheus_client(servers):
    from prometheus_client.parser import text_string_to_metric_families

    a, _ = servers
    a.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=4)
    _wait_idle(a.url)  # no forward half-way through the layers while the counts are read
    text = httpx.get(a.url + "/metrics", timeout=30).text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("smoe_requests", "smoe_time_to_first_token_seconds",
                 "smoe_inter_token_latency_seconds", "smoe_e2e_request_latency_seconds",
                 "smoe_queue_depth", "smoe_running_requests", "smoe_generation_tokens_per_second",
                 "smoe_expert_tokens", "smoe_expert_imbalance_ratio", "smoe_expert_balancedness",
                 "smoe_routing_entropy", "smoe_routing_drift", "smoe_routing_alerts"):
        assert name in fams, name
    ok = [s for s in fams["smoe_requests"].samples
          if s.labels.get("endpoint") == "/v1/completions" and s.labels.get("status") == "200"]
    assert ok and ok[0].value >= 1
    per_layer: dict[str, float] = {}
    for s in fams["smoe_expert_tokens"].samples:
        per_layer[s.labels["layer"]] = per_layer.get(s.labels["layer"], 0) + s.value
    assert len(per_layer) == 4 and len(set(per_layer.values())) == 1   # tiny-moe: 4 layers
    assert next(iter(per_layer.values())) > 0
    e2e = [s for s in fams["smoe_e2e_request_latency_seconds"].samples
           if s.name.endswith("_count")]
    assert e2e[0].value >= 1


def test_graceful_shutdown_drains_running_requests(folders):
    root, run, _ = folders
    server = Server(run, root, "--max-batch", "2").wait_ready()
    try:
        client = httpx.Client(timeout=120)
        resp = client.send(client.build_request(
            "POST", server.url + "/v1/completions",
            json={"prompt": PROMPT, "max_tokens": 24, "stream": True}), stream=True)
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        os.kill(server.proc.pid, signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]"
        chunks = [json.loads(x[5:]) for x in [first] + rest[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        # uvicorn re-raises the signal once it has shut down, so the status says SIGTERM.
        assert server.proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        server.stop()


def _timed(url: str, stream: bool, out: list) -> None:
    body = {"prompt": "x", "max_tokens": 126, "temperature": 0, "stream": stream}
    with httpx.Client(timeout=120) as client:
        r = client.post(url + "/v1/completions", json=body)
    out.append((r.status_code, r.text))


def test_request_timeout_504_and_slot_freed(folders):
    """Four requests of 126 tokens each behind one slot with a 0.25 s timeout: serving them all
    in time would take 504 tokens in 0.25 s (2,000 tokens/s on one thread, far beyond this
    model on any CPU), so the last ones time out whatever the machine's speed. A non-streamed
    request gets 504 with an OpenAI-style body; a streamed one (already answered 200) gets the
    error as its last event before ``data: [DONE]``; either way its slot or queue place is
    freed at once."""
    root, run, _ = folders
    server = Server(run, root, "--max-batch", "1", "--max-queue", "8", "--max-tokens", "126",
                    "--request-timeout", "0.25").wait_ready()
    try:
        for stream in (False, True):
            out: list = []
            threads = [threading.Thread(target=_timed, args=(server.url, stream, out))
                       for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert len(out) == 4
            timed_out = 0
            for status, text in out:
                if not stream:
                    assert status in (200, 504), text
                    if status == 504:
                        err = json.loads(text)["error"]
                        assert err["type"] == "timeout" and err["code"] == "timeout"
                        assert "0.25 s" in err["message"]
                        timed_out += 1
                    continue
                assert status == 200
                events = [x[5:].strip() for x in text.splitlines() if x.startswith("data:")]
                assert events[-1] == "[DONE]"
                last = json.loads(events[-2])
                if "error" in last:
                    assert last["error"]["code"] == "timeout"
                    timed_out += 1
                else:
                    assert last["choices"][0]["finish_reason"] in ("length", "stop")
            assert timed_out >= 1, out
            deadline = time.monotonic() + 30
            while (h := _health(server.url))["running"] or h["waiting"]:
                assert time.monotonic() < deadline, h
                time.sleep(0.05)
        metrics = httpx.get(server.url + "/metrics", timeout=30).text
        assert 'smoe_requests_total{endpoint="/v1/completions",status="504"}' in metrics
    finally:
        server.stop()
