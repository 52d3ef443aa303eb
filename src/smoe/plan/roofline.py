"""What fits where and how fast it can go: memory, GPUs needed, the offload split, a decode
roofline, prefill time, and CPU-vs-transfer for offloaded experts.

Assumptions (each figure is a bound under them, written here so that a reader can disagree):

* Memory: weights at the chosen schemes + the KV cache (and linear-attention states) for
  ``batch x context``; ``reserve`` (default 10%) of each GPU's memory is kept for activations,
  the CUDA context and fragmentation (vLLM's default ``gpu_memory_utilization`` is 0.9).
  Multi-GPU splits are ideal (tensor/expert parallel with no replicated weights).
* Decode (one new token per sequence per step) is memory bound: a step reads every non-expert
  weight once (the embedding table only by its rows, so not counted; a tied table is read as the
  lm_head), the experts the batch's tokens route to, and the whole KV cache. With uniform routing
  a MoE layer with E experts, top-K and B tokens touches ``E * (1 - (1 - K/E)^B)`` experts
  (expected distinct). Step time = max(bytes / bandwidth, FLOPs / peak) over ``count`` GPUs with
  their bandwidths added. The bound real engines approach within 1.2-2x.
* Prefill: ``2 * active_params_no_embedding`` FLOPs per token plus causal attention
  ``2 * L * S^2 * H * (d_qk + d_v) / 2`` per sequence, at peak FLOP/s (real runs reach 40-70%).
* Offloaded experts (those that do not fit) sit in host memory. Per decode step either their
  touched weights cross the link to the accelerator (``link`` bandwidth), or the host computes
  them where they are (host memory bandwidth and FLOP/s; Fiddler, Kamahori et al. 2024,
  arXiv 2402.07033; ktransformers; llama.cpp ``--cpu-moe``). Activations moved are negligible
  (``tokens x hidden``). The cheaper one wins; the batch where they cross is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from smoe.plan.families import QUANT_FORMATS
from smoe.plan.gpus import Hardware
from smoe.plan.kv import KV_DTYPES, kv_bytes, kv_bytes_per_token
from smoe.plan.result import PlanResult

__all__ = ["SCHEMES", "Schemes", "expected_experts_touched", "hardware_plan"]

#: Weight schemes: fp16 stores like bf16.
SCHEMES = ("fp32", "bf16", "fp16", *QUANT_FORMATS)
_KEPT = ("embedding", "lm_head", "router", "norms")  # never quantized


@dataclass(frozen=True)
class Schemes:
    """The storage scheme of each part: ``weights`` for everything quantizable, overridden by
    ``experts`` (routed experts) and ``attention``."""

    weights: str = "bf16"
    experts: str | None = None
    attention: str | None = None

    def __post_init__(self) -> None:
        for name in ("weights", "experts", "attention"):
            v = getattr(self, name)
            if v is not None and v not in SCHEMES:
                raise ValueError(f"--{name}: unknown scheme {v!r}; choose from "
                                 f"{', '.join(SCHEMES)}")

    def of(self, group: str) -> str:
        if group in _KEPT:
            scheme = "fp32" if self.weights == "fp32" else "bf16"
        elif group == "routed_experts":
            scheme = self.experts or self.weights
        elif group == "attention":
            scheme = self.attention or self.weights
        else:
            scheme = self.weights
        return "bf16" if scheme == "fp16" else scheme


def expected_experts_touched(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts ``tokens`` tokens route to under uniform top-K routing."""
    if num_experts == 0:
        return 0.0
    return num_experts * (1 - (1 - top_k / num_experts) ** tokens)


def _attention_flops(plan: PlanResult, context: int) -> float:
    """Causal attention FLOPs of a ``context``-token prefill (QK^T and AV, halved for the mask);
    sliding/chunked layers attend at most their window."""
    hd = plan.head_dim
    total = 0.0
    for g in plan.kv_layers or []:
        if g.kind == "state":
            continue
        span = min(context, g.window or context)
        total += g.layers * 2 * 2 * plan.num_attention_heads * hd * context * span / 2
    return total


def hardware_plan(plan: PlanResult, hw: Hardware, *, count: int = 1, schemes: Schemes = Schemes(),
                  context: int = 4096, batch: int = 1, kv_dtype: str = "bf16",
                  reserve: float = 0.1, host: Hardware | None = None,
                  link_bandwidth: float = 25e9, compare_offload: bool = True) -> dict[str, Any]:
    """Every figure of the hardware half of ``smoe plan`` as a dict (see the module docstring).

    ``host``: the machine holding offloaded experts (memory bandwidth and FLOP/s for computing
    them there); ``link_bandwidth``: bytes/s from host to accelerator (PCIe 4.0 x16 ~ 25 GB/s
    usable). ``compare_offload=False`` when the device is the host itself (``--gpu cpu``).
    """
    for name, v in (("--count", count), ("--context", context), ("--batch", batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"--kv-dtype: unknown {kv_dtype!r}; choose from {', '.join(KV_DTYPES)}")
    if not 0 <= reserve < 1:
        raise ValueError(f"--reserve must be in [0, 1), got {reserve}")
    parts = plan.weight_bytes_by_part or {}
    by_part = {g: fmts[schemes.of(g)] for g, fmts in parts.items()}
    weights = sum(by_part.values())
    experts = by_part.get("routed_experts", 0)
    kv_b = KV_DTYPES[kv_dtype]
    kv_tok = kv_bytes_per_token(plan.kv_layers or [], kv_b)
    kv_all = kv_bytes(plan.kv_layers or [], kv_b, context, batch)
    need = weights + kv_all
    usable = hw.memory * (1 - reserve)
    fits = need <= usable * count
    gpus_needed = max(1, math.ceil(need / usable))

    # offload split: which experts per MoE layer stay on the accelerators
    n_moe, n_exp, k = plan.num_moe_layers, plan.num_experts, plan.top_k
    per_expert = experts / (n_moe * n_exp) if n_moe and n_exp else 0.0
    resident_budget = usable * count - (need - experts)
    if not n_moe:
        on_gpu = 0
    elif per_expert and resident_budget < experts:
        on_gpu = max(0, min(n_exp, math.floor(max(resident_budget, 0) / (n_moe * per_expert))))
    else:
        on_gpu = n_exp
    offloaded = n_exp - on_gpu if n_moe else 0

    # decode roofline
    touched = expected_experts_touched(n_exp, k, batch)
    read_fixed = weights - experts - by_part.get("embedding", 0) * (not plan.tie_word_embeddings)
    read_experts = n_moe * touched * per_expert
    step_bytes = read_fixed + read_experts + kv_all
    active = plan.active_params_no_embedding
    step_flops = 2 * active * batch + _attention_flops(plan, context) * 2 / context * batch
    bw, peak = hw.bandwidth * count, hw.flops * count
    step_s = max(step_bytes / bw, step_flops / peak)
    bound = "memory" if step_bytes / bw >= step_flops / peak else "compute"

    expected = _decode_expected(plan, hw, count, schemes, by_part, read_experts, kv_all, batch)

    prefill_flops = (2 * active * context + _attention_flops(plan, context)) * batch
    out: dict[str, Any] = {
        "hardware": {**hw.to_dict(), "count": count, "reserve": reserve},
        "schemes": {g: schemes.of(g) for g in by_part},
        "context": context, "batch": batch, "kv_dtype": kv_dtype,
        "weights_bytes": weights, "weights_bytes_by_part": by_part,
        "kv_bytes_per_token": kv_tok, "kv_bytes": kv_all,
        "kv_layers": [g.to_dict() for g in plan.kv_layers or []],
        "memory_needed_bytes": need, "usable_bytes_per_gpu": usable,
        "fits": fits, "gpus_needed": gpus_needed,
        "offload": {"experts_per_layer_on_gpu": on_gpu, "experts_per_layer_offloaded": offloaded,
                    "enough": resident_budget >= 0,
                    "bytes_per_expert": per_expert,
                    "offloaded_bytes": offloaded * n_moe * per_expert},
        "decode_bytes_per_step": step_bytes, "decode_flops_per_step": step_flops,
        "decode_bound": bound, "decode_step_seconds": step_s,
        "decode_tokens_per_s": 1 / step_s, "decode_tokens_per_s_batch": batch / step_s,
        "experts_touched_per_layer": touched,
        **({"decode_expected": expected} if expected else {}),
        "prefill_flops": prefill_flops, "prefill_seconds": prefill_flops / peak,
    }
    if offloaded and compare_offload:
        out["offload"].update(_offload_compare(plan, offloaded, per_expert, batch, hw, count,
                                               step_s, host, link_bandwidth))
    return out


def _decode_expected(plan: PlanResult, hw: Hardware, count: int, schemes: Schemes,
                     by_part: dict[str, float], read_experts: float, kv_all: float,
                     batch: int) -> dict[str, Any] | None:
    """Decode below the roofline, when ``hw`` carries measured kernel rates or a per-layer
    overhead (``--gpu cpu``): each part's bytes read at its scheme's batch-1 kernel rate (capped
    by the bandwidth), the KV cache at the bandwidth, plus ``layer_overhead`` per layer.
    None for a pure-datasheet accelerator."""
    if not hw.kernel_rates and not hw.layer_overhead:
        return None
    rates = hw.kernel_rates or {}
    bw = hw.bandwidth * count

    def rate(scheme: str) -> float:
        return min(bw, rates.get(scheme, hw.bandwidth) * count)

    seconds: dict[str, float] = {}
    for g, b in by_part.items():
        if g == "routed_experts":
            b = read_experts
        elif g == "embedding" and not plan.tie_word_embeddings:
            continue   # one row per token
        seconds[g] = b / rate(schemes.of(g))
    seconds["kv_cache"] = kv_all / bw
    overhead = hw.layer_overhead * plan.num_layers
    step = sum(seconds.values()) + overhead
    return {"step_seconds": step, "tokens_per_s": 1 / step, "tokens_per_s_batch": batch / step,
            "weight_seconds_by_part": seconds, "overhead_seconds": overhead,
            "kernel_rates": dict(rates), "layer_overhead": hw.layer_overhead}


def _offload_compare(plan: PlanResult, offloaded: int, per_expert: float, batch: int,
                     hw: Hardware, count: int, step_s: float, host: Hardware | None,
                     link_bandwidth: float) -> dict[str, Any]:
    """Per decode step: move the touched offloaded experts over the link, or compute them on the
    host; and the batch size at which the answer changes."""
    host_bw = host.bandwidth if host else 100e9
    host_flops = host.flops if host else 1e12
    n_moe, n_exp, k = plan.num_moe_layers, plan.num_experts, plan.top_k
    params_per_expert = plan.expert_params / (n_moe * n_exp)

    def costs(b: int) -> tuple[float, float]:
        touched = n_moe * expected_experts_touched(n_exp, k, b) * offloaded / n_exp
        tokens = n_moe * b * k * offloaded / n_exp  # token-expert pairs landing off the GPU
        move = touched * per_expert / link_bandwidth
        cpu = max(touched * per_expert / host_bw, 2 * params_per_expert * tokens / host_flops)
        return move, cpu

    move, cpu = costs(batch)
    crossover = next((b for b in (2**i for i in range(13)) if costs(b)[0] < costs(b)[1]), None)
    winner = "cpu_compute" if cpu <= move else "transfer"
    return {
        "link_bandwidth": link_bandwidth, "host_bandwidth": host_bw, "host_flops": host_flops,
        "transfer_seconds_per_step": move, "cpu_compute_seconds_per_step": cpu,
        "winner": winner,
        "decode_tokens_per_s_offloaded": batch / (step_s + min(move, cpu)),
        "transfer_wins_from_batch": crossover,
    }
