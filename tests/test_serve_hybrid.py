"""Hybrid dense + SMoE serving: the routing policies on plain data, the domain classifier
(held-out accuracy on the default corpus, safetensors round trip), the cascade's scorer against
a slow per-prefix reference, and real ``smoe serve MOE --dense-model DENSE --route ...``
servers on 127.0.0.1 (subprocesses killed by PID) driven by the official ``openai`` client:
code and prose prompts answered by different models under ``domain``, the escalation of a
cascade, requests naming a model, and the decision counters read from /metrics with
prometheus_client's parser.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from smoe.serve.hybrid import Decision, HybridConfig, HybridRouter, mean_token_logprob

CODE = "def area(width, height):\n    result = width * height\n    return result\n"
PROSE = "It is a truth universally acknowledged, that a single man in possession of a good"
WORDS = "the a letter house river stone light garden window morning friend quiet road".split()


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory):
    """A classifier trained by the real command on the default corpus (a smaller sample than
    the default, to keep the test short); its printed held-out accuracy."""
    from smoe.cli import main as cli_main
    from smoe.data.corpus import AUSTEN_INSTALL_COMMAND, find_austen

    if find_austen() is None:
        pytest.fail(f"default prose corpus missing; setup must run: {AUSTEN_INSTALL_COMMAND}")
    out = tmp_path_factory.mktemp("clf") / "domain.safetensors"
    assert cli_main(["route-classifier", "train", "--out", str(out), "--samples", "600",
                     "--val-samples", "300"]) == 0
    return out


# -- policies on plain data -------------------------------------------------------------------
def test_length_policy_threshold_is_strict():
    r = HybridRouter(HybridConfig("length", length_threshold=4))
    assert r.decide("abcd", [1, 2, 3, 4]) == Decision("dense", "length", "4 prompt tokens <= 4",
                                                      4.0)
    d = r.decide(None, [1, 2, 3, 4, 5])
    assert (d.target, d.policy, d.score, d.final) == ("smoe", "length", 5.0, True)


def test_cascade_policy_answers_dense_first_then_escalates_below_threshold():
    r = HybridRouter(HybridConfig("cascade", cascade_threshold=-1.0))
    first = r.decide("x", [1])
    assert (first.target, first.final) == ("dense", False)
    assert r.escalate(-1.01).target == "smoe" and r.escalate(-1.01).score == -1.01
    assert r.escalate(-1.0).target == "dense" and r.escalate(-0.2).target == "dense"


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="policy='fastest'"):
        HybridConfig("fastest")
    with pytest.raises(ValueError, match="domain_classifier"):
        HybridConfig("domain")
    with pytest.raises(ValueError, match="cascade_threshold"):
        HybridConfig("cascade", cascade_threshold=0.5)
    with pytest.raises(ValueError, match="length_threshold"):
        HybridConfig("length", length_threshold=-1)
    with pytest.raises(ValueError, match="target"):
        Decision("big", "length", "")


# -- the domain classifier --------------------------------------------------------------------
def test_classifier_held_out_accuracy_and_round_trip(classifier_file, tmp_path, capsys):
    from smoe.cli import main as cli_main
    from smoe.serve.domain import DomainClassifier

    clf = DomainClassifier.load(classifier_file)
    assert clf.domains == ("prose", "code")
    # held out: snippets of the corpus's validation blocks, disjoint from the train blocks
    assert clf.info["val_accuracy"] > 0.9, clf.info
    assert min(clf.info["val_accuracy_by_domain"].values()) > 0.85, clf.info
    assert clf.predict(CODE)[0] == "code" and clf.predict(PROSE)[0] == "prose"
    again = DomainClassifier.load(clf.save(tmp_path / "copy.safetensors"))
    # the same tensors through the same kernels: equal exactly
    assert torch.equal(again.probabilities([CODE, PROSE]), clf.probabilities([CODE, PROSE]))
    r = HybridRouter.from_config(HybridConfig("domain", domain_classifier=str(classifier_file)))
    assert r.decide(CODE, [0]).target == "smoe" and r.decide(PROSE, [0]).target == "dense"
    assert r.decide(None, [0]).target == "smoe"  # token ids: nothing to classify
    capsys.readouterr()
    assert cli_main(["route-classifier", "predict", str(classifier_file), CODE]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["domain"] == "code" and shown["probabilities"]["code"] == pytest.approx(
        clf.predict(CODE)[1], abs=1e-6)
    with pytest.raises(ValueError, match="smoe_domains"):
        HybridRouter.from_config(HybridConfig("domain", domain_classifier=str(classifier_file),
                                              smoe_domains=("poetry",)))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an smoe domain classifier"):
        DomainClassifier.load(tmp_path / "other.safetensors")


# -- the cascade's scorer ---------------------------------------------------------------------
def test_mean_token_logprob_matches_a_per_prefix_reference():
    from smoe.config import preset
    from smoe.model import SMoETransformer

    torch.manual_seed(0)
    model = SMoETransformer(preset("tiny-dense", max_seq_len=32)).eval()
    prompt, out = [5, 9, 100, 33], [7, 7, 200, 1, 64]
    got = mean_token_logprob(model, prompt, out)
    ref = []
    with torch.no_grad():
        for i, tok in enumerate(out):  # the slow obvious twin: one forward per prefix
            logits = model(torch.tensor([prompt + out[:i]])).logits[0, -1].double()
            ref.append(float(torch.log_softmax(logits, -1)[tok]))
    # float32 forwards over different sequence lengths: rounding differs at the 1e-6 level
    assert got == pytest.approx(sum(ref) / len(ref), abs=1e-4)
    assert mean_token_logprob(model, prompt, []) == 0.0
    long = list(range(40))  # longer than the context: only the last 32 tokens are read
    assert mean_token_logprob(model, long[:30], long[30:]) == pytest.approx(
        mean_token_logprob(model, long[8:30], long[30:]), abs=1e-5)


# -- real servers -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 2-step runs (tiny-moe and tiny-dense) trained by the real command."""
    from smoe.cli import main as cli_main

    root = tmp_path_factory.mktemp("hybrid")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    text = "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(200))
    (corpus / "prose.txt").write_text(text + "\n")
    os.environ.setdefault("SMOE_CACHE_DIR", str(root / "cache"))
    out = {}
    for kind in ("moe", "dense"):
        out[kind] = root / f"tiny-{kind}"
        assert cli_main(["train", "--out", str(out[kind]), "--data", str(corpus), "--preset",
                         f"tiny-{kind}", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
                         "--eval-every", "0", "--checkpoint-every", "2", "--no-progress"]) == 0
    return root, out


def _decisions(server) -> dict[tuple[str, str], float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics", timeout=10).text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert "smoe_requests" in fams  # the server's own series are still there
    return {(s.labels["policy"], s.labels["target"]): s.value
            for s in fams["smoe_hybrid_decisions"].samples if s.name.endswith("_total")}


@pytest.mark.slow
def test_domain_routing_server(runs, classifier_file):
    from test_serve import Server

    root, run = runs
    server = Server(run["moe"], root, "--dense-model", str(run["dense"]), "--route", "domain",
                    "--domain-classifier", str(classifier_file), "--max-tokens", "16")
    try:
        client = server.wait_ready().client()
        assert [m.id for m in client.models.list().data] == ["tiny-moe", "tiny-dense", "auto"]
        code = client.completions.create(model="auto", prompt=CODE, max_tokens=6,
                                         temperature=0)
        prose = client.completions.create(model="auto", prompt=PROSE, max_tokens=6,
                                          temperature=0)
        assert (code.model, prose.model) == ("tiny-moe", "tiny-dense")
        named = client.completions.create(model="tiny-dense", prompt=CODE, max_tokens=4,
                                          temperature=0)
        assert named.model == "tiny-dense"
        stream = client.completions.create(model="auto", prompt=CODE, max_tokens=4,
                                           temperature=0, stream=True)
        assert {c.model for c in stream} == {"tiny-moe"}
        import httpx  # raw HTTP may leave the model out: routed too

        raw = httpx.post(server.url + "/v1/completions", json={"prompt": PROSE,
                                                              "max_tokens": 3}, timeout=60)
        assert raw.status_code == 200 and raw.json()["model"] == "tiny-dense"
        unknown = httpx.post(server.url + "/v1/completions", json={"model": "gpt-4",
                                                                  "prompt": "x"}, timeout=60)
        assert unknown.status_code == 404 and "'auto'" in unknown.json()["error"]["message"]
        counts = _decisions(server)
        assert counts[("domain", "smoe")] == 2 and counts[("domain", "dense")] == 2
        assert counts[("explicit", "dense")] == 1 and counts[("cascade", "smoe")] == 0
        assert len(counts) == 8  # 4 policies x 2 targets, bounded
        health = httpx.get(server.url + "/health", timeout=10).json()
        assert health["status"] == "ok" and list(health["models"]) == ["tiny-moe", "tiny-dense"]
    finally:
        server.stop()


def _greedy_score(run: Path, prompt: str, n: int) -> float:
    from smoe.inference import generate
    from smoe.train.run import load_run

    loaded = load_run(run)
    ids = loaded.tokenizer.encode(prompt)
    with torch.no_grad():
        out = generate(loaded.model, ids, n, eos_id=loaded.tokenizer.eos_id)[len(ids):].tolist()
    out = [t for t in out if t != loaded.tokenizer.eos_id]
    return mean_token_logprob(loaded.model, ids, out)


@pytest.mark.slow
def test_cascade_server_escalates_the_unsure_answer(runs):
    from test_serve import Server

    root, run = runs
    prompts = ["the river and the stone", CODE]
    scores = [_greedy_score(run["dense"], p, 8) for p in prompts]
    if abs(scores[0] - scores[1]) < 1e-3:
        pytest.fail(f"the two prompts score alike ({scores}); pick other prompts")
    threshold = (scores[0] + scores[1]) / 2  # between the two: exactly one escalates
    server = Server(run["moe"], root, "--dense-model", str(run["dense"]), "--route",
                    "cascade", "--cascade-threshold", f"{threshold:.6f}")
    try:
        client = server.wait_ready().client()
        got = [client.completions.create(model="auto", prompt=p, max_tokens=8,
                                         temperature=0).model
               for p in prompts]
        assert got == ["tiny-moe" if s < threshold else "tiny-dense" for s in scores]
        kept = client.completions.create(model="auto", prompt=prompts[scores.index(max(scores))],
                                              max_tokens=8, temperature=0, stream=True,
                                              stream_options={"include_usage": True})
        chunks = list(kept)
        assert chunks[-1].usage.completion_tokens >= 1 and chunks[0].model == "tiny-dense"
        counts = _decisions(server)
        assert counts[("cascade", "smoe")] == 1 and counts[("cascade", "dense")] == 2
    finally:
        server.stop()


def test_cli_refuses_half_a_hybrid(tmp_path, capsys):
    from smoe.cli import main as cli_main

    assert cli_main(["serve", str(tmp_path), "--route", "length"]) == 2
    assert "--dense-model and --route go together" in capsys.readouterr().err
    assert cli_main(["serve", str(tmp_path), "--route", "domain", "--dense-model",
                     str(tmp_path)]) == 2
    assert "domain_classifier" in capsys.readouterr().err
    assert cli_main(["route-classifier", "predict", str(tmp_path / "none.safetensors"),
                     "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    out = tmp_path / "exists.safetensors"
    out.write_text("keep")
    assert cli_main(["route-classifier", "train", "--out", str(out)]) == 2
    assert out.read_text() == "keep"  # a failed command changes nothing
