"""Accelerators the planner knows, links between them, and this machine's CPU measured.

Figures are the vendors' datasheet numbers for the SXM / OAM parts (memory in decimal GB as
marketed, HBM bandwidth, dense bf16 tensor FLOP/s without sparsity). Real kernels reach about
80-90% of the bandwidth and 40-70% of the FLOP/s; the planner reports the roofline (the bound),
not a promise.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = ["GPUS", "LINKS", "Hardware", "Link", "custom", "gpu", "link", "measure_cpu"]


@dataclass(frozen=True)
class Hardware:
    """One accelerator: ``memory`` bytes, ``bandwidth`` bytes/s, ``flops`` bf16 FLOP/s, and
    optionally what its decode reaches below the roofline (``kernel_rates``, ``layer_overhead``)."""

    name: str
    memory: float
    bandwidth: float
    flops: float
    source: str = "datasheet"
    #: bytes of stored weights per second a batch-1 matmul reads, per scheme (measured for
    #: ``cpu``: :func:`smoe.plan.cpu.measure_kernel_rates`); None: the bandwidth for every scheme.
    kernel_rates: dict[str, float] | None = None
    #: seconds per layer per decode step spent beyond reading weights (host dispatch, small
    #: ops; :func:`smoe.plan.cpu.measure_layer_overhead`); 0 for the pure roofline.
    layer_overhead: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


G = 1e9
#: name -> the accelerator (aliases in ``_ALIASES``).
GPUS: dict[str, Hardware] = {h.name: h for h in (
    Hardware("a100-40gb", 40 * G, 1555 * G, 312e12),
    Hardware("a100-80gb", 80 * G, 2039 * G, 312e12),
    Hardware("h100-80gb", 80 * G, 3350 * G, 989e12),
    Hardware("h200", 141 * G, 4800 * G, 989e12),
    Hardware("b200", 180 * G, 8000 * G, 2250e12),   # HGX B200: 180 GB usable of 192
    Hardware("l40s", 48 * G, 864 * G, 362e12),
    Hardware("rtx-4090", 24 * G, 1008 * G, 165e12),  # bf16 with fp32 accumulation
    Hardware("mi300x", 192 * G, 5300 * G, 1307e12),
)}
_ALIASES = {"a100": "a100-80gb", "a100-40": "a100-40gb", "a100-80": "a100-80gb",
            "h100": "h100-80gb", "h100-80": "h100-80gb", "h200-141gb": "h200", "4090": "rtx-4090",
            "rtx4090": "rtx-4090", "l40s-48gb": "l40s", "mi300": "mi300x"}


def gpu(name: str) -> Hardware:
    """The catalog entry for ``name`` (case-insensitive); ``ValueError`` lists the known ones."""
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in GPUS:
        raise ValueError(f"--gpu: unknown accelerator {name!r}; known: "
                         f"{', '.join([*GPUS, 'cpu'])} (or give --gpu-memory and --gpu-bandwidth)")
    return GPUS[key]


@dataclass(frozen=True)
class Link:
    """A link between devices: ``bandwidth`` bytes/s per GPU and direction. (The fixed cost of
    an all-to-all is the kernel's, not the link's: :data:`smoe.plan.comm.KERNEL_LATENCY`.)"""

    name: str
    bandwidth: float
    note: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Unidirectional per-GPU bandwidth. NVLink figures are half the marketed bidirectional ones.
LINKS: dict[str, Link] = {k.name: k for k in (
    Link("nvlink4", 450 * G, "H100/H200 NVLink 4: 900 GB/s bidirectional per GPU"),
    Link("nvlink3", 300 * G, "A100 NVLink 3: 600 GB/s bidirectional per GPU"),
    Link("nvlink-h800", 200 * G, "H800 NVLink: 400 GB/s bidirectional per GPU"),
    Link("nvlink5", 900 * G, "B200 NVLink 5: 1.8 TB/s bidirectional per GPU"),
    Link("ib-400g", 50 * G, "InfiniBand NDR / RoCE 400 Gb/s, one NIC per GPU"),
    Link("roce-400g", 50 * G, "RoCE 400 Gb/s, one NIC per GPU"),
    Link("pcie4-x16", 32 * G, "PCIe 4.0 x16: 32 GB/s per direction (about 25 usable)"),
    Link("pcie5-x16", 64 * G, "PCIe 5.0 x16: 64 GB/s per direction"),
)}


def link(name: str) -> Link:
    if name not in LINKS:
        raise ValueError(f"unknown link {name!r}; known: {', '.join(LINKS)}")
    return LINKS[name]


def _mem_total() -> float:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def measure_cpu(nbytes: int = 512 << 20, repeats: int = 5, *, measure_bandwidth: bool = True,
                measure_flops: bool = True, measure_decode: bool = False) -> Hardware:
    """This machine as the "accelerator": RAM size, the read bandwidth of a timed ``sum`` over a
    ``nbytes`` float32 tensor (well beyond any last-level cache; best of ``repeats``) and the
    float32 FLOP/s of a 2048^3 matmul (best of 3); with ``measure_decode`` also each scheme's
    batch-1 kernel rate and smoe's per-layer decode overhead (:mod:`smoe.plan.cpu`). A figure
    not measured is left at 0 for the caller to fill. Needs torch (imported here only)."""
    import torch

    bandwidth = flops = 0.0
    if measure_bandwidth:
        x = torch.ones(nbytes // 4, dtype=torch.float32)
        x.sum()  # fault the pages in
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - t)
        del x
        bandwidth = nbytes / best
    if measure_flops:
        a = torch.randn(2048, 2048)
        a @ a
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - t)
        flops = 2 * 2048**3 / best
    rates, overhead = None, 0.0
    if measure_decode:
        from smoe.plan.cpu import measure_kernel_rates, measure_layer_overhead

        rates = measure_kernel_rates(nbytes)
        overhead = measure_layer_overhead()
    what = [f"sum over {nbytes >> 20} MiB float32"] if measure_bandwidth else []
    what += ["2048^3 float32 matmul"] if measure_flops else []
    what += ["batch-1 kernel rates, per-layer decode overhead"] if measure_decode else []
    return Hardware("cpu", _mem_total(), bandwidth, flops,
                    source=f"measured: {', '.join(what) or 'memory size'}, "
                           f"{torch.get_num_threads()} threads",
                    kernel_rates=rates, layer_overhead=overhead)


def custom(base: Hardware | None, memory_gb: float | None, bandwidth_gbs: float | None,
           tflops: float | None) -> Hardware:
    """``base`` with any of its figures replaced (``--gpu-memory``/``--gpu-bandwidth``/
    ``--gpu-flops``), or a new accelerator from them alone."""
    for name, v in (("--gpu-memory", memory_gb), ("--gpu-bandwidth", bandwidth_gbs),
                    ("--gpu-flops", tflops)):
        if v is not None and not v > 0:
            raise ValueError(f"{name} must be > 0, got {v}")
    if base is None:
        if memory_gb is None or bandwidth_gbs is None:
            raise ValueError("--gpu-memory and --gpu-bandwidth are both needed without --gpu")
        base = Hardware("custom", memory_gb * G, bandwidth_gbs * G, (tflops or 100) * 1e12,
                        source="given")
    changes: dict[str, Any] = {}
    if memory_gb is not None:
        changes["memory"] = memory_gb * G
    if bandwidth_gbs is not None:
        changes["bandwidth"] = bandwidth_gbs * G
    if tflops is not None:
        changes["flops"] = tflops * 1e12
    if changes:
        changes["source"] = base.source + " (with given figures)"
    return replace(base, **changes)
