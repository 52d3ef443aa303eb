"""smoe inside whole models, measured side by side in one process, interleaved.

1. Training throughput in smoe's own training step: tiny-moe against tiny-dense (same active
   parameters per token). Goal: tiny-moe tokens/s >= 0.8x tiny-dense's.
2. transformers MoE models patched onto smoe layers (``smoe.hf.patch``) against the same model
   unpatched on each of transformers' experts backends (eager, grouped_mm, batched_mm): forward
   time on a prompt and greedy ``generate`` time, for tiny Mixtral, Qwen3-MoE and OLMoE.
   Goal: >= 1.0x the best transformers backend.

    python benchmarks/model.py --write
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def _median_rounds(candidates: dict, rounds: int, warmup: int = 2) -> dict[str, float]:
    """Run every candidate once per round, rotating the order; medians of the timed rounds."""
    names = list(candidates)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t = time.perf_counter()
            candidates[n]()
            dt = time.perf_counter() - t
            if r >= warmup:
                times[n].append(dt)
    return {n: statistics.median(v) for n, v in times.items()}


def training_throughput(rounds: int, batch: int, seq: int) -> list[str]:
    import torch

    from smoe.config import preset
    from smoe.model import SMoETransformer
    from smoe.train import TrainConfig
    from smoe.train.optim import build_optimizer

    torch.manual_seed(0)
    cfg = TrainConfig(steps=1000, batch_size=batch, seq_len=seq)
    steps = {}
    for name in ("tiny-moe", "tiny-dense", "tiny-dense-wide"):
        model = SMoETransformer(preset(name, max_seq_len=seq)).train()
        opt = build_optimizer(model, cfg)
        x = torch.randint(0, model.config.vocab_size, (batch, seq))
        y = torch.randint(0, model.config.vocab_size, (batch, seq))

        def step(model=model, opt=opt, x=x, y=y):
            out = model(x, y)
            (out.loss + out.aux_loss + out.z_loss).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[name] = step
    med = _median_rounds(steps, rounds)
    tok = batch * seq
    lines = ["| model | step (ms) | tokens/s | tokens/s vs tiny-dense |", "|---|---|---|---|"]
    for name, t in med.items():
        lines.append(f"| {name} | {t * 1e3:.1f} | {tok / t:,.0f} | "
                     f"{med['tiny-dense'] / t:.2f}x |")
    return lines


def _tiny_hf(family: str):
    from transformers import AutoConfig

    common = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if family == "mixtral":
        cfg = AutoConfig.for_model("mixtral", num_local_experts=8, num_experts_per_tok=2,
                                   **common)
    elif family == "qwen3_moe":
        cfg = AutoConfig.for_model("qwen3_moe", num_experts=16, num_experts_per_tok=4,
                                   moe_intermediate_size=256, head_dim=64, **common)
    elif family == "olmoe":
        cfg = AutoConfig.for_model("olmoe", num_experts=16, num_experts_per_tok=4, **common)
    else:
        raise ValueError(family)
    return cfg


def hf_patched(rounds: int, prompt_len: int, new_tokens: int) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM

    import smoe.hf

    lines = ["| model | what | " + " | ".join(["smoe (patched)", "eager", "grouped_mm",
                                               "batched_mm"]) + " | smoe vs best |",
             "|---|---|---|---|---|---|---|"]
    for family in ("mixtral", "qwen3_moe", "olmoe"):
        cfg = _tiny_hf(family)
        torch.manual_seed(0)
        models = {}
        for impl in ("eager", "grouped_mm", "batched_mm"):
            torch.manual_seed(0)
            m = AutoModelForCausalLM.from_config(cfg, experts_implementation=impl).eval()
            models[impl] = m
        torch.manual_seed(0)
        patched = AutoModelForCausalLM.from_config(cfg, experts_implementation="eager").eval()
        smoe.hf.patch(patched)
        models = {"smoe": patched, **models}
        ids = torch.randint(0, cfg.vocab_size, (1, prompt_len))

        def fwd(m):
            return lambda: m(ids)

        def gen(m):
            return lambda: m.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                                      min_new_tokens=new_tokens, pad_token_id=0)

        with torch.inference_mode():
            for what, make in (("forward", fwd), (f"generate {new_tokens}", gen)):
                med = _median_rounds({k: make(m) for k, m in models.items()}, rounds)
                best = min(v for k, v in med.items() if k != "smoe")
                cells = " | ".join(f"{med[k] * 1e3:.1f} ms" for k in models)
                lines.append(f"| {family} | {what} | {cells} | {best / med['smoe']:.2f}x |")
    return lines


def write_section(text: str, start: str, end: str) -> None:
    from smoe.bench import write_section as write

    write(ROOT / "BENCHMARKS.md", text, start, end)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--write", action="store_true")
    args = p.parse_args(argv)
    from smoe.launch import reexec_with_tcmalloc

    reexec_with_tcmalloc()
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = [f"Command: `python benchmarks/model.py --rounds {args.rounds} --batch-size "
           f"{args.batch_size} --seq-len {args.seq_len} --prompt-len {args.prompt_len} "
           f"--new-tokens {args.new_tokens}{' --write' if args.write else ''}` "
           f"({platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
           f"allocator: {'tcmalloc' if 'tcmalloc' in os.environ.get('LD_PRELOAD', '') else 'glibc'}"
           f"; medians of {args.rounds} interleaved rounds).", "",
           "Training step (forward, backward, clip, AdamW) at batch "
           f"{args.batch_size} x {args.seq_len}:", ""]
    out += training_throughput(args.rounds, args.batch_size, args.seq_len)
    if not args.skip_hf:
        import transformers

        out += ["", f"transformers {transformers.__version__} models patched onto smoe layers "
                f"(prompt {args.prompt_len} tokens, batch 1, float32):", ""]
        out += hf_patched(args.rounds, args.prompt_len, args.new_tokens)
    text = "\n".join(out)
    print(text)
    if args.write:
        write_section(text, "<!-- model-bench:start -->", "<!-- model-bench:end -->")
    return 0


if __name__ == "__main__":
    sys.exit(main())
