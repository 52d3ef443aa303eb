"""`smoe quantize`: write a weight-only quantized copy of a run (experts, attention, dense)."""

from __future__ import annotations

import argparse

__all__ = ["register_quantize"]


def register_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize", help="write a quantized copy of a run (int8/int4 experts, int8/int4 "
                         "attention)",
        description="Quantize a trained run's weights for inference and write them as a new run "
                    "folder (packed integers and scales in safetensors; config.json gets a "
                    "'quantization' section). `smoe generate OUT` and `smoe eval OUT` run it.")
    p.add_argument("run_dir", metavar="RUN", help="the float run to quantize")
    p.add_argument("--experts", required=True, choices=("int8", "int4", "bf16"),
                   help="scheme of the routed experts: int8 per output channel, int4 group-wise, "
                        "or bf16")
    p.add_argument("--group-size", type=int, default=128,
                   help="int4 group size along the input dimension: 32, 64 or 128 (default 128)")
    p.add_argument("--attention", choices=("none", "int8", "int4"), default="none",
                   help="scheme of the attention projections (default none: kept as trained; "
                        "int4 uses --group-size)")
    p.add_argument("--dense", choices=("none", "int8", "int4"), default="none",
                   help="scheme of shared experts and dense FFN layers (default none)")
    p.add_argument("--out", required=True, metavar="DIR", help="new run folder (must not exist "
                   "or be empty)")

    def run(a: argparse.Namespace) -> int:
        from smoe.inference.quantize import QuantConfig, save_quantized_run, weight_bytes
        from smoe.inference.quantize import load_quantized

        cfg = QuantConfig(experts=a.experts, group_size=a.group_size,
                          attention=None if a.attention == "none" else a.attention,
                          dense=None if a.dense == "none" else a.dense)
        out = save_quantized_run(a.run_dir, a.out, cfg)
        b = weight_bytes(load_quantized(out).model)
        print(f"wrote {out}: experts {a.experts}"
              + (f" (group {a.group_size})" if a.experts == "int4" else "")
              + f", attention {a.attention}, dense {a.dense}; weights {b['total'] / 2**20:.2f} "
                f"MiB (experts {b['experts'] / 2**20:.2f} MiB)")
        return 0

    p.set_defaults(handler=run)


REGISTER = (register_quantize,)
