"""Hybrid dense + SMoE routing: what each policy of ``smoe serve --route`` buys and costs.

Two trained runs (a dense and an SMoE model, same tokenizer) answer held-out prompts of both
domains of the default corpus (its validation split: unseen by the models and by the domain
classifier). For every prompt both models are measured once, in one process, interleaved:

* quality: the mean loss (nats/token) of the prompt's reference continuation (the next
  ``--ref-chars`` characters of the held-out text) under each model;
* greedy generation of ``--gen`` tokens, timed (prefill + decode, KV cache), and the dense
  answer's mean token log-probability (the cascade's score), timed too.

Each policy is then a choice per prompt, and its row adds up the chosen model's figures: share
sent to the SMoE model, mean quality, cost as active parameters x tokens processed (prompt +
generated; a cascade's escalation pays the dense answer, its scoring pass and the SMoE answer),
and measured tokens/s (generated tokens delivered / time spent on them), beside "all dense"
and "all SMoE", and an oracle that knows which model predicts each prompt's continuation
better (a bound no policy reaches). Thresholds: ``length`` at the median prompt length,
``cascade`` at the median dense score (both send about half the prompts to the SMoE model)
and at the server default.

    python benchmarks/hybrid.py --dense runs/dense --moe runs/moe --write

The BENCHMARKS.md figures used (about 8 minutes each on 2 shared cores):

    smoe train --out runs/moe --preset tiny-moe --steps 300 --batch-size 8 --seq-len 256 \
        --eval-every 0 --checkpoint-every 300
    python -c "import functools; from smoe import config as C; \
    from smoe.train.config import TrainConfig; from smoe.train.run import start_run; \
    C.PRESETS['micro-dense'] = functools.partial(C._family, 'dense', hidden=128, layers=2, \
        heads=4, kv_heads=2, expert=128, experts=8, top_k=2, seq=256); \
    start_run('runs/dense', TrainConfig(steps=300, batch_size=8, seq_len=256, eval_every=0, \
        checkpoint_every=300), preset='micro-dense')"
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- hybrid-routing:start -->", "<!-- hybrid-routing:end -->"


def held_out_prompts(n_per_domain: int, ref_chars: int, max_chars: int, seed: int):
    """``(domain, prompt, reference)`` from the default corpus's validation blocks; prompt
    lengths uniform in [32, max_chars] characters so that ``length`` has something to decide
    on."""
    from smoe.data.corpus import default_corpus
    from smoe.data.dataset import split_corpus

    corpus = default_corpus()
    _, val = split_corpus(corpus)
    rng = random.Random(seed)
    out = []
    for domain in corpus.domains:
        texts = [b.text for b in val if b.domain == domain]
        while sum(d == domain for d, _, _ in out) < n_per_domain:
            t = rng.choice(texts)
            k = rng.randint(32, max_chars)
            if len(t) < k + ref_chars + 1:
                continue
            s = rng.randrange(len(t) - k - ref_chars)
            prompt, ref = t[s:s + k], t[s + k:s + k + ref_chars]
            if prompt.strip() and ref.strip():
                out.append((domain, prompt, ref))
    return out


def measure(models: dict, prompts, gen: int):
    """Per prompt and model: reference loss, generation time, and (dense) the cascade score."""
    import torch

    from smoe.inference import generate
    from smoe.serve.hybrid import mean_token_logprob

    rows = []
    for i, (domain, prompt, ref) in enumerate(prompts):
        row = {"domain": domain, "prompt": prompt}
        order = list(models) if i % 2 == 0 else list(models)[::-1]  # interleave, alternate
        for name in order:
            run = models[name]
            tok = run.tokenizer
            p_ids, r_ids = tok.encode(prompt), tok.encode(ref)
            room = run.model.config.max_seq_len - max(len(r_ids), gen)
            p_ids = p_ids[-room:]  # a multi-byte character can make a prompt a little longer
            ids = torch.tensor([p_ids + r_ids])
            with torch.no_grad():
                logits = run.model(ids).logits[0, len(p_ids) - 1:-1].float()
                loss = float(torch.nn.functional.cross_entropy(logits, ids[0, len(p_ids):]))
                t = time.perf_counter()
                out = generate(run.model, p_ids, gen)[len(p_ids):].tolist()
                dt = time.perf_counter() - t
            row[name] = {"loss": loss, "prompt_tokens": len(p_ids), "gen_tokens": len(out),
                         "gen_s": dt}
            if name == "dense":
                t = time.perf_counter()
                row["score"] = mean_token_logprob(run.model, p_ids, out)
                row["score_s"] = time.perf_counter() - t
        rows.append(row)
    return rows


def policy_row(label: str, rows, choose, active: dict[str, int], cascade: bool = False):
    """Sum the chosen model's figures over the prompts (``choose(row) -> 'dense'|'smoe'``)."""
    n_smoe = loss = cost = gen = secs = 0.0
    for r in rows:
        target = choose(r)
        m = r[target]
        loss += m["loss"]
        tokens = m["prompt_tokens"] + m["gen_tokens"]
        cost += active[target] * tokens
        gen += m["gen_tokens"]
        secs += m["gen_s"]
        if cascade:  # the dense answer and its scoring pass are paid for every request
            d = r["dense"]
            secs += r["score_s"]
            cost += active["dense"] * (d["prompt_tokens"] + d["gen_tokens"])
            if target == "smoe":
                secs += d["gen_s"]
                cost += active["dense"] * (d["prompt_tokens"] + d["gen_tokens"])
        n_smoe += target == "smoe"
    n = len(rows)
    return {"policy": label, "smoe_share": n_smoe / n, "loss": loss / n, "cost": cost / n,
            "tokens_per_s": gen / secs}


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = results[0]["cost"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=90)
    for r in results:
        x = r["cost"] / base
        ax.scatter(x, r["loss"], s=30, color="black" if r["policy"].startswith("all") else "C0")
        ax.annotate(r["policy"], (x, r["loss"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    ax.set_xlabel("cost: active params x tokens, relative to all dense")
    ax.set_ylabel("reference loss (nats/token, lower is better)")
    ax.set_title("Hybrid routing: quality against cost (held-out prompts)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dense", required=True, help="dense run folder")
    ap.add_argument("--moe", required=True, help="SMoE run folder")
    ap.add_argument("--prompts", type=int, default=40, help="held-out prompts per domain")
    ap.add_argument("--gen", type=int, default=32, help="generated tokens per request")
    ap.add_argument("--ref-chars", type=int, default=64, help="reference continuation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--train-note", default="", help="how the runs were trained (for the note)")
    ap.add_argument("--write", action="store_true", help="write the BENCHMARKS.md section")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from smoe.serve.domain import train_domain_classifier
    from smoe.serve.hybrid import HybridConfig, HybridRouter
    from smoe.train.run import load_run

    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    models = {"dense": load_run(a.dense), "smoe": load_run(a.moe)}
    active = {k: m.model.config.num_active_params() for k, m in models.items()}
    clf, report = train_domain_classifier()
    limit = min(m.model.config.max_seq_len for m in models.values())
    max_chars = limit - max(a.ref_chars, a.gen) - 8
    if max_chars < 32:
        raise ValueError(f"--ref-chars/--gen leave no room for a prompt in {limit} tokens")
    prompts = held_out_prompts(a.prompts, a.ref_chars, max_chars, a.seed)
    rows = measure(models, prompts, a.gen)
    lengths = [r["dense"]["prompt_tokens"] for r in rows]
    med_len = int(statistics.median(lengths))
    med_score = statistics.median(r["score"] for r in rows)

    def domain_router(domains):
        return HybridRouter(HybridConfig("domain", domain_classifier="in-memory",
                                         smoe_domains=domains), clf)

    def via(router):  # length reads only the number of prompt ids
        return lambda r: router.decide(r["prompt"], [0] * r["dense"]["prompt_tokens"]).target

    def cascade(th):
        router = HybridRouter(HybridConfig("cascade", cascade_threshold=th))
        return lambda r: router.escalate(r["score"]).target

    results = [
        policy_row("all dense", rows, lambda r: "dense", active),
        policy_row("all SMoE", rows, lambda r: "smoe", active),
        policy_row(f"length > {med_len} tokens", rows,
                   via(HybridRouter(HybridConfig("length", length_threshold=med_len))), active),
        policy_row("domain: code -> SMoE", rows, via(domain_router(("code",))), active),
        policy_row("domain: prose -> SMoE", rows, via(domain_router(("prose",))), active),
        policy_row(f"cascade < {med_score:.2f}", rows, cascade(min(0.0, med_score)), active,
                   cascade=True),
        policy_row("cascade < -1.50", rows, cascade(-1.5), active, cascade=True),
        policy_row("oracle (lower loss per prompt)", rows,
                   lambda r: "smoe" if r["smoe"]["loss"] < r["dense"]["loss"] else "dense",
                   active),
    ]
    per_domain = {d: {m: statistics.mean(r[m]["loss"] for r in rows if r["domain"] == d)
                      for m in models} for d in ("prose", "code")}
    elapsed = time.perf_counter() - t0
    png = ROOT / "benchmarks" / "hybrid.png"
    plot(results, png)
    cmd = (f"python benchmarks/hybrid.py --dense DENSE --moe MOE --prompts {a.prompts} "
           f"--gen {a.gen} --ref-chars {a.ref_chars}"
           + (f" --threads {a.threads}" if a.threads else ""))
    lines = ["## Hybrid dense + SMoE routing", "",
             f"`{cmd}` on {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
             f"{len(rows)} held-out prompts ({a.prompts} prose, {a.prompts} code; the default "
             f"corpus's validation split), {a.gen} generated tokens each, greedy; "
             f"{elapsed:.0f} s in all. {a.train_note}", "",
             f"Active parameters per token: dense {active['dense']:,}, SMoE "
             f"{active['smoe']:,} "
             f"({models['smoe'].model.config.num_params():,} in all). Reference-continuation "
             f"loss by domain (nats/token): prose dense {per_domain['prose']['dense']:.3f} / "
             f"SMoE {per_domain['prose']['smoe']:.3f}, code dense "
             f"{per_domain['code']['dense']:.3f} / SMoE {per_domain['code']['smoe']:.3f}. "
             f"Domain classifier held-out accuracy {report['val_accuracy']:.3f}.", "",
             "| policy | share to SMoE | mean loss | cost (active params x tokens / request) | "
             "cost vs all dense | tokens/s |", "|---|---|---|---|---|---|"]
    base = results[0]["cost"]
    for r in results:
        lines.append(f"| {r['policy']} | {r['smoe_share']:.0%} | {r['loss']:.4f} | "
                     f"{r['cost']:.3g} | {r['cost'] / base:.2f}x | {r['tokens_per_s']:.0f} |")
    lines += ["", "![quality against cost](benchmarks/hybrid.png)"]
    text = "\n".join(lines)
    print(text)
    if a.write:
        from smoe.bench import write_section

        write_section(ROOT / "BENCHMARKS.md", text, START, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
