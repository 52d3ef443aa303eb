"""The command-line half of ``smoe plan``: hardware from the flags, every figure as a dict, and
the human-readable table of the hardware, roofline and communication figures."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

from smoe.plan.gpus import LINKS, Hardware, custom, gpu, measure_cpu
from smoe.plan.result import PlanResult
from smoe.plan.roofline import Schemes, hardware_plan

__all__ = ["comm_table", "format_hardware", "hardware_from_args", "plan_args"]

DEFAULT_GPU = "h100-80gb"


def hardware_from_args(a: argparse.Namespace) -> Hardware:
    """``--gpu`` (default h100-80gb; ``cpu`` measures this machine unless ``--gpu-bandwidth``
    is given) with ``--gpu-memory/--gpu-bandwidth/--gpu-flops`` applied."""
    name = a.gpu
    if name is None and (a.gpu_memory is not None and a.gpu_bandwidth is not None):
        return custom(None, a.gpu_memory, a.gpu_bandwidth, a.gpu_flops)
    name = name or DEFAULT_GPU
    overhead = getattr(a, "layer_overhead_us", None)
    if overhead is not None and not overhead >= 0:
        raise ValueError(f"--layer-overhead-us must be >= 0, got {overhead}")
    if name.lower() == "cpu":
        custom(Hardware("cpu", 1, 1, 1), a.gpu_memory, a.gpu_bandwidth, a.gpu_flops)
        measured = measure_cpu(measure_bandwidth=a.gpu_bandwidth is None,
                               measure_flops=a.gpu_flops is None,
                               measure_decode=a.gpu_bandwidth is None)
        hw = custom(measured, a.gpu_memory, a.gpu_bandwidth, a.gpu_flops)
    else:
        hw = custom(gpu(name), a.gpu_memory, a.gpu_bandwidth, a.gpu_flops)
    return hw if overhead is None else replace(hw, layer_overhead=overhead * 1e-6)


def comm_table(plan: PlanResult, ep: int, *, tokens: int, nodes_of: int | None,
               dispatch_dtype: str = "bf16", intra: str = "nvlink4", inter: str = "ib-400g",
               **options: Any) -> dict[str, Any]:
    """All-to-all figures of one MoE layer of ``plan`` at EP degree ``ep``; ``options`` go to
    :class:`smoe.plan.comm.CommConfig` (redundant, capacity_factor, local_fraction, mode,
    latency)."""
    from smoe.plan.comm import CommConfig, comm_per_layer

    if not plan.num_moe_layers:
        raise ValueError("the model has no MoE layers")
    for name in (intra, inter):
        if name not in LINKS:
            raise ValueError(f"unknown link {name!r}; known: {', '.join(LINKS)}")
    c = CommConfig(plan.hidden_size, plan.top_k, plan.num_experts, ep,
                   dispatch_dtype=dispatch_dtype, nodes_of=nodes_of,
                   intra_bw=LINKS[intra].bandwidth, inter_bw=LINKS[inter].bandwidth,
                   **{k: v for k, v in options.items() if v is not None})
    r = comm_per_layer(c, tokens)
    return {"ep": ep, "nodes_of": nodes_of, "redundant": c.redundant,
            "capacity_factor": c.capacity_factor, "mode": c.mode, "latency": c.latency,
            "intra_link": LINKS[intra].to_dict(),
            "inter_link": LINKS[inter].to_dict(), "dispatch_dtype": dispatch_dtype,
            **r.to_dict(),
            "seconds_all_moe_layers": r.seconds * plan.num_moe_layers}


def plan_args(plan: PlanResult, hw: Hardware, a: argparse.Namespace) -> dict[str, Any]:
    """Every figure of the hardware half (:func:`hardware_plan`, and :func:`comm_table` with
    ``--ep``) from the parsed flags; bad values raise a one-line ``ValueError``."""
    for flag in ("host_bandwidth", "link_bandwidth"):
        if not getattr(a, flag) > 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be > 0, got {getattr(a, flag)}")
    for flag in ("ep", "nodes_of", "tokens"):
        v = getattr(a, flag)
        if v is not None and v < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, got {v}")
    weights = a.weights
    kv = a.kv_dtype or ("fp32" if weights == "fp32" else "bf16")
    host = Hardware("host", 0, a.host_bandwidth * 1e9, 1e12) if hw.name != "cpu" else hw
    out = hardware_plan(plan, hw, count=a.count,
                        schemes=Schemes(weights, a.experts, a.attention), context=a.context,
                        batch=a.batch, kv_dtype=kv, host=host, reserve=a.reserve,
                        link_bandwidth=a.link_bandwidth * 1e9, compare_offload=hw.name != "cpu")
    if a.ep is not None:
        try:
            latency = None if a.latency_us is None else a.latency_us * 1e-6
            out["comm"] = comm_table(plan, a.ep, tokens=a.tokens or a.batch,
                                     nodes_of=a.nodes_of, dispatch_dtype=a.comm_dtype,
                                     intra=a.intra_link, inter=a.inter_link,
                                     redundant=a.redundant, capacity_factor=a.capacity_factor,
                                     local_fraction=a.local_fraction, mode=a.comm_mode,
                                     latency=latency)
        except ValueError as exc:
            raise ValueError(f"--ep {a.ep}: {exc}") from None
    return out


def _gb(b: float) -> str:
    return f"{b / 1e9:,.2f} GB"


def format_hardware(d: dict[str, Any]) -> str:
    """The hardware, roofline and communication figures of :func:`plan_args` as text."""
    hw = d["hardware"]
    lines = [f"on {hw['count']} x {hw['name']} ({hw['memory'] / 1e9:.0f} GB, "
             f"{hw['bandwidth'] / 1e9:.0f} GB/s, {hw['flops'] / 1e12:.0f} TFLOP/s; "
             f"{hw['source']}), {int(hw['reserve'] * 100)}% kept free",
             f"context {d['context']}, batch {d['batch']}, KV cache {d['kv_dtype']}", ""]
    lines.append("weights by part:")
    for part, b in d["weights_bytes_by_part"].items():
        lines.append(f"  {part:<16}{d['schemes'][part]:>6}  {_gb(b):>14}")
    lines.append(f"  {'total':<22}  {_gb(d['weights_bytes']):>14}")
    lines.append(f"KV cache: {d['kv_bytes_per_token'] / 1e3:,.1f} KB per token, "
                 f"{_gb(d['kv_bytes'])} for batch x context")
    for g in d["kv_layers"]:
        what = (f"state {g['state']:,} elements per sequence" if g["kind"] == "state" else
                f"{g['per_token']:,} elements per token" +
                (f", window {g['window']}" if g["window"] else ""))
        lines.append(f"  {g['layers']:>3} {g['kind']:<8} layers: {what}")
    fit = "fits" if d["fits"] else "does NOT fit"
    lines.append(f"memory needed {_gb(d['memory_needed_bytes'])}: {fit} on {hw['count']}; "
                 f"GPUs needed: {d['gpus_needed']}")
    off = d["offload"]
    if not off["enough"]:
        lines.append("offload: the non-expert weights and the KV cache alone exceed the GPUs; "
                     "offloading experts is not enough (add GPUs or quantize)")
    if off["experts_per_layer_offloaded"]:
        lines.append(f"offload: keep {off['experts_per_layer_on_gpu']} experts per layer on the "
                     f"GPUs, {off['experts_per_layer_offloaded']} per layer in host memory "
                     f"({_gb(off['offloaded_bytes'])})")
        if "winner" in off:
            move_ms = off["transfer_seconds_per_step"] * 1e3
            cpu_ms = off["cpu_compute_seconds_per_step"] * 1e3
            lines.append(f"  per decode step: move them {move_ms:.1f} ms vs compute on the host "
                         f"{cpu_ms:.1f}"
                         f" ms -> {off['winner'].replace('_', ' ')} wins; "
                         f"{off['decode_tokens_per_s_offloaded']:.1f} tokens/s; transfer wins "
                         f"from batch {off['transfer_wins_from_batch']}")
    lines.append(f"decode roofline ({d['decode_bound']} bound): "
                 f"{_gb(d['decode_bytes_per_step'])} read per step -> "
                 f"{d['decode_tokens_per_s']:,.1f} tokens/s per sequence, "
                 f"{d['decode_tokens_per_s_batch']:,.1f} tokens/s for the batch")
    if "decode_expected" in d:
        e = d["decode_expected"]
        rates = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in e["kernel_rates"].items())
        lines.append(f"decode expected with measured kernels ({rates or 'bandwidth'} GB/s) and "
                     f"{e['layer_overhead'] * 1e6:.0f} us per layer: {e['tokens_per_s']:,.1f} "
                     f"tokens/s per sequence ({e['step_seconds'] * 1e3:.2f} ms per step, "
                     f"{e['overhead_seconds'] * 1e3:.2f} ms of it overhead)")
    lines.append(f"prefill: {d['prefill_flops']:.3g} FLOPs -> {d['prefill_seconds']:.3g} s "
                 "at peak")
    if "comm" in d:
        c = d["comm"]
        where = f", nodes of {c['nodes_of']}" if c["nodes_of"] else ""
        lines += ["", f"expert parallel EP {c['ep']}{where} ({c['intra_link']['name']} inside, "
                      f"{c['inter_link']['name']} across), {c['tokens']} tokens per rank:",
                  f"  local share {c['local_fraction']:.3f}; per token per MoE layer: "
                  f"{c['rows_sent']:.2f} rows, dispatch {c['dispatch_bytes'] / 1e3:,.1f} KB, "
                  f"combine {c['combine_bytes'] / 1e3:,.1f} KB sent (as many received)",
                  f"  per MoE layer: dispatch {c['dispatch_seconds'] * 1e6:,.1f} us + combine "
                  f"{c['combine_seconds'] * 1e6:,.1f} us; all MoE layers "
                  f"{c['seconds_all_moe_layers'] * 1e3:,.2f} ms"]
    return "\n".join(lines)
