"""`smoe export` and `smoe import`: the Hugging Face format out and in."""

from __future__ import annotations

import argparse

__all__ = ["register_export", "register_import"]


def register_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a run's model in another format (--to hf: a "
                                      "Hugging Face folder transformers loads)",
                       description="Write RUN_DIR's latest checkpoint as OUT_DIR: config.json, "
                                   "model.safetensors and the tokenizer, as the standard "
                                   "transformers architecture that computes the same logits "
                                   "(llama, qwen3, mixtral, qwen3_moe, qwen2_moe, glm4_moe or "
                                   "gpt_oss; a DeepSeek-V3-style MoE is written as glm4_moe, "
                                   "since smoe has no MLA attention). A model no such "
                                   "architecture expresses exactly is refused, naming the "
                                   "feature. Fewer families than smoe.hf.patch runs: export "
                                   "must map onto smoe's own model exactly.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--to", required=True, choices=("hf",), help="the format (hf)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="new or empty folder")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="cast the weights (default: as stored in the checkpoint)")

    def run(a: argparse.Namespace) -> int:
        from smoe.hf.convert import export_hf, format_export

        print(format_export(export_hf(a.run_dir, a.out_dir, dtype=a.dtype), a.run_dir))
        return 0

    p.set_defaults(handler=run)



def register_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="turn a Hugging Face model folder into an smoe run folder",
                       description="Read HF_DIR (config.json and safetensors; llama, qwen3, "
                                   "mixtral, qwen3_moe, qwen2_moe, glm4_moe or gpt_oss) and "
                                   "write OUT_DIR as an smoe run at step 0: config.json, "
                                   "checkpoint/ (weights, no optimizer state) and tokenizer.json "
                                   "when smoe can use the model's. What smoe's model cannot "
                                   "compute exactly is refused by name (DeepSeek-V3's MLA "
                                   "attention, gpt-oss's learned attention sinks and sliding "
                                   "window). Never reads pickle files.")
    p.add_argument("hf_dir", metavar="HF_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR", help="new or empty folder")
    p.add_argument("--dtype", choices=("keep", "float32", "bfloat16", "float16"),
                   default="keep", help="the weights' dtype in the run (default keep: the "
                                        "checkpoint's own, e.g. bfloat16, recorded in the "
                                        "run's config.json; smoe train --init-from loads "
                                        "them into float32 either way)")

    def run(a: argparse.Namespace) -> int:
        from smoe.hf.convert import format_import, import_hf

        dtype = None if a.dtype == "keep" else a.dtype
        print(format_import(import_hf(a.hf_dir, a.out_dir, dtype=dtype), a.hf_dir))
        return 0

    p.set_defaults(handler=run)


REGISTER = (register_export, register_import,)
