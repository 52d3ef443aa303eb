"""How close a patched transformers MoE model is to the original, per family.

For every case of ``tests/test_hf_patch.py`` (a tiny random model per family and variant):
the largest |logit difference| between the original and the ``smoe.hf.patch``-ed model in
float32 and in bfloat16, next to the logit scale and the original's own bfloat16 error (its
distance from the float32 model) for context. Writes a Markdown table.

Then the same for the families of ``tests/test_hf_patch_families.py``: built in memory (not
saved), the causal-LM logits or, for text decoders registered only under ``AutoModel``, the last
hidden state; for families with no text-only model class, the sparse MoE block's output.

    python benchmarks/hf_equality.py [--out hf_equality.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

import smoe.hf  # noqa: E402
import test_hf_patch as cases  # noqa: E402  (the test's model table and builders)
import test_hf_patch_families as new_cases  # noqa: E402


def measure(path: str, ids: torch.Tensor) -> dict[str, float]:
    row = {}
    with torch.no_grad():
        for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            model = cases._load(path, dtype)
            ref = model(ids).logits.float()
            out = smoe.hf.patch(model)(ids).logits.float()
            row[tag] = (ref - out).abs().max().item()
            row[f"{tag}_ref"] = ref
        row["scale"] = row["fp32_ref"].abs().max().item()
        row["bf16_own"] = (row.pop("bf16_ref") - row.pop("fp32_ref")).abs().max().item()
    return row


def measure_built(build, x: torch.Tensor) -> dict[str, float]:
    """``measure`` for a module built in memory by ``build()`` and fed ``x``."""
    outs = {}
    with torch.no_grad():
        for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            module = build().to(dtype)
            xin = x if not x.is_floating_point() else x.to(dtype)
            first = module(xin)
            ref = (first if isinstance(first, torch.Tensor) else first[0]).float()
            patched = smoe.hf.patch(module)(xin)
            out = (patched if isinstance(patched, torch.Tensor) else patched[0]).float()
            outs[tag] = ((ref - out).abs().max().item(), ref)
    return {"fp32": outs["fp32"][0], "bf16": outs["bf16"][0],
            "scale": outs["fp32"][1].abs().max().item(),
            "bf16_own": (outs["bf16"][1] - outs["fp32"][1]).abs().max().item()}


def new_family_rows(ids: torch.Tensor):
    for param in new_cases.MODEL_CASES:
        family, model_type, head, kwargs = param.values
        what = "logits" if head == "lm" else "last hidden state"
        r = measure_built(lambda: new_cases._build(model_type, head, kwargs), ids)
        yield f"{param.id} ({what})", r
    x = torch.randn(2, 8, new_cases.BASE["hidden_size"],
                    generator=torch.Generator().manual_seed(0))
    for param in new_cases.BLOCK_CASES:
        family, module, cls, model_type, kwargs = param.values
        r = measure_built(lambda: new_cases._block(module, cls, model_type, kwargs), x)
        yield f"{param.id} (block output)", r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ids, _ = cases._inputs()
    lines = ["| case | max abs logit diff fp32 | max abs logit diff bf16 | logit scale | "
             "original bf16 vs fp32 |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for param in cases.CASES:
            family, kwargs = param.values
            r = measure(cases._checkpoint(Path(tmp), family, kwargs), ids)
            lines.append(f"| {param.id} | {r['fp32']:.2e} | {r['bf16']:.2e} | {r['scale']:.2f} | "
                         f"{r['bf16_own']:.2e} |")
            print(lines[-1], flush=True)
    for case_id, r in new_family_rows(ids):
        lines.append(f"| {case_id} | {r['fp32']:.2e} | {r['bf16']:.2e} | {r['scale']:.2f} | "
                     f"{r['bf16_own']:.2e} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(table)
    else:
        print()
        print(table)


if __name__ == "__main__":
    main()
