"""Process-level set-up for CPU work: preload tcmalloc before torch allocates anything.

Why: on CPU, torch gets large tensors from glibc's ``mmap``; every fresh allocation of a big
activation or gradient is then re-faulted page by page, and ``free`` returns it to the kernel.
An MoE layer's backward writes one gradient per expert weight (E times a dense FFN's), so it
pays this most: measured here, filling a fresh 64 MiB tensor took 13 ms under glibc and 1.3 ms
under tcmalloc, which keeps freed memory for reuse (benchmarks/layer.py, BENCHMARKS.md). This is
the allocator advice Intel gives for PyTorch on CPU; it changes speed, never results.

The library never does this on import; entry points (``smoe train``, ``smoe bench``, the demo)
call :func:`reexec_with_tcmalloc` first. Set ``SMOE_NO_TCMALLOC=1`` to opt out.
"""

from __future__ import annotations

import os
import sys

__all__ = ["TCMALLOC_PATHS", "find_tcmalloc", "reexec_with_tcmalloc"]

TCMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4",
)


def find_tcmalloc() -> str | None:
    for path in TCMALLOC_PATHS:
        if os.path.exists(path):
            return path
    return None


def reexec_with_tcmalloc() -> None:
    """Re-run this process with tcmalloc preloaded, if it is installed and not loaded yet.

    Returns normally (doing nothing) when tcmalloc is missing, already preloaded, opted out,
    or not on Linux; otherwise it does not return (``os.execve`` keeps the PID).
    """
    if not sys.platform.startswith("linux") or os.environ.get("SMOE_NO_TCMALLOC"):
        return
    preload = os.environ.get("LD_PRELOAD", "")
    if "tcmalloc" in preload:
        return
    lib = find_tcmalloc()
    if lib is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = f"{lib}:{preload}" if preload else lib
    argv = list(getattr(sys, "orig_argv", [sys.executable] + sys.argv))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + argv[1:], env)
