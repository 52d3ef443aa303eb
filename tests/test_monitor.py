"""The routing monitor: counts against the layers' own counts (native and patched transformers
models), the statistics against slow obvious formulas, drift and hot-spot alerts where a known
routing shift happens (and not before), references on disk, the Prometheus collector through
prometheus_client's own parser, and the offline report.

Legend: L layers, E experts, T tokens, K experts per token.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from smoe.config import ModelConfig, MoEConfig
from smoe.model import SMoETransformer
from smoe.monitor import AlertConfig, RoutingMonitor, stats
from smoe.nn.moe import MoELayer


def tiny_model(seed: int = 0) -> SMoETransformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                      max_seq_len=32, ffn_size=48, first_dense_layers=1,
                      moe=MoEConfig(hidden_size=32, expert_size=24, num_experts=4, top_k=2,
                                    init_std=0.3))
    return SMoETransformer(cfg).eval()


# -- statistics against obvious formulas ---------------------------------------------------
def _slow(counts: list[float]) -> dict[str, float]:
    n, E = sum(counts), len(counts)
    mean = n / E
    p = [c / n for c in counts]
    var = sum((c - mean) ** 2 for c in counts) / E
    return {"max_over_mean": max(counts) / mean, "imbalance": (max(counts) - mean) / mean,
            "balancedness": mean / max(counts), "cv": math.sqrt(var) / mean,
            "entropy": -sum(x * math.log(x) for x in p if x > 0)}


def _slow_js(a: list[float], b: list[float]) -> float:
    p = [x / sum(a) for x in a]
    q = [x / sum(b) for x in b]
    m = [(x + y) / 2 for x, y in zip(p, q)]
    kl = lambda u, v: sum(x * math.log2(x / y) for x, y in zip(u, v) if x > 0)  # noqa: E731
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


@pytest.mark.parametrize("counts", [[5, 5, 5, 5], [10, 0, 0, 0], [3, 1, 7, 0, 2], [1, 2]])
def test_stats_match_the_formulas(counts):
    s = stats.summarize(torch.tensor([counts]))
    ref = _slow(counts)
    # float64 on both sides, a handful of additions: 1e-12 is far above their rounding.
    assert s.max_over_mean[0] == pytest.approx(ref["max_over_mean"], abs=1e-12)
    assert s.imbalance[0] == pytest.approx(ref["imbalance"], abs=1e-12)
    assert s.balancedness[0] == pytest.approx(ref["balancedness"], abs=1e-12)
    assert s.cv[0] == pytest.approx(ref["cv"], abs=1e-12)
    assert s.entropy[0] == pytest.approx(ref["entropy"], abs=1e-12)
    assert s.normalized_entropy[0] == pytest.approx(ref["entropy"] / math.log(len(counts)),
                                                    abs=1e-12)
    assert s.dead_experts[0] == sum(c == 0 for c in counts)
    assert s.assignments[0] == sum(counts)


def test_stats_edge_cases_and_js():
    empty = stats.summarize(torch.zeros(2, 4, dtype=torch.long))
    assert empty.imbalance == [0.0, 0.0] and empty.balancedness == [0.0, 0.0]
    assert empty.dead_experts == [4, 4]
    a, b = [3.0, 1.0, 7.0, 0.0], [0.0, 5.0, 1.0, 4.0]
    assert float(stats.js_divergence(torch.tensor(a), torch.tensor(b))) == pytest.approx(
        _slow_js(a, b), abs=1e-12)
    assert float(stats.js_divergence(torch.tensor([1, 0]), torch.tensor([0, 9]))) == \
        pytest.approx(1.0, abs=1e-12)
    assert float(stats.js_divergence(torch.tensor([2, 4]), torch.tensor([1, 2]))) == \
        pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="equal shapes"):
        stats.js_divergence(torch.ones(3), torch.ones(4))


# -- counts ----------------------------------------------------------------------------------
def test_counts_equal_the_layers_tokens_per_expert():
    model = tiny_model()
    monitor = RoutingMonitor(window_tokens=None).attach(model.moe_layers())
    assert monitor.layer_names == ["1", "2"] and monitor.num_experts == 4
    g = torch.Generator().manual_seed(1)
    expected = torch.zeros(2, 4, dtype=torch.long)
    co = torch.zeros(2, 4, 4, dtype=torch.long)
    for B, T in [(2, 7), (1, 1), (3, 5)]:  # (1, 1) takes the layer's decode shortcut
        with torch.no_grad():
            out = model(torch.randint(0, 64, (B, T), generator=g))
        expected += torch.stack([i.tokens_per_expert for i in out.moe_infos])
        for li, info in enumerate(out.moe_infos):
            for a, b in info.expert_indices.tolist():  # K = 2: one pair per token
                co[li, a, b] += 1
                co[li, b, a] += 1
    assert torch.equal(monitor.counts(), expected)
    assert torch.equal(monitor.co_selection(), co)
    assert monitor.total_tokens == 14 + 1 + 15
    assert monitor.dropped_tokens().tolist() == [0, 0]
    with monitor.paused(), torch.no_grad():
        model(torch.randint(0, 64, (1, 4), generator=g))
    assert torch.equal(monitor.counts(), expected)
    monitor.detach()
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 4), generator=g))
    assert torch.equal(monitor.counts(), expected)


def test_counts_dropped_tokens_with_capacity():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=8, expert_size=4, num_experts=4, top_k=1,
                               router="switch", capacity_factor=0.5, init_std=1.0)).eval()
    monitor = RoutingMonitor(window_tokens=None).attach([layer])
    with torch.no_grad():
        _, info = layer(torch.randn(64, 8))
    assert monitor.dropped_tokens().tolist() == [int(info.dropped_tokens)]
    assert int(info.dropped_tokens) > 0
    assert torch.equal(monitor.counts()[0], info.tokens_per_expert)


def test_counts_on_a_patched_transformers_model():
    """The recorder's counts on a patched Mixtral equal a count made from transformers' own
    returned router logits (top-k of each token's logits)."""
    transformers = pytest.importorskip("transformers")
    import smoe.hf

    config = transformers.AutoConfig.for_model(
        "mixtral", vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=16, num_local_experts=6, num_experts_per_tok=2,
        max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(std=0.2)
    smoe.hf.patch(model)
    monitor = RoutingMonitor(window_tokens=None).attach(smoe.hf.patched_layers(model))
    assert len(monitor.layer_names) == 2 and monitor.num_experts == 6
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    expected = torch.stack([torch.bincount(r.topk(2, dim=-1).indices.reshape(-1), minlength=6)
                            for r in out.router_logits])
    assert torch.equal(monitor.counts(), expected)


# -- drift and hot spots at a known routing shift ------------------------------------------
def _domain_batches(layer: MoELayer, n: int, T: int, shift: float, seed: int):
    """``n`` batches of T "prose" tokens (shift 0: N(0, 1), routed about evenly by a random
    router) or "code" tokens (N(0, 1) plus ``shift`` along expert 3's router row, so expert 3
    takes most tokens): a routing shift whose place is known."""
    g = torch.Generator().manual_seed(seed)
    w = layer.router.weight.detach()[3]
    direction = w / w.norm()
    return [torch.randn(T, layer.config.hidden_size, generator=g) + shift * direction
            for _ in range(n)]


def test_drift_and_hot_spot_fire_where_the_domain_changes():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=32, expert_size=16, num_experts=8, top_k=2,
                               init_std=0.2)).eval()
    monitor = RoutingMonitor(window_tokens=256, alerts=AlertConfig(
        hot_factor=2.0, hot_windows=2, drift_threshold=0.1)).attach([layer])
    prose = _domain_batches(layer, 12, 64, 0.0, seed=1)   # windows 0-2
    code = _domain_batches(layer, 12, 64, 8.0, seed=2)    # windows 3-5
    with torch.no_grad():
        for x in prose + code:
            layer(x)
    monitor.close_window()
    assert [w.tokens for w in monitor.windows] == [256] * 6
    drift = [w.drift_L[0] for w in monitor.windows]
    assert max(drift[:3]) < 0.05 < 0.2 < min(drift[3:]), drift
    kinds = [(a.kind, a.window, a.expert) for a in monitor.alerts]
    assert ("drift", 3, None) in kinds
    assert ("hot_spot", 4, 3) in kinds          # 2 consecutive hot windows: 3 and 4
    assert all(a.window >= 3 for a in monitor.alerts), kinds
    assert sum(k == "drift" for k, _, _ in kinds) == 1   # fires once, stays armed off
    popped = monitor.pop_alerts()
    assert len(popped) == len(monitor.alerts) and monitor.pop_alerts() == []
    row = monitor.training_row()
    assert row["routing_drift"] > 0.2 and row["hot_experts"] >= 1


def test_collapse_alert_and_reference_files(tmp_path):
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=32, expert_size=16, num_experts=8, top_k=1,
                               router="switch", init_std=0.2)).eval()
    first = RoutingMonitor(window_tokens=None).attach([layer])
    with torch.no_grad():
        for x in _domain_batches(layer, 4, 64, 0.0, seed=3):
            layer(x)
    first.detach()
    for name in ("ref.safetensors", "ref.json"):
        path = first.save_reference(tmp_path / name)
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
        m = RoutingMonitor(window_tokens=None, reference=path,
                           alerts=AlertConfig(entropy_floor=0.5, drift_threshold=0.2))
        m.attach([layer])
        with torch.no_grad():
            for x in _domain_batches(layer, 4, 64, 30.0, seed=4):
                layer(x)
        w = m.close_window()
        expected = float(stats.js_divergence(w.counts_LE[0], first.counts()[0]))
        assert w.drift_L[0] == pytest.approx(expected, abs=1e-12) and expected > 0.5
        assert {a.kind for a in m.alerts} >= {"collapse", "drift"}
        m.detach()
    assert json.loads((tmp_path / "ref.json").read_text())["counts"] == first.counts().tolist()


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="hot_factor"):
        AlertConfig(hot_factor=1.0)
    with pytest.raises(ValueError, match="window_tokens"):
        RoutingMonitor(window_tokens=0)
    with pytest.raises(FileNotFoundError, match="routing reference"):
        RoutingMonitor(reference=tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not a routing reference"):
        RoutingMonitor(reference=tmp_path / "bad.json")
    m = RoutingMonitor().attach(tiny_model().moe_layers())
    with pytest.raises(ValueError, match="already attached"):
        m.attach(tiny_model().moe_layers())
    with pytest.raises(ValueError, match="reference has shape"):
        m.set_reference(torch.zeros(3, 3))


# -- exposition and reports ------------------------------------------------------------------
def test_prometheus_collector_parses_and_matches_counts():
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from smoe.monitor.prometheus import RoutingCollector

    model = tiny_model()
    monitor = RoutingMonitor(window_tokens=8).attach(model.moe_layers())
    with torch.no_grad():
        for s in range(3):
            model(torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(s)))
    for detail, per_expert in (("expert", True), ("summary", False)):
        registry = CollectorRegistry()
        registry.register(RoutingCollector(monitor, detail=detail))
        text = generate_latest(registry).decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}
        counts = monitor.counts().tolist()
        if per_expert:
            for li, layer in enumerate(monitor.layer_names):
                for e in range(4):
                    key = ("smoe_expert_tokens_total", (("expert", str(e)), ("layer", layer)))
                    assert samples[key] == counts[li][e]
        else:
            assert not any(name == "smoe_expert_tokens_total" for name, _ in samples)
        window = monitor.windows[-1]
        imb = stats.imbalance(window.counts_LE).tolist()
        for li, layer in enumerate(monitor.layer_names):
            assert samples[("smoe_expert_imbalance_ratio", (("layer", layer),))] == \
                pytest.approx(imb[li], abs=1e-12)
            assert samples[("smoe_layer_tokens_total", (("layer", layer),))] == sum(counts[li])
        assert ("smoe_routing_alerts_total", (("kind", "drift"),)) in samples
    with pytest.raises(ValueError, match="detail"):
        RoutingCollector(monitor, detail="all")


def test_text_and_html_reports(tmp_path):
    pytest.importorskip("matplotlib")
    from smoe.monitor import format_summary, write_html_report
    from smoe.train.metrics import load_imbalance
    from smoe.train.report import format_load_table

    model = tiny_model()
    monitor = RoutingMonitor(window_tokens=16).attach(model.moe_layers())
    with torch.no_grad():
        for s in range(4):
            model(torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(s)))
    monitor.close_window()
    counts = monitor.counts()
    text = format_summary(counts, monitor.layer_names, monitor.drift())
    assert len(text.splitlines()) == 2 + 2 and "drift" in text
    table = format_load_table(stats.shares(counts).tolist(), [1, 2])
    ratios = load_imbalance(counts)[1]
    assert [float(line.split()[-1]) for line in table.splitlines()[2:]] == \
        pytest.approx(ratios, abs=0.006)  # printed with two decimals
    path = write_html_report(tmp_path / "report.html", monitor, title="t")
    html = path.read_text()
    assert html.count("data:image/png;base64,") == 2 and "Alerts" in html
    assert (tmp_path / "report_load.png").stat().st_size > 1000


def test_monitor_command_writes_the_offline_report(tmp_path, monkeypatch, capsys):
    """`smoe monitor RUN` on a run trained by the real command: the text table, the HTML and
    PNG report, and a reference file the monitor reads back."""
    pytest.importorskip("matplotlib")
    import random

    from smoe.cli import main as cli_main

    monkeypatch.setenv("SMOE_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    words = "the a letter house river stone light garden window".split()
    (corpus / "prose.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(40))
                                                  for _ in range(100)))
    (corpus / "code.py").write_text("def f(x):\n    return [i * x for i in range(10)]\n" * 60)
    run = tmp_path / "run"
    assert cli_main(["train", "--out", str(run), "--data", str(corpus), "--preset", "tiny-moe",
                     "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-every", "0",
                     "--checkpoint-every", "2", "--no-progress"]) == 0
    capsys.readouterr()
    ref = tmp_path / "ref.json"
    assert cli_main(["monitor", str(run), "--batches", "4", "--save-reference", str(ref)]) == 0
    out = capsys.readouterr().out
    table = [ln for ln in out.splitlines() if ln.strip()[:1].isdigit()]
    assert len(table) == 4 and "drift" in out                  # tiny-moe: 4 MoE layers
    assert (run / "monitor" / "report.html").stat().st_size > 1000
    assert (run / "monitor" / "report_load.png").is_file()
    m = RoutingMonitor(reference=ref)
    assert m._reference_LE.shape == (4, 8) and int(m._reference_LE.sum()) > 0
    assert cli_main(["monitor", str(run), "--batches", "0"]) == 2   # one-line error
    assert "--batches" in capsys.readouterr().err
