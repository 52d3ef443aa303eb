"""A bounded load test of ``smoe serve`` on 127.0.0.1, side by side with
``transformers serve --continuous-batching`` (``--peer``, an HF ``--model``) and the same clients.

1. Throughput and latency: for each concurrency c (default 1, 4, 16, 64), c streaming clients
   send greedy requests back to back for ``--duration`` seconds; tokens/s, p50/p99 of time to
   first token and of end-to-end latency. Candidates: smoe with continuous batching
   (``--max-batch 64``), smoe one request at a time (``--max-batch 1``, the rest queue) and,
   with ``--peer``, transformers' server (KV cache sized for the same 64 requests). Every
   server is started once and stays up; for each concurrency the candidates take turns for
   ``--rounds`` rounds (order reversed every other round) and a row pools its rounds.
2. Bursts past the queue limit: ``max_batch + max_queue + 32`` requests at once against a
   server with a small queue; counts of 200, 429, 503 and any other status (there must be no
   5xx other than 429/503).
3. Integrity: every client checks its stream is its own: one response id across its chunks,
   an end (``data: [DONE]``, or a chunk with a ``finish_reason`` for a server that sends no
   ``[DONE]``), and the text equal to what the same prompt gave at warm-up (greedy: the same
   prompt gives the same text whoever shares the batch). Mismatches are counted. Across
   servers, the warm-up texts are compared with smoe's (the same weights, greedy).

Every request is the same JSON for every server: ``prompt``, ``max_tokens``, ``temperature``
0, ``stream`` and ``stream_options.include_usage`` (no ``model``: each server serves one).
Tokens are the ``usage.completion_tokens`` each server reports at the end of the stream.

    python benchmarks/serve_load.py --model runs/demo --write
    smoe export runs/demo --to hf /tmp/demo-hf
    PYTHONPATH=ACCEL_SITE python benchmarks/serve_load.py --model /tmp/demo-hf --peer --write

The peer loads its model with ``device_map``, which needs ``accelerate`` (and ``psutil``):
the ``[bench]`` extra. Without ``--model`` a tiny-moe run is trained for 2 steps on generated
text (a served model whose speed, not quality, is measured).
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [f"Request {i}: the river and the stone {'house ' * (i % 5)}" for i in range(16)]
SMOE_CB, SMOE_SERIAL = "smoe, continuous batching", "smoe, one at a time"
PEER = "transformers serve --continuous-batching"


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
        self.stop()
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


def peer_server(model: Path, tmp: Path, threads: int, max_batch: int) -> Proc:
    """``transformers serve`` pinned to ``model`` (its positional ``force_model``: loaded at
    start, and requests without a ``model`` go to it; its ``/v1/models`` lists the Hugging
    Face cache instead, which offline has no entry). On CPU it sizes its paged KV cache from
    60% of free RAM (14 GB on a 24 GB machine) unless told: ``max_batch`` pages of 256 tokens
    (one per request here, as smoe's ``--max-batch`` slots) and 2048 tokens per forward."""
    port = _free_port()
    exe = Path(sys.executable).with_name("transformers")
    return Proc([str(exe), "serve", str(model.resolve()), "--continuous-batching",
                 "--device", "cpu", "--dtype", "float32", "--cb-num-blocks", str(max_batch),
                 "--cb-max-batch-tokens", "2048", "--port", str(port), "--host", "127.0.0.1"],
                port, tmp / f"peer-{port}.log", _env(threads))


def _new_stats() -> dict:
    return {"status": {}, "mixed": 0, "no_done": 0, "ttft": [], "e2e": [], "tokens": 0,
            "requests": 0, "wall": 0.0, "load": []}


async def _one(client, url: str, prompt: str, max_tokens: int, seen: dict[str, str],
               stats: dict) -> None:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.monotonic()
    ttft, ids, text, done, ended, usage = None, set(), [], False, False, None
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
            usage = chunk.get("usage") or usage
            for c in chunk.get("choices") or []:
                if c.get("text"):
                    if ttft is None:
                        ttft = time.monotonic() - t0
                    text.append(c["text"])
                ended = ended or c.get("finish_reason") is not None
    e2e = time.monotonic() - t0
    full = "".join(text)
    if not (done or ended) or len(ids) != 1 or (prompt in seen and seen[prompt] != full):
        stats["mixed"] += 1
    stats["no_done"] += not done
    seen.setdefault(prompt, full)
    stats["ttft"].append(ttft if ttft is not None else e2e)
    stats["e2e"].append(e2e)
    stats["tokens"] += usage["completion_tokens"] if usage else len(full)
    stats["requests"] += 1


async def _warm(url: str, max_tokens: int) -> dict[str, str]:
    """Every prompt once, 16 at a time: the reference texts, and the servers' lazy set-up
    (transformers' continuous batching starts on the first request) out of the timings."""
    import httpx

    seen: dict[str, str] = {}
    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*[_one(client, url, p, max_tokens, seen, _new_stats())
                               for p in PROMPTS])
    return seen


async def _load(url: str, concurrency: int, duration: float, max_tokens: int,
                seen: dict[str, str], stats: dict) -> None:
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        end = time.monotonic() + duration

        async def worker(i: int) -> None:
            k = i
            while time.monotonic() < end:
                await _one(client, url, PROMPTS[k % len(PROMPTS)], max_tokens, seen, stats)
                k += concurrency

        t0 = time.monotonic()
        await asyncio.gather(*[worker(i) for i in range(concurrency)])
        stats["wall"] += time.monotonic() - t0
    stats["load"].append(os.getloadavg()[0])


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


def _tps(s: dict) -> float:
    return s["tokens"] / s["wall"] if s["wall"] else 0.0


def _row(name: str, c: int, s: dict) -> str:
    bad = sum(n for code, n in s["status"].items() if code >= 500 and code not in (503,))
    load = max(s["load"]) if s["load"] else float("nan")
    return (f"| {name} | {c} | {s['requests']} | {_tps(s):.1f} | "
            f"{1e3 * _pct(s['ttft'], 50):.0f} | {1e3 * _pct(s['ttft'], 99):.0f} | "
            f"{1e3 * _pct(s['e2e'], 50):.0f} | {1e3 * _pct(s['e2e'], 99):.0f} | "
            f"{s['status'].get(429, 0)} | {bad} | {s['mixed']} | {load:.1f} |")


def _ratio_rows(conc: list[int], res: dict) -> list[str]:
    """smoe (continuous batching) against the peer: above 1 is smoe ahead in every column."""
    out = ["| clients | tokens/s smoe / peer | TTFT p50 peer / smoe | TTFT p99 peer / smoe | "
           "E2E p50 peer / smoe | E2E p99 peer / smoe |", "|---|---|---|---|---|---|"]
    for c in conc:
        s, p = res[SMOE_CB][c], res[PEER][c]
        cells = [_tps(s) / _tps(p) if _tps(p) else float("nan")]
        for key, q in (("ttft", 50), ("ttft", 99), ("e2e", 50), ("e2e", 99)):
            cells.append(_pct(p[key], q) / _pct(s[key], q))
        out.append(f"| {c} | " + " | ".join(f"{x:.2f}x" for x in cells) + " |")
    return out


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


def _versions() -> str:
    import torch
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="run or HF folder (default: a tiny-moe run)")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--duration", type=float, default=60.0,
                    help="seconds of load per concurrency, candidate and round")
    ap.add_argument("--rounds", type=int, default=1, help="turns each candidate takes")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=64, help="requests decoded together")
    ap.add_argument("--threads", type=int, default=2, help="server's torch threads")
    ap.add_argument("--peer", action="store_true",
                    help="also run transformers serve --continuous-batching (an HF --model)")
    ap.add_argument("--no-serial", action="store_true",
                    help="leave out smoe one request at a time")
    ap.add_argument("--write", action="store_true", help="write the BENCHMARKS.md section")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    conc = [int(c) for c in a.concurrency.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="smoe-serve-load-"))
    model = Path(a.model) if a.model else _tiny_run(tmp)
    flags = ("--max-queue", "256", "--max-tokens", "512")
    makers = {SMOE_CB: lambda: smoe_server(model, tmp, a.threads, "--max-batch",
                                           str(a.max_batch), *flags)}
    if not a.no_serial:
        makers[SMOE_SERIAL] = lambda: smoe_server(model, tmp, a.threads, "--max-batch", "1",
                                                  *flags)
    if a.peer:
        makers[PEER] = lambda: peer_server(model, tmp, a.threads, a.max_batch)
    load_before = os.getloadavg()
    servers: dict[str, Proc] = {}
    res = {name: {c: _new_stats() for c in conc} for name in makers}
    refs: dict[str, dict[str, str]] = {}
    try:
        for name, make in makers.items():  # one at a time: loading competes for the cores
            servers[name] = make().wait_ready()
            refs[name] = asyncio.run(_warm(servers[name].url, a.max_tokens))
        for c in conc:
            for r in range(a.rounds):
                for name in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
                    asyncio.run(_load(servers[name].url, c, a.duration, a.max_tokens,
                                      refs[name], res[name][c]))
            for name in servers:
                print(_row(name, c, res[name][c]), flush=True)
    finally:
        for proc in servers.values():
            proc.stop()
    load_after = os.getloadavg()
    # Bursts past the queue limit.
    server = smoe_server(model, tmp, a.threads, "--max-batch", "4", "--max-queue", "8",
                         "--max-tokens", "64").wait_ready()
    try:
        codes = asyncio.run(_burst(server.url, 4 + 8 + 32))
    finally:
        server.stop()
    other = {c: n for c, n in codes.items() if c >= 500 and c != 503}
    cmd = (f"python benchmarks/serve_load.py --model MODEL --duration {a.duration:g} "
           f"--rounds {a.rounds} --max-tokens {a.max_tokens} --max-batch {a.max_batch} "
           f"--threads {a.threads} --concurrency {a.concurrency}"
           + (" --peer" if a.peer else "") + (" --no-serial" if a.no_serial else ""))
    lines = ["## Serving under load (`benchmarks/serve_load.py`)", "",
             f"`{cmd}` with MODEL `{model.name}`, on {platform.machine()} "
             f"({os.cpu_count()} cores shared with other jobs: 1-minute load average "
             f"{load_before[0]:.1f} before, {load_after[0]:.1f} after; column `load` is the "
             f"highest at the end of the row's turns), {_versions()}. Servers with "
             f"{a.threads} torch thread(s), greedy streaming requests of up to "
             f"{a.max_tokens} tokens on 127.0.0.1, clients in another process on the same "
             "cores; each server started once, the candidates taking turns at each "
             f"concurrency ({a.rounds} round(s) of {a.duration:g} s each, a row pools them). "
             "tokens/s: the `usage.completion_tokens` the servers report, over the wall time "
             "until the last stream ended; latencies in ms.", "",
             "| server | clients | requests | tokens/s | TTFT p50 | TTFT p99 | E2E p50 | "
             "E2E p99 | 429 | other 5xx | mixed-up | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in makers:
        label = f"{name} (max-batch {a.max_batch})" if name != SMOE_SERIAL else \
            f"{name} (max-batch 1)"
        lines += [_row(label, c, res[name][c]) for c in conc]
    if a.peer:
        lines += ["", "smoe with continuous batching against transformers serve (above 1: "
                  "smoe ahead):", ""] + _ratio_rows(conc, res)
    ref = refs[SMOE_CB]
    for name in refs:
        if name == SMOE_CB:
            continue
        same = sum(refs[name].get(p) == ref.get(p) for p in PROMPTS)
        lines += ["", f"Greedy text of {name} equal to smoe's (continuous batching) for "
                  f"{same} of {len(PROMPTS)} prompts."]
    no_done = {n: sum(res[n][c]["no_done"] for c in conc) for n in res}
    if any(no_done.values()):
        lines += ["", "Streams that ended without `data: [DONE]` (ended by a chunk with a "
                  "finish_reason instead): " + ", ".join(f"{n}: {k}" for n, k in
                                                           no_done.items()) + "."]
    lines += ["", f"Burst of {4 + 8 + 32} simultaneous requests against smoe `--max-batch 4 "
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
