"""`smoe plan`: parameters, memory, KV cache, fit, decode/prefill rooflines and expert-parallel
communication of a model from its config."""

from __future__ import annotations

import argparse

__all__ = ["register_plan"]


def register_plan(sub: argparse._SubParsersAction) -> None:
    schemes = "fp32, bf16, fp16, fp8, int8, int4"
    p = sub.add_parser(
        "plan", help="what a MoE model needs: parameters, weight and KV-cache memory, GPUs, "
                     "decode/prefill rooflines, expert-parallel communication (from its config)",
        description="Plan a model from its config alone (transformers not needed). CONFIG is a "
                    "config.json, a folder holding one (a Hugging Face model or a smoe run), or "
                    "a catalog name: deepseek-v3, dbrx, gpt-oss-120b, grok-1, llama-3-70b, "
                    "llama-4-maverick, mixtral-8x7b, qwen3-235b-a22b.")
    p.add_argument("config", metavar="CONFIG", help="config.json, a folder, or a catalog name")
    p.add_argument("--json", action="store_true", help="print every figure as JSON")
    hw = p.add_argument_group("hardware")
    hw.add_argument("--gpu", default=None,
                    help="a100-40gb, a100-80gb, h100-80gb, h200, b200, l40s, rtx-4090, mi300x, "
                         "or cpu (measures this machine's memory bandwidth, and, without "
                         "--gpu-bandwidth, its batch-1 kernel rates and per-layer decode "
                         "overhead for an expected decode speed); default h100-80gb")
    hw.add_argument("--count", type=int, default=1, help="number of GPUs (default 1)")
    hw.add_argument("--gpu-memory", type=float, metavar="GB",
                    help="memory per GPU in GB (overrides the catalog)")
    hw.add_argument("--gpu-bandwidth", type=float, metavar="GB/s",
                    help="memory bandwidth per GPU in GB/s (overrides; with --gpu cpu skips the "
                         "measurement)")
    hw.add_argument("--reserve", type=float, default=0.1, metavar="FRACTION",
                    help="share of each GPU's memory kept free for activations and the runtime "
                         "(default 0.1); the rest is the budget for weights and KV cache")
    hw.add_argument("--gpu-flops", type=float, metavar="TFLOP/s",
                    help="peak bf16 TFLOP/s per GPU (overrides the catalog)")
    hw.add_argument("--layer-overhead-us", type=float, default=None, metavar="US",
                    help="host time per layer per decode step beyond reading weights, added to "
                         "the expected decode time (--gpu cpu measures it on a small smoe "
                         "model, with each scheme's batch-1 kernel rate)")
    w = p.add_argument_group("weights and cache")
    w.add_argument("--weights", default="bf16", help=f"scheme of all weights ({schemes}); "
                                                     "default bf16")
    w.add_argument("--experts", default=None, help="scheme of the routed experts (default: "
                                                   "--weights)")
    w.add_argument("--attention", default=None, help="scheme of attention (default: --weights)")
    w.add_argument("--context", type=int, default=4096,
                   help="tokens per sequence (default 4096)")
    w.add_argument("--batch", type=int, default=1, help="sequences (default 1)")
    w.add_argument("--kv-dtype", default=None,
                   help="KV-cache dtype: fp32, bf16, fp16, fp8, int8, int4 (default bf16; fp32 "
                        "with --weights fp32)")
    w.add_argument("--host-bandwidth", type=float, metavar="GB/s", default=100.0,
                   help="host memory bandwidth for offloaded experts computed on the CPU "
                        "(default 100)")
    w.add_argument("--link-bandwidth", type=float, metavar="GB/s", default=25.0,
                   help="host-to-GPU bandwidth for moving offloaded experts (default 25, PCIe "
                        "4.0 x16)")
    ep = p.add_argument_group("expert parallelism")
    ep.add_argument("--ep", type=int, default=None, metavar="D",
                    help="print the all-to-all bytes and time per MoE layer at EP degree D")
    ep.add_argument("--nodes-of", type=int, default=None, metavar="G",
                    help="GPUs per node: NVLink inside a node, the network across")
    ep.add_argument("--tokens", type=int, default=None,
                    help="tokens per rank per step for --ep (default --batch)")
    ep.add_argument("--comm-dtype", default="bf16", help="dispatch dtype: bf16 or fp8 (default "
                                                          "bf16; combine is bf16)")
    ep.add_argument("--redundant", type=int, default=0, metavar="R",
                    help="redundant expert replicas (EPLB); E + R must be a multiple of D")
    ep.add_argument("--capacity-factor", type=float, default=None, metavar="CF",
                    help="padded capacity-factor all-to-all (default: dropless)")
    ep.add_argument("--local-fraction", type=float, default=None, metavar="F",
                    help="measured share of a token's experts on its own rank (default: "
                         "uniform, (E + R) / (D * E))")
    ep.add_argument("--comm-mode", default="per_expert", choices=("per_expert", "per_rank"),
                    help="rows per (token, remote expert), or once per remote rank (DeepEP "
                         "normal kernels)")
    ep.add_argument("--intra-link", default="nvlink4",
                    help="link inside a node: nvlink3, nvlink4, nvlink5, nvlink-h800, "
                         "pcie4-x16, pcie5-x16 (default nvlink4)")
    ep.add_argument("--inter-link", default="ib-400g",
                    help="link across nodes: ib-400g, roce-400g, pcie4-x16, ... (default ib-400g)")
    ep.add_argument("--latency-us", type=float, default=None,
                    help="fixed cost per dispatch / combine kernel in us (default 40, fitted on "
                         "DeepEP's H800 figures)")

    def run(a: argparse.Namespace) -> int:
        import json

        from smoe.plan import format_plan, plan_from_path
        from smoe.plan.report import format_hardware, hardware_from_args, plan_args

        result = plan_from_path(a.config)
        hw = hardware_from_args(a)
        extra = plan_args(result, hw, a)
        if a.json:
            print(json.dumps({**result.to_dict(), **extra}, indent=2))
        else:
            print(format_plan(result))
            print()
            print(format_hardware(extra))
        return 0

    p.set_defaults(handler=run)


REGISTER = (register_plan,)
