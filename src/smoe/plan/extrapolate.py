"""On paper: expert-parallel all-to-all time against expert compute time per MoE layer, for
catalog models at EP 8 to 1024, and the model held against DeepEP's published H800 figures.

``python -m smoe.plan.extrapolate`` prints the markdown tables of BENCHMARKS.md's section
"Expert-parallel communication on paper". Assumptions are printed beside the tables.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from smoe.plan.comm import (DEEPEP_LOW_LATENCY, DEEPEP_NORMAL_NVLINK_GBS, DEEPEP_NORMAL_RDMA_GBS,
                            KERNEL_LATENCY, CommConfig, comm_per_layer, deepep_config)
from smoe.plan.gpus import LINKS, gpu
from smoe.plan.result import PlanResult, plan_from_path
from smoe.plan.roofline import expected_experts_touched

__all__ = ["compute_seconds", "crossover_tokens", "main"]

TOKENS = tuple(2**i for i in range(17))  # tokens per rank per step scanned for the crossover


def compute_seconds(plan: PlanResult, ep: int, tokens: int, *, weight_bytes: float = 2.0,
                    device: str = "h100-80gb") -> float:
    """One rank's expert time for one MoE layer: ``tokens * K`` (token, expert) pairs spread
    evenly over the ranks' experts; max(FLOPs / peak, bytes of the touched local experts /
    HBM bandwidth)."""
    hw = gpu(device)
    n_exp, k = plan.num_experts, plan.top_k
    per_expert = plan.expert_params / (plan.num_moe_layers * n_exp)
    pairs = tokens * k                                   # arrive at each rank (balanced)
    local_experts = max(n_exp / ep, 1)
    # the ep * tokens tokens of the EP group touch experts; a rank reads its touched ones
    touched = expected_experts_touched(n_exp, k, tokens * ep) * local_experts / n_exp
    return max(2 * per_expert * pairs / hw.flops, touched * per_expert * weight_bytes /
               hw.bandwidth)


def _config(plan: PlanResult, ep: int, dispatch: str = "bf16") -> CommConfig:
    redundant = max(0, ep - plan.num_experts)  # more ranks than experts: one replica per rank
    return CommConfig(plan.hidden_size, plan.top_k, plan.num_experts, ep, redundant=redundant,
                      dispatch_dtype=dispatch, nodes_of=8, intra_bw=LINKS["nvlink4"].bandwidth,
                      inter_bw=LINKS["ib-400g"].bandwidth)


def crossover_tokens(plan: PlanResult, ep: int) -> tuple[int | None, int | None]:
    """(smallest scanned tokens-per-rank where the all-to-all takes longer than the experts,
    largest such count) -- ``None`` when communication never dominates."""
    c = _config(plan, ep)
    bound = [t for t in TOKENS if comm_per_layer(c, t).seconds > compute_seconds(plan, ep, t)]
    return (bound[0], bound[-1]) if bound else (None, None)


def _ep_table(names: Sequence[str], eps: Sequence[int], tokens: int) -> list[str]:
    rows = ["| model | EP | nodes | experts/GPU | expert GB/GPU (bf16) | local share | "
            "KB sent/token (dispatch+combine) | all-to-all us/layer | expert compute us/layer | "
            "comm/compute | comm bound for tokens/rank |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name in names:
        plan = plan_from_path(name)
        for ep in eps:
            c = _config(plan, ep)
            r = comm_per_layer(c, tokens)
            comp = compute_seconds(plan, ep, tokens)
            slots = (plan.num_experts + c.redundant) // ep
            per_gpu = slots * plan.expert_params * 2 / plan.num_experts  # bf16, all MoE layers
            lo, hi = crossover_tokens(plan, ep)
            bound = "never (scanned 1-65536)" if lo is None else (
                f">= {lo}" if hi == TOKENS[-1] else f"{lo}-{hi}")
            rows.append(
                f"| {name} | {ep} | {max(1, ep // 8)} | {slots} | {per_gpu / 1e9:.1f} | "
                f"{r.local_fraction:.3f} | {(r.dispatch_bytes + r.combine_bytes) / 1e3:.1f} | "
                f"{r.seconds * 1e6:.0f} | {comp * 1e6:.0f} | {r.seconds / comp:.2f} | {bound} |")
    return rows


def _deepep_table() -> list[str]:
    rows = ["| EP | dispatch us (DeepEP) | model | error | combine us (DeepEP) | model | error |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
    for ep, (d_us, c_us) in DEEPEP_LOW_LATENCY.items():
        r = comm_per_layer(deepep_config(ep), tokens=128)
        d, c = r.dispatch_seconds * 1e6, r.combine_seconds * 1e6
        rows.append(f"| {ep} | {d_us} | {d:.0f} | {d / d_us - 1:+.0%} | {c_us} | {c:.0f} | "
                    f"{c / c_us - 1:+.0%} |")
    intra = comm_per_layer(deepep_config(8, "per_rank"), tokens=4096)
    nv = 4096 * intra.dispatch_bytes / intra.dispatch_seconds / 1e9
    rdma = []
    for ep in (16, 32, 64):
        r = comm_per_layer(deepep_config(ep, "per_rank"), tokens=4096)
        rdma.append(4096 * r.dispatch_bytes * (1 - r.intra_fraction) / r.dispatch_seconds / 1e9)
    rows += ["", f"Normal kernels (4096 tokens per rank, deduplicated per rank): NVLink inside a "
                 f"node, EP 8: model {nv:.0f} GB/s vs DeepEP {DEEPEP_NORMAL_NVLINK_GBS[0]}-"
                 f"{DEEPEP_NORMAL_NVLINK_GBS[1]} GB/s; RDMA across nodes, EP 16/32/64: model "
                 f"{'/'.join(f'{x:.0f}' for x in rdma)} GB/s vs DeepEP "
                 f"{DEEPEP_NORMAL_RDMA_GBS[0]}-{DEEPEP_NORMAL_RDMA_GBS[1]} GB/s."]
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smoe.plan.extrapolate", description=__doc__)
    p.add_argument("--models", nargs="+", default=["mixtral-8x7b", "deepseek-v3"])
    p.add_argument("--ep", nargs="+", type=int, default=[8, 64, 256, 1024])
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank per step")
    a = p.parse_args(argv)
    h100 = gpu("h100-80gb")
    lines = [f"Per MoE layer, {a.tokens} tokens per rank per step, bf16 dispatch and combine, "
             "dropless, uniform routing.", ""]
    lines += _ep_table(a.models, a.ep, a.tokens)
    lines += ["", "Assumptions: nodes of 8 GPUs; NVLink 4 at "
              f"{LINKS['nvlink4'].bandwidth / 1e9:.0f} GB/s per GPU and direction inside a "
              f"node, 400 Gb/s ({LINKS['ib-400g'].bandwidth / 1e9:.0f} GB/s) per GPU across; "
              f"{KERNEL_LATENCY * 1e6:.0f} us fixed cost per dispatch and per combine (fitted "
              "on DeepEP, below); links run at their stated bandwidth. Rows per token: "
              "K x (1 - local share) (smoe's per-expert all-to-all). Expert compute: H100 "
              f"({h100.flops / 1e12:.0f} TFLOP/s bf16, {h100.bandwidth / 1e9:.0f} GB/s), "
              "max(2 x expert params x K x tokens / peak, touched local experts' bf16 bytes / "
              "HBM bandwidth), perfectly balanced. More ranks than experts (Mixtral at EP >= 64): "
              "one expert replica per rank (R = EP - E redundant experts; a token's expert is "
              "local with probability 1/E). No overlap of communication with compute "
              "(DeepSeek's dual micro-batch overlap hides up to min(comm, compute)). "
              "'comm bound for tokens/rank': the scanned range (powers of 2, 1-65536) where the "
              "all-to-all takes longer than the experts.", "",
              "DeepEP's published H800 figures (DeepSeek-V3 layer: hidden 7168, top-8 of 256, "
              "FP8 dispatch with a scale per 128 values, BF16 combine; nodes of 8, NVLink "
              "160 GB/s, CX7 RDMA 50 GB/s) against the model, low-latency kernels at 128 tokens "
              "per rank:", ""]
    lines += _deepep_table()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
