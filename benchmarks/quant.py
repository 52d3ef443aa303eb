"""Quantized experts, measured: kernels, quality, decode speed against the roofline.

1. Kernels: one expert-sized projection (4096 x 1024) at batch 1, cycling over enough distinct
   matrices that fp32 weights exceed the last-level cache: fp32 and bf16 matmuls, int8 with
   bf16 / fp32 activations, int4 g32/g64/g128. Picks what the quantized experts call.
2. Quality: validation loss (nats per byte) of a trained run per scheme against fp32.
3. Decode: tokens/s (decode steps only, prefill excluded) of a random-weights model whose
   expert weights are >= 4x the LLC, fp32 vs bf16 / int8 / int4 experts (and int4 experts with
   int8 / int4 attention) in the same process, interleaved, beside the roofline (bytes read per
   step / measured memory bandwidth); where a step's time goes (attention, routing, expert
   kernels, the rest); the int4 kernel alone, hot and cold.

One intra-op thread everywhere (this 2-core machine is shared; 2 threads under contention
collapse). Candidates interleaved in rounds; medians.

    python benchmarks/quant.py --run RUN_DIR --write
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def _medians(cands: dict, rounds: int, warmup: int = 1) -> dict[str, float]:
    names = list(cands)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            cands[n]()
            if r >= warmup:
                times[n].append(time.perf_counter() - t)
    return {n: statistics.median(v) for n, v in times.items()}


def bandwidth_gbs(gib: float = 1.0, reps: int = 5) -> float:
    """Read bandwidth: the median time of summing a ``gib`` GiB float32 tensor."""
    x = torch.ones(int(gib * 2**30) // 4)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t)
    del x
    return gib * 2**30 / statistics.median(ts) / 1e9


# -- 1. kernels ---------------------------------------------------------------------------------
def kernels(rounds: int) -> list[str]:
    from smoe.inference.quantized_modules import _pack_cpu_int4, quantize_int4, quantize_int8

    N, K, M = 4096, 1024, 24            # 24 x 16 MiB fp32 = 384 MiB > the 300 MiB L3
    torch.manual_seed(0)
    w = torch.randn(M, N, K) * 0.02
    wb = w.bfloat16()
    q8 = [quantize_int8(w[i]) for i in range(M)]
    q4 = {g: [(lambda q, sz: (_pack_cpu_int4(q), sz))(*quantize_int4(w[i], g)) for i in range(M)]
          for g in (32, 64, 128)}
    x32 = torch.randn(1, K)
    xb = x32.bfloat16()

    def loop(fn):
        return lambda: [fn(i) for i in range(M)]

    cands = {
        "fp32 matmul": loop(lambda i: torch.mm(x32, w[i].t())),
        "bf16 matmul": loop(lambda i: torch.mm(xb, wb[i].t())),
        "int8, bf16 act": loop(lambda i: torch._weight_int8pack_mm(xb, q8[i][0], q8[i][1])),
        "int8, fp32 act": loop(lambda i: torch._weight_int8pack_mm(x32, q8[i][0],
                                                                   q8[i][1].float())),
    }
    for g in (32, 64, 128):
        cands[f"int4 g{g}, bf16 act"] = loop(
            lambda i, g=g: torch._weight_int4pack_mm_for_cpu(xb, q4[g][i][0], g, q4[g][i][1]))
    cands["int4 g128, fp32 act"] = loop(
        lambda i: torch._weight_int4pack_mm_for_cpu(x32, q4[128][i][0], 128,
                                                    q4[128][i][1].float()))
    bytes_per = {"fp32 matmul": 4, "bf16 matmul": 2, "int8, bf16 act": 1, "int8, fp32 act": 1}
    med = _medians(cands, rounds)
    base = med["fp32 matmul"]
    lines = ["| kernel (x [1, 1024] @ W [4096, 1024]^T) | us per call | GB/s of weights | "
             "speed-up vs fp32 |", "|---|---|---|---|"]
    for n, t in med.items():
        # int4: half a byte per weight plus a bf16 (scale, zero) pair per group
        b = bytes_per[n] if n in bytes_per else 0.5 + 4 / int(n.split(" g")[1].split(",")[0])
        lines.append(f"| {n} | {t / M * 1e6:.0f} | {N * K * b * M / t / 1e9:.1f} | "
                     f"{base / t:.2f}x |")
    return lines


# -- 2. quality ---------------------------------------------------------------------------------
def quality(run_dir: str, batches: int) -> list[str]:
    from smoe.data import DataConfig, prepare_data, val_batches
    from smoe.inference.quantize import quantize, weight_bytes
    from smoe.runs import load_run

    run = load_run(run_dir)
    data = prepare_data(DataConfig(**(run.config.get("data") or {})), run_dir=run.run_dir)
    seq = run.config["train"]["seq_len"]
    val = list(val_batches(data.val, 4, seq, max_batches=batches))
    bpt = data.val.bytes_per_token()

    def loss(model) -> float:
        tot, n = 0.0, 0
        with torch.no_grad():
            for b in val:
                out = model(b.x_BT, b.y_BT)
                tot += float(out.loss) * b.y_BT.numel()
                n += b.y_BT.numel()
        return tot / n / bpt

    schemes = [("fp32", None), ("bf16 experts", dict(experts="bf16")),
               ("int8 experts", dict(experts="int8")),
               ("int4 g128 experts", dict(experts="int4", group_size=128)),
               ("int4 g64 experts", dict(experts="int4", group_size=64)),
               ("int4 g32 experts", dict(experts="int4", group_size=32)),
               ("int8 experts + int8 attention", dict(experts="int8", attention="int8")),
               ("int4 g128 experts + int8 attention + int8 dense",
                dict(experts="int4", group_size=128, attention="int8", dense="int8")),
               # attention at experts' bits: does attention tolerate int4 as well as experts?
               ("int8 experts + int4 g128 attention",
                dict(experts="int8", attention="int4", group_size=128)),
               ("int4 g128 experts + int4 g128 attention + int4 dense",
                dict(experts="int4", group_size=128, attention="int4", dense="int4"))]
    base = None
    lines = ["| scheme | val loss (nats/byte) | change vs fp32 | expert bytes | total bytes |",
             "|---|---|---|---|---|"]
    for name, kw in schemes:
        m = copy.deepcopy(run.model)
        if kw:
            quantize(m, **kw)
        v = loss(m)
        base = v if base is None else base
        b = weight_bytes(m)
        lines.append(f"| {name} | {v:.4f} | {100 * (v - base) / base:+.2f}% | "
                     f"{b['experts'] / 2**20:.2f} MiB | {b['total'] / 2**20:.2f} MiB |")
    return lines


# -- 2b. patched transformers models ------------------------------------------------------------
HF = {
    "mixtral": dict(intermediate_size=256, num_local_experts=8, num_experts_per_tok=2),
    "qwen3_moe": dict(intermediate_size=256, moe_intermediate_size=128, num_experts=16,
                      num_experts_per_tok=4, norm_topk_prob=True, head_dim=32),
    "deepseek_v3": dict(intermediate_size=256, moe_intermediate_size=128, n_routed_experts=16,
                        num_experts_per_tok=4, n_shared_experts=1, n_group=4, topk_group=2,
                        first_k_dense_replace=1, num_key_value_heads=4, kv_lora_rank=32,
                        q_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32),
}


def hf_models() -> list[str]:
    """Random-weight tiny transformers models (no trained ones offline): how far each scheme
    moves the next-token distribution, KL(fp32 || quantized) per token and top-1 agreement,
    on random input ids. Weights N(0, 0.05) so the experts matter."""
    import transformers

    import smoe.hf
    from smoe.inference.quantize import quantize

    transformers.utils.logging.set_verbosity_error()
    base = dict(vocab_size=512, hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    lines = ["| model | scheme | KL(fp32 \\|\\| q) nats/token | top-1 agreement |",
             "|---|---|---|---|"]
    ids = torch.randint(0, 512, (4, 128), generator=torch.Generator().manual_seed(0))
    for family, kw in HF.items():
        config = transformers.AutoConfig.for_model(family, **{**base, **kw})
        torch.manual_seed(0)
        ref = transformers.AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if not ("norm" in name and p.dim() == 1):
                    p.normal_(std=0.05)
            logp = ref(ids).logits.float().log_softmax(-1)
        for scheme, g, att in (("int8", 128, None), ("int4", 128, None), ("int4", 32, None),
                               ("int8", 128, "int8")):
            m = copy.deepcopy(ref)
            smoe.hf.patch(m)
            quantize(m, experts=scheme, group_size=g, attention=att)
            with torch.no_grad():
                logq = m(ids).logits.float().log_softmax(-1)
            kl = (logp.exp() * (logp - logq)).sum(-1).mean().item()
            agree = (logp.argmax(-1) == logq.argmax(-1)).float().mean().item()
            name = f"{scheme}" + (f" g{g}" if scheme == "int4" else "") + " experts" + \
                (" + int8 attention" if att else "")
            lines.append(f"| {family} | {name} | {kl:.2e} | {100 * agree:.1f}% |")
    return lines


# -- 3. decode speed on a large-weights model ---------------------------------------------------
#: The large-weights model: 4 layers x 20 experts x (2*1536 + 1536) x 1024 x 4 B = 1.4 GiB of fp32
#: expert weights, >= 4x the 300 MiB LLC of the machine this was written on.
LARGE = dict(vocab_size=257, hidden_size=1024, num_layers=4, num_heads=8, num_kv_heads=4,
             max_seq_len=256, moe=dict(hidden_size=1024, expert_size=1536, num_experts=20,
                                       top_k=2))
#: (row name, quantize() keywords or None for the fp32 model)
DECODE_SCHEMES = [("fp32", None), ("bf16 experts", dict(experts="bf16")),
                  ("int8 experts", dict(experts="int8")),
                  ("int4 experts", dict(experts="int4")),
                  ("int4 experts + int8 attention", dict(experts="int4", attention="int8")),
                  ("int4 experts + int4 attention", dict(experts="int4", attention="int4"))]


def build_random(spec: dict, seed: int = 0):
    """A random-weights smoe model of ``spec`` (LARGE's shape), built on meta then filled."""
    from smoe.config import ModelConfig, MoEConfig
    from smoe.model import SMoETransformer

    cfg = ModelConfig(**{**spec, "moe": MoEConfig(**spec["moe"])})
    with torch.device("meta"):
        model = SMoETransformer(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.reset_parameters()
    return model.eval()


def decode_models(spec: dict, schemes=DECODE_SCHEMES) -> dict:
    from smoe.inference.quantize import quantize

    base = build_random(spec)
    models = {}
    for name, kw in schemes:
        m = base if kw is None else copy.deepcopy(base)
        if kw:
            quantize(m, group_size=128, **kw)
        models[name] = m
        gc.collect()
    return models


@torch.no_grad()
def decode_step_seconds(model, steps: int, prompt_len: int = 16, on_start=None) -> float:
    """Seconds per decode step (one new token, batch 1, KV cache), prefill excluded: a 16-token
    prompt is prefilled, then ``steps`` greedy steps are timed as one block."""
    from smoe.inference.cache import StaticCache

    prompt = torch.arange(10, 10 + prompt_len)[None]
    cache = StaticCache.for_model(model, 1, prompt_len + steps + 1)
    logits = model(prompt, cache=cache).logits[:, -1]
    if on_start is not None:
        on_start()
    t = time.perf_counter()
    for _ in range(steps):
        logits = model(logits.argmax(-1)[:, None], cache=cache).logits[:, -1]
    return (time.perf_counter() - t) / steps


def step_bytes(model, spec: dict) -> int:
    """Bytes a decode step reads: the top-K experts of each layer + every other weight except the
    embedding table (one row of it)."""
    from smoe.inference.quantize import weight_bytes

    wb = weight_bytes(model)
    moe = spec["moe"]
    per_expert = wb["experts"] / (spec["num_layers"] * moe["num_experts"])
    embed = model.embed.weight
    return int(spec["num_layers"] * moe["top_k"] * per_expert + wb["other"]
               - embed.numel() * embed.element_size())


@torch.no_grad()
def breakdown(model, steps: int) -> dict[str, float]:
    """Milliseconds per decode step in attention (projections, cache, SDPA), routing (router,
    dispatch, combine), the experts' own compute (``expert_forward``: kernels and casts), and
    the rest (embedding, norms, residuals, lm_head, sampling, Python between modules), by
    wall-clock timers around modules (hooks) and around each ``expert_forward`` call."""
    spent = {"attention": 0.0, "moe layer": 0.0, "experts": 0.0}
    handles, patched = [], []

    def timed(module, key):
        def pre(mod, args):
            mod._t0 = time.perf_counter()

        def post(mod, args, out):
            spent[key] += time.perf_counter() - mod._t0
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    for layer in model.layers:
        timed(layer.attn, "attention")
        timed(layer.ffn, "moe layer")
        ex = layer.ffn.experts
        fn = ex.expert_forward

        def wrapped(x, e, fn=fn):
            t = time.perf_counter()
            y = fn(x, e)
            spent["experts"] += time.perf_counter() - t
            return y
        ex.expert_forward = wrapped
        patched.append(ex)
    def reset() -> None:   # after the prefill: decode steps only
        for k in spent:
            spent[k] = 0.0
    try:
        decode_step_seconds(model, 2)
        total = decode_step_seconds(model, steps, on_start=reset)
    finally:
        for h in handles:
            h.remove()
        for ex in patched:
            del ex.expert_forward
    out = {k: 1e3 * v / steps for k, v in spent.items()}
    out["routing"] = out.pop("moe layer") - out["experts"]
    out["total"] = 1e3 * total
    out["rest"] = out["total"] - sum(v for k, v in out.items() if k != "total")
    return out


def kernel_alone(spec: dict, rounds: int) -> list[str]:
    """The int4 kernel and the fp32 matmul on one expert's gate/up matrix [2F, D] at batch 1:
    the same matrix over and over (hot: it stays in cache; what the kernel's arithmetic allows)
    and cycling over as many distinct matrices as the model's experts (cold: read from DRAM, as
    in decoding); per-call time and achieved GB/s of weight bytes read."""
    from smoe.inference.quantized_modules import _pack_cpu_int4, quantize_int4

    moe = spec["moe"]
    N, K, M = 2 * moe["expert_size"], moe["hidden_size"], moe["num_experts"] * spec["num_layers"]
    torch.manual_seed(0)
    w = [torch.randn(N, K) * 0.02 for _ in range(M)]
    q4 = [(lambda q, sz: (_pack_cpu_int4(q), sz))(*quantize_int4(x, 128)) for x in w]
    x32, xb = torch.randn(1, K), torch.randn(1, K).bfloat16()
    b4 = q4[0][0].numel() * q4[0][0].element_size() + q4[0][1].numel() * 2
    b32 = N * K * 4
    reps = 8
    cands = {
        "int4 hot": lambda: [torch._weight_int4pack_mm_for_cpu(xb, q4[0][0], 128, q4[0][1])
                             for _ in range(reps)],
        "int4 cold": lambda: [torch._weight_int4pack_mm_for_cpu(xb, q[0], 128, q[1])
                              for q in q4[:reps * 4]],
        "fp32 hot": lambda: [torch.mm(x32, w[0].t()) for _ in range(reps)],
        "fp32 cold": lambda: [torch.mm(x32, m.t()) for m in w[:reps * 4]],
    }
    med = _medians(cands, rounds)
    lines = [f"The kernel alone on one expert's gate/up matrix ({N} x {K}) at batch 1 (hot: the "
             "same matrix, cache-resident; cold: cycling over distinct matrices, read from "
             "DRAM):", "", "| kernel | us per call | GB/s of weights |", "|---|---|---|"]
    for n, t in med.items():
        calls = reps if "hot" in n else reps * 4
        b = b4 if n.startswith("int4") else b32
        lines.append(f"| {n} | {t / calls * 1e6:.0f} | {b * calls / t / 1e9:.1f} |")
    return lines


def decode_speed(rounds: int, steps: int) -> list[str]:
    from smoe.inference.quantize import weight_bytes

    models = decode_models(LARGE)
    base = models["fp32"]
    cands = {n: (lambda m=m: decode_step_seconds(m, steps)) for n, m in models.items()}
    per_round: dict[str, list[float]] = {n: [] for n in models}
    names = list(models)
    for r in range(rounds + 1):   # round 0 warms up
        for n in names[r % len(names):] + names[:r % len(names)]:
            s = cands[n]()
            if r:
                per_round[n].append(s)
    step_s = {n: statistics.median(v) for n, v in per_round.items()}
    bw = bandwidth_gbs()
    spec = LARGE
    lines = [f"Model: D=1024, F=1536, E=20, top-2, 4 layers, 8 heads / 4 KV heads, vocab 257; "
             f"fp32 expert weights {weight_bytes(base)['experts'] / 2**30:.2f} GiB (LLC 300 "
             f"MiB). Decode steps only (a 16-token prompt prefilled, then {steps} greedy steps "
             f"timed; prefill excluded); medians over {rounds} interleaved rounds; measured read "
             f"bandwidth {bw:.1f} GB/s (a 1 GiB `sum`, 1 thread, after the rounds).", "",
             "| model | expert bytes | bytes read / step | ms / step | decode tokens/s | vs fp32 "
             "| roofline tokens/s | % of roofline |", "|---|---|---|---|---|---|---|---|"]
    fp32_tps = 1 / step_s["fp32"]
    for n, m in models.items():
        wb = weight_bytes(m)
        sb = step_bytes(m, spec)
        roof = bw * 1e9 / sb
        tps = 1 / step_s[n]
        lines.append(f"| {n} | {wb['experts'] / 2**20:.0f} MiB | {sb / 1e6:.1f} MB | "
                     f"{1e3 * step_s[n]:.2f} | {tps:.1f} | {tps / fp32_tps:.2f}x | {roof:.1f} | "
                     f"{100 * tps / roof:.0f}% |")
    lines += ["", "Where a decode step's time goes (ms per step, timers around modules; "
              "medians of one pass per round, after the rounds):", "",
              "| model | total | attention | routing (router, dispatch, combine) | experts "
              "(kernels + casts) | rest (embed, norms, lm_head, Python) |",
              "|---|---|---|---|---|---|"]
    for n, m in models.items():
        passes = [breakdown(m, steps) for _ in range(max(1, rounds))]
        b = {k: statistics.median(p[k] for p in passes) for k in passes[0]}
        lines.append(f"| {n} | {b['total']:.2f} | {b['attention']:.2f} | {b['routing']:.2f} | "
                     f"{b['experts']:.2f} | {b['rest']:.2f} |")
    lines += [""] + kernel_alone(spec, rounds)
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", help="a trained run for the quality table")
    p.add_argument("--val-batches", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=24, help="decode steps timed per round")
    p.add_argument("--skip", action="append", default=[], choices=("kernels", "quality", "hf",
                                                                   "decode"))
    p.add_argument("--write", action="store_true",
                   help="replace each part's block (<!-- quant-PART:start/end -->) in BENCHMARKS.md")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    import platform

    cpu = platform.processor() or platform.machine()
    head = (f"Command: `python benchmarks/quant.py {' '.join(sys.argv[1:])}`; torch "
            f"{torch.__version__}, 1 thread, {cpu}; load average at start "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.")
    parts: dict[str, list[str]] = {}
    if "kernels" not in a.skip:
        parts["kernels"] = ["### Kernels at batch 1", "", head, ""] + kernels(a.rounds)
        print("\n".join(parts["kernels"]), flush=True)
    if "quality" not in a.skip and a.run:
        parts["quality"] = [f"### Validation loss per scheme ({a.run}, {a.val_batches} batches "
                            "of 4)", "", head, ""] + quality(a.run, a.val_batches)
        print("\n".join(parts["quality"]), flush=True)
    if "hf" not in a.skip:
        parts["hf"] = ["### Patched transformers models (random weights)", "", head, ""] + \
            hf_models()
        print("\n".join(parts["hf"]), flush=True)
    if "decode" not in a.skip:
        parts["decode"] = ["### Decode speed on a large-weights model (random weights)", "",
                           head, ""] + decode_speed(a.rounds, a.steps)
        print("\n".join(parts["decode"]), flush=True)
    if a.write:
        from smoe.bench import write_section

        for name, lines in parts.items():   # each part its own block of the section
            write_section(ROOT / "BENCHMARKS.md", "\n".join(lines), f"<!-- quant-{name}:start -->",
                          f"<!-- quant-{name}:end -->")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
