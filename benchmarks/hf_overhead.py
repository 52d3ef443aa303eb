"""Per-call overhead of a patched transformers MoE block on tiny shapes, against the original.

transformers' test suites run tiny models (hidden 32, a few tokens), where a block's time is
almost all per-op dispatch, not arithmetic. This times one Mixtral and one DeepSeek-V3 block
(hidden 32, expert width 16, 8 experts, top-2), original and ``smoe.hf.patch``-ed (the same
object, patched and unpatched between rounds), for inference (no autograd) and training
(forward + backward) at a few token counts. Candidates are interleaved in one process;
each figure is the median over rounds of the per-call CPU time of this process
(``time.process_time``: on a shared machine, wall time mostly measures the neighbours), and the
ratio is patched / original (below 1: the patched block is faster). The aten operator count
per call is a machine-independent proxy for the dispatch overhead.

``--compile`` instead times ``torch.compile`` of a whole tiny Mixtral model, original and
patched (float32, CPU, ``fullgraph=True``): the first call (compilation) and the compiled
per-call time.

    python benchmarks/hf_overhead.py [--rounds 15] [--calls 200] [--write]

``--write`` puts the table into BENCHMARKS.md between its hf-overhead markers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

import smoe.hf  # noqa: E402

START, END = "<!-- hf-overhead:start -->", "<!-- hf-overhead:end -->"
BASE = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2)
FAMILIES = {
    "mixtral": dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2),
    "deepseek_v3": dict(intermediate_size=32, moe_intermediate_size=16, n_routed_experts=8,
                        num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
                        first_k_dense_replace=0, num_key_value_heads=4, kv_lora_rank=16,
                        q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
}


def block_of(family: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, **{**BASE, **FAMILIES[family]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    return model, model.model.layers[-1].mlp


def time_calls(block: torch.nn.Module, x: torch.Tensor, train: bool, calls: int) -> float:
    """Seconds per call (forward, or forward + backward)."""
    if train:
        xg = x.clone().requires_grad_()
        t0 = time.process_time()
        for _ in range(calls):
            y = block(xg)
            (y[0] if isinstance(y, tuple) else y).sum().backward()
        return (time.process_time() - t0) / calls
    with torch.no_grad():
        t0 = time.process_time()
        for _ in range(calls):
            block(x)
        return (time.process_time() - t0) / calls


def count_ops(block: torch.nn.Module, x: torch.Tensor, train: bool) -> int:
    """aten operators one call dispatches (after autograd's decompositions; backward included
    in training): a machine-independent proxy for per-call dispatch overhead."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        time_calls(block, x, train, 1)
    return Count.n


def patch_seconds(model: torch.nn.Module, rounds: int) -> float:
    """Median wall time of ``smoe.hf.patch`` (suites build and patch many tiny models)."""
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        smoe.hf.patch(model)
        samples.append(time.perf_counter() - t0)
        smoe.hf.unpatch(model)
    return statistics.median(samples)


def measure(rounds: int, calls: int) -> list[tuple[str, str, int, float, float]]:
    rows = []
    for family in FAMILIES:
        model, block = block_of(family)
        seconds = patch_seconds(model, rounds)
        rows.append((family, "patch()", 0, 0.0, seconds, 0, 0))
        print(f"{family:12s} patch() {seconds * 1e3:.2f} ms", flush=True)
        for train in (False, True):
            model.train(train)
            for T in (1, 4, 16):
                x = torch.randn(1, T, 32)
                times = {"original": [], "patched": []}
                for _ in range(rounds):
                    for name in ("original", "patched"):
                        if name == "patched":
                            smoe.hf.patch(model)
                        time_calls(block, x, train, 5)  # warm-up
                        times[name].append(time_calls(block, x, train, calls))
                        if name == "patched":
                            smoe.hf.unpatch(model)
                orig = statistics.median(times["original"])
                patched = statistics.median(times["patched"])
                ops_orig = count_ops(block, x, train)
                ops_patched = count_ops(smoe.hf.patch(model).model.layers[-1].mlp, x, train)
                smoe.hf.unpatch(model)
                rows.append((family, "train" if train else "infer", T, orig, patched, ops_orig,
                             ops_patched))
                print(f"{family:12s} {rows[-1][1]:5s} T={T:3d} original {orig * 1e6:8.1f} us "
                      f"patched {patched * 1e6:8.1f} us ratio {patched / orig:.2f} "
                      f"ops {ops_orig} -> {ops_patched}", flush=True)
    return rows


def measure_compile(rounds: int, calls: int) -> list[tuple[str, float, float, float]]:
    """(candidate, first-call seconds, compiled us per call, eager us per call)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("mixtral", **{**BASE, "num_hidden_layers": 2,
                                                **FAMILIES["mixtral"]})
    ids = torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    out = []
    for name in ("original", "patched"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        if name == "patched":
            smoe.hf.patch(model)
        compiled = torch.compile(model, fullgraph=True, dynamic=False)
        with torch.no_grad():
            t0 = time.perf_counter()
            compiled(ids)
            first = time.perf_counter() - t0
            per_call = {}
            for tag, fn in (("compiled", compiled), ("eager", model)):
                samples = []
                for _ in range(rounds):
                    t0 = time.process_time()
                    for _ in range(calls):
                        fn(ids)
                    samples.append((time.process_time() - t0) / calls)
                per_call[tag] = statistics.median(samples)
        out.append((name, first, per_call["compiled"], per_call["eager"]))
        print(f"{name}: first call {first:.1f} s, compiled {per_call['compiled'] * 1e6:.0f} us, "
              f"eager {per_call['eager'] * 1e6:.0f} us", flush=True)
    return out


def compile_table(rows, command: str) -> str:
    lines = [f"`{command}` (torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
             "Mixtral, 2 layers, hidden 32, 8 experts top-2, batch 2 x 16 tokens, float32, "
             "no autograd; first call = compilation, wall time; per-call CPU-time medians)", "",
             "| model | first call (s) | compiled (us/call) | eager (us/call) |",
             "|---|---|---|---|"]
    for name, first, comp, eager in rows:
        lines.append(f"| {name} | {first:.1f} | {comp * 1e6:.0f} | {eager * 1e6:.0f} |")
    return "\n".join(lines) + "\n"


def table(rows, command: str) -> str:
    lines = [f"`{command}` (torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
             "per-call medians, ratio = patched / original)", "",
             "| block | mode | tokens | original (us) | patched (us) | ratio | aten ops "
             "original | aten ops patched |",
             "|---|---|---|---|---|---|---|---|"]
    for family, mode, T, orig, patched, ops_orig, ops_patched in rows:
        if mode == "patch()":
            lines.append(f"| {family} | patch() | - | - | {patched * 1e6:.1f} | - | - | - |")
            continue
        lines.append(f"| {family} | {mode} | {T} | {orig * 1e6:.1f} | {patched * 1e6:.1f} | "
                     f"{patched / orig:.2f} | {ops_orig} | {ops_patched} |")
    return "\n".join(lines) + "\n"


def write(path: Path, text: str, compiled: bool = False) -> None:
    start, end = (START, END) if not compiled else (START.replace("overhead", "compile"),
                                                     END.replace("overhead", "compile"))
    title = ("Patched transformers model under torch.compile" if compiled
             else "Patched transformers block: per-call overhead")
    old = path.read_text() if path.exists() else ""
    if start in old and end in old:
        head, rest = old.split(start, 1)
        new = head + start + "\n" + text + end + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + f"\n\n## {title}\n\n" + start + "\n" + text + end + "\n"
    tmp = path.with_suffix(".md.tmp")
    with open(tmp, "w") as f:
        f.write(new)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true",
                   help="time torch.compile of a whole model instead")
    p.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    command = "python " + " ".join(["benchmarks/hf_overhead.py"] + sys.argv[1:])
    if args.compile:
        text = compile_table(measure_compile(args.rounds, args.calls), command)
    else:
        text = table(measure(args.rounds, args.calls), command)
    print(text)
    if args.write:
        write(ROOT / "BENCHMARKS.md", text, args.compile)


if __name__ == "__main__":
    main()
