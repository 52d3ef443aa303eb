"""A bounded load test of ``smoe serve`` on 127.0.0.1, with the same clients against
``transformers serve --continuous-batching`` when it is installed (``--peer``).

1. Throughput and latency: for each concurrency c (default 1, 4, 16, 64), c streaming clients
   send greedy requests back to back for ``--duration`` seconds; tokens/s, p50/p99 of time to
   first token and of end-to-end latency. smoe runs twice: continuous batching
   (``--max-batch 64``) and one request at a time (``--max-batch 1``, the rest queue).
2. Bursts past the queue limit: ``max_batch + max_queue + 32`` requests at once against a
   server with a small queue; counts of 200, 429, 503 and any other status (there must be no
   5xx other than 429/503).
3. Integrity: every client checks its stream is its own: one response id across its chunks,
   ``data: [DONE]`` at the end, and the text equal to what the same prompt gave before (greedy:
   the same prompt gives the same text whoever shares the batch). Mismatches are counted.

    python benchmarks/serve_load.py --model runs/demo --write
    python benchmarks/serve_load.py --model HF_FOLDER --peer --write   # side by side

Without ``--model`` a tiny-moe run is trained for 2 steps on generated text (a served model
whose speed, not quality, is measured).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [f"Request {i}: the river and the stone {'house ' * (i % 5)}" for i in range(16)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, cmd: list[str], port: int, log: Path, env: dict[str, str]) -> None:
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     cwd=ROOT)

    def wait_ready(self, timeout: float = 600) -> Proc:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("server not ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.log.close()


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    # keep a PYTHONPATH the caller set (e.g. where the peer's `accelerate` is installed)
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    env.update(PYTHONPATH=path, OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def smoe_server(model: Path, tmp: Path, threads: int, *args: str) -> Proc:
    port = _free_port()
    return Proc([sys.executable, "-m", "smoe", "serve", str(model), "--port", str(port),
                 "--threads", str(threads), *args], port, tmp / f"smoe-{port}.log",
                _env(threads))


def peer_server(model: Path, tmp: Path, threads: int) -> Proc:
    port = _free_port()
    exe = Path(sys.executable).with_name("transformers")
    return Proc([str(exe), "serve", str(model), "--continuous-batching", "--port", str(port),
                 "--host", "127.0.0.1"], port, tmp / f"peer-{port}.log", _env(threads))


async def _one(client, url: str, model: str | None, prompt: str, max_tokens: int,
               seen: dict[str, str], stats: dict) -> None:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    if model:
        body["model"] = model
    t0 = time.monotonic()
    ttft, ids, text, done = None, set(), [], False
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        stats["status"][resp.status_code] = stats["status"].get(resp.status_code, 0) + 1
        if resp.status_code != 200:
            await resp.aread()
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            ids.add(chunk.get("id"))
            for c in chunk.get("choices") or []:
                if c.get("text"):
                    if ttft is None:
                        ttft = time.monotonic() - t0
                    text.append(c["text"])
    e2e = time.monotonic() - t0
    full = "".join(text)
    if not done or len(ids) != 1 or (prompt in seen and seen[prompt] != full):
        stats["mixed"] += 1
    seen.setdefault(prompt, full)
    stats["ttft"].append(ttft if ttft is not None else e2e)
    stats["e2e"].append(e2e)
    stats["chars"] += len(full)
    stats["requests"] += 1


async def _load(url: str, model: str | None, concurrency: int, duration: float,
                max_tokens: int) -> dict:
    import httpx

    stats = {"status": {}, "mixed": 0, "ttft": [], "e2e": [], "chars": 0, "requests": 0,
             "tokens": 0}
    seen: dict[str, str] = {}
    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        # Warm up every prompt once (fills `seen` with the reference text).
        await asyncio.gather(*[_one(client, url, model, p, max_tokens, seen, stats)
                               for p in PROMPTS[:4]])
        stats.update(status={}, ttft=[], e2e=[], chars=0, requests=0, mixed=0)
        end = time.monotonic() + duration

        async def worker(i: int) -> None:
            k = i
            while time.monotonic() < end:
                await _one(client, url, model, PROMPTS[k % len(PROMPTS)], max_tokens, seen,
                           stats)
                k += concurrency

        t0 = time.monotonic()
        await asyncio.gather(*[worker(i) for i in range(concurrency)])
        stats["wall"] = time.monotonic() - t0
    stats["tokens"] = stats["chars"]
    return stats


async def _burst(url: str, n: int) -> dict[int, int]:
    import httpx

    async with httpx.AsyncClient(timeout=600,
                                 limits=httpx.Limits(max_connections=n + 8)) as client:
        async def one(i: int) -> int:
            r = await client.post(url + "/v1/completions",
                                  json={"prompt": PROMPTS[i % 16], "max_tokens": 8})
            return r.status_code
        codes = await asyncio.gather(*[one(i) for i in range(n)])
    out: dict[int, int] = {}
    for c in codes:
        out[c] = out.get(c, 0) + 1
    return out


def _pct(v: list[float], q: float) -> float:
    if not v:
        return float("nan")
    v = sorted(v)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


def _row(name: str, c: int, s: dict) -> str:
    tps = s["tokens"] / s["wall"] if s["wall"] else 0.0
    bad = sum(n for code, n in s["status"].items() if code >= 500 and code not in (503,))
    return (f"| {name} | {c} | {s['requests']} | {tps:.1f} | {1e3 * _pct(s['ttft'], 50):.0f} | "
            f"{1e3 * _pct(s['ttft'], 99):.0f} | {1e3 * _pct(s['e2e'], 50):.0f} | "
            f"{1e3 * _pct(s['e2e'], 99):.0f} | {s['status'].get(429, 0)} | {bad} | "
            f"{s['mixed']} |")


def _tiny_run(tmp: Path) -> Path:
    corpus = tmp / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    words = "the a letter house river stone light garden window morning friend road".split()
    (corpus / "prose.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(40))
                                                  for _ in range(200)))
    run = tmp / "tiny-moe"
    subprocess.run([sys.executable, "-m", "smoe", "train", "--out", str(run), "--data",
                    str(corpus), "--preset", "tiny-moe", "--steps", "2", "--batch-size", "2",
                    "--seq-len", "32", "--eval-every", "0", "--checkpoint-every", "2",
                    "--no-progress"], check=True, env=_env(2), cwd=ROOT,
                   capture_output=True)
    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="run or HF folder (default: a tiny-moe run)")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per concurrency")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="server's torch threads")
    ap.add_argument("--peer", action="store_true",
                    help="also run transformers serve --continuous-batching (an HF --model)")
    ap.add_argument("--write", action="store_true", help="write the BENCHMARKS.md section")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    conc = [int(c) for c in a.concurrency.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="smoe-serve-load-"))
    model = Path(a.model) if a.model else _tiny_run(tmp)
    lines = ["## Serving under load (`benchmarks/serve_load.py`)", "",
             f"`python benchmarks/serve_load.py --duration {a.duration:g} --max-tokens "
             f"{a.max_tokens} --concurrency {a.concurrency}"
             + (" --peer" if a.peer else "") + f"` on {platform.machine()}, server with "
             f"{a.threads} torch threads, model `{model.name}`, greedy streaming requests of "
             f"{a.max_tokens} tokens on 127.0.0.1 (clients in another process on the same "
             "cores). tokens/s counts generated text the clients received in characters, which "
             "is tokens for the byte-level tokenizer of the runs here (the same count for every "
             "server); latencies in ms.", "",
             "| server | clients | requests | tokens/s | TTFT p50 | TTFT p99 | E2E p50 | "
             "E2E p99 | 429 | other 5xx | mixed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    candidates = [("smoe, continuous batching (max-batch 64)",
                   lambda: smoe_server(model, tmp, a.threads, "--max-batch", "64",
                                       "--max-queue", "256", "--max-tokens", "512")),
                  ("smoe, one at a time (max-batch 1)",
                   lambda: smoe_server(model, tmp, a.threads, "--max-batch", "1",
                                       "--max-queue", "256", "--max-tokens", "512"))]
    if a.peer:
        candidates.append(("transformers serve --continuous-batching",
                           lambda: peer_server(model, tmp, a.threads)))
    for name, make in candidates:
        server = make().wait_ready()
        try:
            import httpx

            served = httpx.get(server.url + "/v1/models", timeout=30).json()["data"]
            model_id = served[0]["id"] if served else str(model)

            for c in conc:
                s = asyncio.run(_load(server.url, model_id, c, a.duration, a.max_tokens))
                lines.append(_row(name, c, s))
                print(lines[-1], flush=True)
        finally:
            server.stop()
    # Bursts past the queue limit.
    server = smoe_server(model, tmp, a.threads, "--max-batch", "4", "--max-queue", "8",
                         "--max-tokens", "64").wait_ready()
    try:
        codes = asyncio.run(_burst(server.url, 4 + 8 + 32))
    finally:
        server.stop()
    other = {c: n for c, n in codes.items() if c >= 500 and c != 503}
    lines += ["", f"Burst of {4 + 8 + 32} simultaneous requests against `--max-batch 4 "
              f"--max-queue 8`: " + ", ".join(f"{n} x {c}" for c, n in sorted(codes.items()))
              + f"; other 5xx: {sum(other.values())}."]
    text = "\n".join(lines)
    print(text)
    if a.write:
        from smoe.bench import write_section

        write_section(ROOT / "BENCHMARKS.md", text, "<!-- serve-load:start -->",
                      "<!-- serve-load:end -->")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
