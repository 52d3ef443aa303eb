"""Time one MoE layer: smoe against the dense ideal, transformers' blocks and peers.

    python benchmarks/layer.py --quick            # smoke run, about a minute
    python benchmarks/layer.py --write            # full run, writes BENCHMARKS.md's section
    python benchmarks/layer.py --json out.json --shapes mixtral --tokens 1024

The same as ``smoe bench``. The harness (shapes, interleaved timing, tables) is
``smoe.bench``; the peers' adapters are ``benchmarks/peers.py``, used when importable.
"""

from __future__ import annotations

import sys
from pathlib import Path

from smoe import bench


def _peers() -> list[bench.Candidate]:
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        import peers
    except ImportError as exc:  # smoe.bench itself must work without the peers
        print(f"benchmarks/peers.py not importable ({exc}): peers skipped", file=sys.stderr)
        return []
    return peers.candidates()


if __name__ == "__main__":
    from smoe.launch import reexec_with_tcmalloc

    reexec_with_tcmalloc()  # every candidate runs under the same allocator (smoe.launch)
    sys.exit(bench.main(peers=_peers()))
