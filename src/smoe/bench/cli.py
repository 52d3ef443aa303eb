"""The layer benchmark's command line (``benchmarks/layer.py``, ``smoe bench``).

:func:`add_arguments` / :func:`settings_from_args` (the options), :func:`load_peers` (the
peers' adapters of ``benchmarks/peers.py`` in a source checkout), :func:`main_from_args` and
:func:`main` (run, print, write the JSON and the BENCHMARKS.md section).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from smoe.bench.candidates import Candidate, all_candidates
from smoe.bench.report import render_markdown, write_section
from smoe.bench.shapes import MODES, SHAPES, TOKENS, Settings
from smoe.bench.timing import run

# --- command line ---------------------------------------------------------------------------
def _csv(kind: Callable[[str], Any]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(t.strip()) for t in text.split(",") if t.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by ``benchmarks/layer.py`` and ``smoe bench``)."""
    p.add_argument("--shapes", type=_csv(str), default=None,
                   help=f"comma list of {', '.join(SHAPES)} (default: all)")
    p.add_argument("--tokens", type=_csv(int), default=None,
                   help=f"comma list of token counts (default: {','.join(map(str, TOKENS))})")
    p.add_argument("--modes", type=_csv(str), default=None, help="fwd, fwd+bwd (default: both)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7)")
    p.add_argument("--candidates", type=_csv(str), default=None,
                   help="comma list of names or globs, e.g. 'smoe,hf-*-grouped_mm' "
                        "(dense is always included)")
    p.add_argument("--quick", action="store_true",
                   help="a small subset for a smoke run (T 8,64; 3 rounds; short sweep)")
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                   help="run the expert-count sweep (default: yes)")
    p.add_argument("--sweep-experts", type=_csv(int), default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-call-s", type=float, default=None,
                   help="skip a candidate whose call takes longer (default 6 s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", default=None, help="write the report as JSON")
    p.add_argument("--write", metavar="PATH", nargs="?", const="BENCHMARKS.md", default=None,
                   help="replace the layer-bench section of BENCHMARKS.md (or PATH)")
    p.add_argument("--list", action="store_true", help="list the candidates and exit")


def settings_from_args(a: argparse.Namespace) -> Settings:
    over: dict[str, Any] = {}
    if a.shapes:
        bad = [s for s in a.shapes if s not in SHAPES]
        if bad:
            raise ValueError(f"--shapes: unknown {bad}; choose from {', '.join(SHAPES)}")
        over["shapes"] = a.shapes
    if a.tokens:
        if any(t <= 0 for t in a.tokens):
            raise ValueError("--tokens must be positive")
        over["tokens"] = a.tokens
    if a.modes:
        bad = [m for m in a.modes if m not in MODES]
        if bad:
            raise ValueError(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
        over["modes"] = a.modes
    if a.rounds is not None:
        if a.rounds < 1:
            raise ValueError("--rounds must be >= 1")
        over["rounds"] = a.rounds
    if a.candidates:
        over["candidates"] = a.candidates
    if a.sweep_experts:
        over["sweep_experts"] = a.sweep_experts
    if a.max_call_s is not None:
        over["max_call_s"] = a.max_call_s
    over.update(sweep=a.sweep, threads=a.threads, seed=a.seed)
    return Settings.quick_settings(**over) if a.quick else Settings(**over)


def find_peers_module(start: str | os.PathLike | None = None) -> Path | None:
    """``benchmarks/peers.py`` of a source checkout: beside the package (editable install)
    or under the current directory."""
    here = Path(__file__).resolve()
    for base in (Path(start) if start else None, here.parents[3], Path.cwd()):
        if base is not None and (base / "benchmarks" / "peers.py").is_file():
            return base / "benchmarks" / "peers.py"
    return None


def load_peers(path: str | os.PathLike | None = None) -> list[Candidate]:
    """The peer candidates of ``benchmarks/peers.py`` (``candidates()``), or none."""
    path = Path(path) if path else find_peers_module()
    if path is None:
        return []
    spec = importlib.util.spec_from_file_location("smoe_bench_peers", path)
    if spec is None or spec.loader is None:
        return []
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return list(mod.candidates())


def _command_line(prog: str | None, argv: Sequence[str]) -> str:
    if prog is None:
        a0 = sys.argv[0]
        prog = (f"python {os.path.relpath(a0)}" if a0.endswith(".py")
                else Path(a0).name or "smoe bench")
    return f"{prog} {shlex.join(list(argv))}".strip()


def main_from_args(a: argparse.Namespace, peers: Sequence[Candidate] | None = None,
                   command: str = "") -> int:
    if peers is None:
        peers = load_peers()
    if a.list:
        for c in all_candidates(peers):
            print(f"{c.name:28s} {c.label}")
        return 0
    settings = settings_from_args(a)
    report = run(settings, peers, command=command)
    md = render_markdown(report)
    print()
    print(md)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1, default=str) + "\n")
        print(f"wrote {a.json}")
    if a.write:
        write_section(a.write, md)
        print(f"wrote the layer-bench section of {a.write}")
    return 0


def main(argv: Sequence[str] | None = None, peers: Sequence[Candidate] | None = None,
         prog: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the package's docstring (the old single module's), not this module's
    doc = sys.modules[__package__].__doc__
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    add_arguments(p)
    a = p.parse_args(argv)
    return main_from_args(a, peers, command=_command_line(prog, argv))
