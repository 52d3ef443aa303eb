"""The layer benchmark (smoe.bench, benchmarks/layer.py, ``smoe bench``): a quick smoke run
gives a well-formed report, and every candidate computes the same kind of thing as smoe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from smoe import MoEConfig, MoELayer, bench
from smoe.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "benchmarks" / "peers.py"


def _peers() -> list[bench.Candidate]:
    return bench.load_peers(PEERS) if PEERS.exists() else []


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_run_report(tmp_path, capsys):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "BENCHMARKS.md"
    rc = cli_main(["bench", "--quick", "--threads", "1", "--rounds", "2",
                   "--shapes", "mixtral,fine", "--sweep-experts", "8,16",
                   "--json", str(out_json), "--write", str(out_md)])
    assert rc == 0
    report = json.loads(out_json.read_text())
    assert {"machine", "command", "settings", "candidates", "rows", "sweep",
            "elapsed_s"} <= set(report)
    assert {"cpu", "threads", "versions", "date"} <= set(report["machine"])
    assert report["machine"]["versions"]["torch"] == torch.__version__.split("+")[0] or \
        report["machine"]["versions"]["torch"].startswith(torch.__version__.split("+")[0])
    assert report["command"].startswith("smoe bench")
    assert report["settings"]["quick"] is True

    rows = report["rows"]
    seen = {(r["shape"], r["tokens"], r["mode"]) for r in rows}
    assert seen == {(s, T, m) for s in ("mixtral", "fine") for T in (8, 64)
                    for m in ("fwd", "fwd+bwd") if not (m == "fwd+bwd" and T < 64)}
    for row in rows:
        assert {"shape", "label", "tokens", "mode", "results", "wall_s"} <= set(row)
        res = row["results"]
        assert res[bench.DENSE]["ratio"] == 1.0
        assert "median_ms" in res["smoe"], res["smoe"]
        for name, r in res.items():
            if "skipped" in r:
                assert r["skipped"] and r["detail"]
                continue
            assert _finite_positive(r["median_ms"]), (name, r)
            assert _finite_positive(r["ratio"]), (name, r)
            assert 1 <= r["rounds"] <= 2
        v = row["smoe_vs_transformers"]
        assert v is not None and v["best"].startswith("hf-") and _finite_positive(v["speedup"])
        assert v["smoe_at_least_as_fast"] == (v["speedup"] >= 1.0)
    # top-2-only peers say why they are missing at the top-4 shape
    deep = next(r for r in rows if r["shape"] == "fine")["results"]
    if "fairscale" in deep:
        assert deep["fairscale"].get("skipped") in ("top-2 only", "not installed")

    sweep = report["sweep"]
    assert {r["shape"] for r in sweep} == {"N8", "N16"}
    for row in sweep:
        for name, r in row["results"].items():
            if "skipped" not in r:
                assert _finite_positive(r["us_per_token"]) and _finite_positive(r["ratio_to_first_N"])
    first = [r for r in sweep if r["shape"] == "N8"]
    assert all(r["results"]["smoe"]["ratio_to_first_N"] == 1.0 for r in first)

    md = out_md.read_text()
    assert md.count(bench.MARK_START) == 1 and md.count(bench.MARK_END) == 1
    assert "smoe vs best transformers" in md and "| candidate |" in md
    assert "Expert-count sweep" in md
    printed = capsys.readouterr().out
    assert "smoe is" in printed  # the per-row verdict against transformers' best backend


def test_write_section_replaces_only_its_section(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    bench.write_section(path, "first")
    assert path.read_text().startswith("# Benchmarks")
    text = path.read_text().replace(bench.MARK_START, "intro\n" + bench.MARK_START) + "\nafter\n"
    path.write_text(text)
    bench.write_section(path, "second")
    new = path.read_text()
    assert "second" in new and "first" not in new
    assert "intro" in new and new.rstrip().endswith("after")
    assert new.count(bench.MARK_START) == 1
    assert not [p for p in tmp_path.iterdir() if p.name != "BENCHMARKS.md"]  # no tmp left


def test_candidate_filter_keeps_the_denominator():
    s = bench.Settings(candidates=("smoe",))
    names = [c.name for c in bench.all_candidates() if bench._selected(c.name, s.candidates)]
    assert names == [bench.DENSE, "smoe"]
    assert bench._selected("hf-qwen3-grouped_mm", ("hf-*-grouped_mm",))


TINY = [bench.Shape("tiny", d=32, f=64, E=8, K=2),
        bench.Shape("tiny-shared", d=32, f=16, E=16, K=4, shared=16)]


@pytest.mark.parametrize("shape", TINY, ids=lambda s: s.name)
def test_every_candidate_runs_and_matches_smoe_shape(shape):
    torch.manual_seed(0)
    T = 16  # divisible by E: fairscale's gate needs it
    x = torch.randn(T, shape.d)
    ref = bench._build_smoe(shape).forward(x)
    ran = []
    for cand in bench.all_candidates(_peers()):
        try:
            built = cand.build(shape)
        except bench.Skip as skip:
            assert cand.group == "peer", (cand.name, skip.detail)  # ours and transformers run
            continue
        try:
            lim = built.limit(T, True) if built.limit else None
            assert lim is None, (cand.name, lim.detail)
            xg = x.clone().requires_grad_(True)
            y = built.forward(xg)
            assert y.shape == ref.shape and y.dtype == torch.float32, cand.name
            assert torch.isfinite(y).all(), cand.name
            y.backward(torch.randn_like(y))
            assert xg.grad is not None and torch.isfinite(xg.grad).all(), cand.name
            ran.append(cand.name)
        finally:
            if built.close:
                built.close()
    assert {bench.DENSE, "smoe", "all-experts", "hf-mixtral-grouped_mm"} <= set(ran)


@pytest.mark.parametrize("backend", bench.HF_BACKENDS)
def test_mixtral_block_with_copied_weights_equals_smoe(backend):
    """Same routing (softmax, top-K, renormalised) and layout: the comparison is like for like."""
    shape = bench.Shape("tiny", d=32, f=64, E=8, K=2)
    block = bench.hf_block(shape, "mixtral", backend)
    layer = MoELayer(MoEConfig(hidden_size=shape.d, expert_size=shape.f, num_experts=shape.E,
                               top_k=shape.K, router="softmax_topk", aux_loss_coef=0,
                               z_loss_coef=0))
    with torch.no_grad():
        layer.router.weight.copy_(block.gate.weight)
        layer.experts.gate_up_proj.copy_(block.experts.gate_up_proj)
        layer.experts.down_proj.copy_(block.experts.down_proj)
    x = torch.randn(2, 24, shape.d)
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[0], block(x), atol=1e-5, rtol=1e-5)
    # the all-experts candidate computes the same function with every expert dense
    dense = bench.AllExperts(shape)
    with torch.no_grad():
        dense.router.weight.copy_(block.gate.weight)
        dense.gate_up_DF.copy_(block.experts.gate_up_proj.transpose(1, 2))
        dense.down_FD.copy_(block.experts.down_proj.transpose(1, 2))
        torch.testing.assert_close(dense(x.view(-1, shape.d)), block(x).view(-1, shape.d),
                                   atol=1e-5, rtol=1e-5)
