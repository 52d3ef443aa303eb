"""Side-by-side timing of one MoE layer: smoe against the dense ideal, transformers and peers.

Everything is measured in ONE process, float32, on a fixed number of threads (2 by default).
The candidates of a row run INTERLEAVED: each round runs every candidate once, in an order
shuffled per round, so that a slow drift of the machine (turbo, another process) hits all of
them alike. A candidate's figure is the median over rounds, after warm-up; its ratio is the
median over rounds of t(candidate) / t(dense ideal) measured in the same round.

Candidates (``name``: what it is):

* ``dense``: the ideal, a dense SwiGLU FFN of width K*f (+ the shared experts' width): the
  FLOPs a sparse layer cannot go below. It is the denominator of every ratio.
* ``smoe``: ``smoe.MoELayer`` with ``router="softmax_topk"``, no losses.
* ``all-experts``: every expert computed for every token, weighted by the router: what
  sparsity avoids.
* ``hf-{mixtral,qwen3,olmoe}-{eager,grouped_mm,batched_mm}``: transformers' sparse MoE blocks
  built from tiny configs, with each experts implementation (``experts_implementation=`` in the
  config; the ``@use_experts_implementation`` decorator dispatches on it at every forward).
* peers (torchtitan, fairscale, ...): adapters handed in by the caller
  (``benchmarks/peers.py``); a peer that cannot be built or run is shown as ``n/a (reason)``.

Legend: T tokens, d hidden, f expert width, E (= N) experts, K experts per token.

The package's modules: ``shapes`` (shapes, modes, settings), ``candidates`` (what is timed),
``timing`` (the interleaved timing loop, ``run``), ``report`` (markdown, ``write_section``),
``cli`` (the command line, ``main``). Everything is re-exported here, as ``smoe.bench.X``.
"""

from __future__ import annotations

from smoe.bench.shapes import (
    BACKWARD_MIN_TOKENS, DENSE, FWD, FWD_BWD, MODES, QUICK_SHAPES, SHAPES, SWEEP_CANDIDATES,
    SWEEP_EXPERTS, SWEEP_TOKENS, TOKENS, Settings, Shape, _selected, sweep_shape,
)
from smoe.bench.candidates import (
    BATCHED_MM_LIMIT_BYTES, HF_BACKENDS, HF_BLOCKS, INIT_STD, AllExperts, Built, Candidate, Skip,
    SwiGLU, _batched_mm_limit, _build_all_experts, _build_dense, _build_smoe, _built,
    _hf_builder, all_candidates, builtin_candidates, hf_block, init_weights,
    transformers_candidates, with_shared,
)
from smoe.bench.timing import (
    PREDICT_MIN_TOKENS, _build_entries, _close, _Entry, _loadavg, _one_call, _row_line,
    _short_error, _smoe_vs_hf, _sweep_ratios, _timed, machine_info, measure_row, run,
)
from smoe.bench.report import (
    MARK_END, MARK_START, _cell, _fmt, _fmt_ms, _load_text, _sweep_markdown, _table,
    render_markdown, write_section,
)
from smoe.bench.cli import (
    _command_line, _csv, add_arguments, find_peers_module, load_peers, main, main_from_args,
    settings_from_args,
)

__all__ = [
    "Shape",
    "SHAPES",
    "QUICK_SHAPES",
    "TOKENS",
    "SWEEP_EXPERTS",
    "Skip",
    "Built",
    "Candidate",
    "SwiGLU",
    "AllExperts",
    "builtin_candidates",
    "transformers_candidates",
    "init_weights",
    "Settings",
    "run",
    "render_markdown",
    "write_section",
    "add_arguments",
    "main",
    "MARK_START",
    "MARK_END",
]
