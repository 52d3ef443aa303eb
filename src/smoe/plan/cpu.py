"""This CPU as the decode device, measured beyond its memory bandwidth: what a batch-1 matmul
of each weight scheme reads per second, and the host time smoe's eager decode spends per layer
apart from reading weights.

Why: on a CPU the pure roofline (bytes read per step / bandwidth) is a bound that decode does
not reach, for two measurable reasons (BENCHMARKS.md, "Decode speed on a large-weights model"):

* a quantized kernel at batch 1 can be bound by its own arithmetic (unpacking nibbles,
  converting to bfloat16) rather than by memory: torch's int4 CPU kernel reads ~5 GB/s of packed
  weights here, below the ~10 GB/s a float32 matmul streams;
* every layer costs a fixed host time (norms, routing, the K expert calls, attention's small
  ops, Python between them) that no weight byte explains; at batch 1 on a narrow model it is a
  third of an int4 step.

:func:`measure_kernel_rates` times each scheme's kernel on ``nbytes`` of distinct matrices (more
than the last-level cache, so every weight comes from DRAM), bytes of stored weights per second.
:func:`measure_layer_overhead` decodes with a small smoe model whose weights fit in cache, so
its step time is almost all overhead, and divides by its layers. Both are calibrations on
synthetic shapes, never on the model being planned. Needs torch (imported here only).
"""

from __future__ import annotations

import statistics
import time

__all__ = ["measure_kernel_rates", "measure_layer_overhead", "KERNEL_SHAPE"]

#: (N, K) of the matrices the kernel rates are measured on: an expert-sized projection.
KERNEL_SHAPE = (4096, 1024)


def measure_kernel_rates(nbytes: int = 512 << 20, repeats: int = 3,
                         schemes: tuple[str, ...] = ("fp32", "bf16", "int8", "int4")
                         ) -> dict[str, float]:
    """Bytes of stored weights per second a batch-1 ``x @ W^T`` reads, per scheme, cycling over
    distinct ``KERNEL_SHAPE`` matrices totalling ``nbytes`` (best of ``repeats`` passes).

    fp32 / bf16: ``torch.mm``; int8: ``torch._weight_int8pack_mm`` (bf16 activations, a scale
    per row); int4: ``torch._weight_int4pack_mm_for_cpu`` (group 128, bf16 scale and zero), on
    random packed bytes (every nibble is a valid weight: the kernel's work does not depend on
    the values). A scheme whose kernel torch lacks is left out."""
    import torch

    N, K = KERNEL_SHAPE
    rates: dict[str, float] = {}
    for scheme in schemes:
        if scheme == "fp32":
            per = N * K * 4
            make = lambda: torch.randn(N, K)  # noqa: E731
            x = torch.randn(1, K)
            run = lambda w: torch.mm(x, w.t())  # noqa: E731
        elif scheme == "bf16":
            per = N * K * 2
            make = lambda: torch.randn(N, K, dtype=torch.bfloat16)  # noqa: E731
            x = torch.randn(1, K, dtype=torch.bfloat16)
            run = lambda w: torch.mm(x, w.t())  # noqa: E731
        elif scheme == "int8" and hasattr(torch, "_weight_int8pack_mm"):
            per = N * K + N * 2
            make = lambda: (torch.randint(-127, 128, (N, K), dtype=torch.int8),  # noqa: E731
                            torch.rand(N, dtype=torch.bfloat16) * 1e-2)
            x = torch.randn(1, K, dtype=torch.bfloat16)
            run = lambda w: torch._weight_int8pack_mm(x, *w)  # noqa: E731
        elif scheme == "int4" and hasattr(torch, "_weight_int4pack_mm_for_cpu"):
            per = N * K // 2 + (K // 128) * N * 2 * 2
            make = lambda: (torch.randint(0, 256, (N, K // 2), dtype=torch.uint8),  # noqa: E731
                            torch.rand(K // 128, N, 2, dtype=torch.bfloat16) * 1e-2)
            x = torch.randn(1, K, dtype=torch.bfloat16)
            run = lambda w: torch._weight_int4pack_mm_for_cpu(x, w[0], 128, w[1])  # noqa: E731
        else:
            continue
        mats = [make() for _ in range(max(2, nbytes // per))]
        run(mats[0])
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            for w in mats:
                run(w)
            best = min(best, time.perf_counter() - t)
        rates[scheme] = len(mats) * per / best
        del mats
    return rates


def measure_layer_overhead(steps: int = 32, repeats: int = 5) -> float:
    """Seconds per layer per decode step that smoe's eager decode spends beyond reading weights:
    a 4-layer model with hidden 64, 8 experts of 128, top-2 (weights ~1 MB, cache-resident)
    decodes ``steps`` greedy tokens with a KV cache; the median step time over ``repeats``
    blocks, divided by the layers. The planner adds it per layer of the planned model."""
    import torch

    from smoe.config import ModelConfig, MoEConfig
    from smoe.inference.cache import StaticCache
    from smoe.model import SMoETransformer

    layers = 4
    torch.manual_seed(0)
    moe = MoEConfig(hidden_size=64, expert_size=128, num_experts=8, top_k=2)
    model = SMoETransformer(ModelConfig(vocab_size=257, hidden_size=64, num_layers=layers,
                                        num_heads=4, num_kv_heads=2, max_seq_len=256,
                                        moe=moe)).eval()
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            cache = StaticCache.for_model(model, 1, 8 + steps + 1)
            logits = model(torch.arange(8)[None], cache=cache).logits[:, -1]
            t = time.perf_counter()
            for _ in range(steps):
                logits = model(logits.argmax(-1)[:, None], cache=cache).logits[:, -1]
            times.append((time.perf_counter() - t) / steps)
    return statistics.median(times[1:]) / layers
