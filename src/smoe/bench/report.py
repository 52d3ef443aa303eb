"""The layer benchmark's output: the markdown section of BENCHMARKS.md and its writing.

:func:`render_markdown` turns a report (from :func:`smoe.bench.run`) into tables;
:func:`write_section` replaces a marked section of BENCHMARKS.md atomically (used by every
benchmark script). The JSON report is :func:`smoe.bench.run`'s return value as is.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from smoe.bench.shapes import BACKWARD_MIN_TOKENS, FWD, FWD_BWD, MODES

MARK_START = "<!-- layer-bench:start -->"
MARK_END = "<!-- layer-bench:end -->"


# --- output ---------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _fmt_ms(x: float) -> str:
    return f"{x:.3g}" if x < 1000 else f"{x:.0f}"


def _cell(r: dict[str, Any] | None, key: str, rounds: int) -> str:
    if r is None:
        return "–"
    if "skipped" in r:
        return f"n/a ({r['skipped']})"
    if key not in r:
        return "–"
    text = _fmt(r[key]) if key != "median_ms" else _fmt_ms(r[key])
    if r.get("rounds", rounds) < rounds:
        text += f" ({r['rounds']}r)"
    return text


def _table(rows: list[dict[str, Any]], names: list[str], labels: dict[str, str], key: str,
           rounds: int, with_verdict: bool) -> list[str]:
    cols = [f"{r['shape']} T{r['tokens']}" for r in rows]
    out = ["| candidate | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for n in names:
        if not any(n in r["results"] for r in rows):
            continue
        cells = [_cell(r["results"].get(n), key, rounds) for r in rows]
        out.append(f"| {labels.get(n, n)} (`{n}`) | " + " | ".join(cells) + " |")
    if with_verdict:
        cells = []
        for r in rows:
            v = r.get("smoe_vs_transformers")
            if not v:
                cells.append("–")
                continue
            word = "faster" if v["speedup"] >= 1 else "slower"
            factor = v["speedup"] if v["speedup"] >= 1 else 1 / v["speedup"]
            cells.append(f"{word} {factor:.2f}x vs `{v['best'].removeprefix('hf-')}`")
        out.append("| **smoe vs best transformers** | " + " | ".join(cells) + " |")
    return out


def render_markdown(report: dict[str, Any]) -> str:
    """The BENCHMARKS.md section (without the markers)."""
    m = report["machine"]
    s = report["settings"]
    labels = report["candidates"]
    names = list(labels)
    v = m["versions"]
    peers = ", ".join(f"{p} {v[p]}" for p in ("torchtitan", "fairscale", "mixture-of-experts",
                                               "st-moe-pytorch") if v.get(p))
    L = ["## MoE layer: smoe against the dense ideal, transformers and peers", ""]
    if s.get("quick"):
        L += ["*Quick smoke run (`--quick`): few rounds and tokens; not for conclusions.*", ""]
    L += [f"Measured {m['date']} on {m['cpu']} ({', '.join(m['isa']) or 'ISA ?'}), "
          f"{s['threads']} thread{'s' if s['threads'] != 1 else ''}, allocator {m.get('allocator', '?')} "
          f"(the same for every candidate), float32, torch {v.get('torch')}, transformers "
          f"{v.get('transformers')}, Python {m['python']}"
          + (f"; peers: {peers}" if peers else "") + ".",
          "",
          f"Command: `{report['command']}` (took {report['elapsed_s'] / 60:.1f} min"
          + _load_text(m) + ").",
          "",
          "Method: one process; for each shape, token count and mode, every candidate is "
          f"warmed up, then runs once per round in a shuffled order for {s['rounds']} rounds "
          "(a fast call is repeated within a round to last about "
          f"{s['target_ms']:g} ms). A ratio is the median over rounds of t(candidate) / "
          "t(dense ideal) in the same round: **1.0 is the dense SwiGLU FFN of width K*f "
          "(+ the shared width) doing the same useful FLOPs; lower is better**. "
          f"`(3r)`: a candidate slower than {s['slow_call_s']:g} s per call measured over fewer "
          f"rounds; `> {s['max_call_s']:g} s/call`: skipped to keep the run short. Forward "
          "runs under `torch.no_grad()` in eval mode; forward+backward (T >= "
          f"{BACKWARD_MIN_TOKENS}) calls `y.backward(g)` with a materialised random g and "
          "includes the input's gradient.",
          "",
          "| shape | d | f | E | K | shared | dense ideal width |",
          "|---|---|---|---|---|---|---|"]
    for n, sh in s["shapes"].items():
        L.append(f"| {n} | {sh['d']} | {sh['f']} | {sh['E']} | {sh['K']} | {sh['shared']} | "
                 f"{sh['K'] * sh['f'] + sh['shared']} |")
    L.append("")
    rows = report["rows"]
    for mode, title in ((FWD_BWD, "Forward + backward (training)"),
                        (FWD, "Forward only (inference)")):
        mrows = [r for r in rows if r["mode"] == mode]
        if not mrows:
            continue
        L += [f"### {title}: time / dense ideal", ""]
        L += _table(mrows, names, labels, "ratio", s["rounds"], with_verdict=True)
        L += ["", f"### {title}: median time per call (ms)", ""]
        L += _table(mrows, names, labels, "median_ms", s["rounds"], with_verdict=False)
        L.append("")
    if report["sweep"]:
        L += _sweep_markdown(report, labels)
    reasons: dict[tuple[str, str], list[str]] = {}
    for r in rows + report["sweep"]:
        for n, res in r["results"].items():
            if "skipped" in res:
                reasons.setdefault((n, res["detail"]), []).append(
                    f"{r['shape']} T{r['tokens']} {r['mode']}")
    if report.get("notes") or reasons:
        L += ["### Notes", ""]
        by_note: dict[str, list[str]] = {}
        for n, note in report.get("notes", {}).items():
            by_note.setdefault(note, []).append(f"`{n}`")
        for note, who in by_note.items():
            L.append(f"- {', '.join(who)}: {note}.")
        for (n, detail), where in reasons.items():
            span = ", ".join(where) if len(where) <= 4 else f"{len(where)} rows"
            L.append(f"- `{n}` not measured ({span}): {detail}")
        L.append("")
    return "\n".join(L).rstrip() + "\n"


def _load_text(m: dict[str, Any]) -> str:
    la = m.get("load_average") or {}
    if la.get("start") is None:
        return ""
    return f"; 1-min load average {la['start']:.1f} at the start, {la['end']:.1f} at the end"


def _sweep_markdown(report: dict[str, Any], labels: dict[str, str]) -> list[str]:
    sw = report["sweep"]
    T = sw[0]["tokens"]
    Ns = sorted({int(r["shape"][1:]) for r in sw})
    d, f = report["settings"]["sweep_width"]
    L = [f"### Expert-count sweep: d{d} f{f} K2, T={T} (cost per token should stay flat)", "",
         "Cells: µs per token (ratio to N=" + str(Ns[0]) + "; ratio to the dense ideal).", "",
         "| candidate | mode | " + " | ".join(f"N={n}" for n in Ns) + " |",
         "|---|---|" + "---|" * len(Ns)]
    names = [n for n in labels if any(n in r["results"] for r in sw)]
    for mode in MODES:
        for n in names:
            cells = []
            for N in Ns:
                row = next((r for r in sw if r["shape"] == f"N{N}" and r["mode"] == mode), None)
                res = row["results"].get(n) if row else None
                if row is None or res is None:
                    cells.append("–")
                elif "skipped" in res:
                    cells.append(f"n/a ({res['skipped']})")
                else:
                    cells.append(f"{res['us_per_token']:.2f} ({res['ratio_to_first_N']:.2f}; "
                                 f"{res.get('ratio', float('nan')):.2f})")
            if any(c != "–" for c in cells):
                L.append(f"| `{n}` | {mode} | " + " | ".join(cells) + " |")
    L.append("")
    return L


def write_section(path: str | os.PathLike, section: str, start: str = MARK_START,
                  end: str = MARK_END) -> None:
    """Replace the text between the ``start``/``end`` markers in ``path`` (create it if
    missing, append the section if it has no markers); written atomically (tmp + os.replace).
    Every benchmark script writes its own section of BENCHMARKS.md through this."""
    path = Path(path)
    block = f"{start}\n{section.rstrip()}\n{end}"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    i, j = old.find(start), old.find(end)
    if i != -1 and j > i:
        new = old[:i] + block + old[j + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(new)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
