"""Options shared by the commands that run a model, and the config-file / ``--set`` machinery.

Nothing here imports torch: ``smoe --help`` builds every parser without it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from smoe.cli.errors import CLIError

__all__ = ["add_offload_options", "add_runtime_options", "apply_runtime", "positive_int",
           "non_negative_int",
           "load_config_file", "parse_set", "merge_settings", "CONFIG_SECTIONS", "DTYPE_NAMES"]

DTYPE_NAMES = ("float32", "bfloat16", "float16")
#: The sections of a ``--config`` file (TOML or JSON): ``[model]`` ModelConfig fields (or
#: ``preset = "..."`` and overrides), ``[moe]`` MoEConfig fields, ``[train]`` TrainConfig
#: fields, ``[data]`` DataConfig fields.
CONFIG_SECTIONS = ("model", "moe", "train", "data")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (an error names the value)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def add_runtime_options(p: argparse.ArgumentParser, *, dtype_help: str | None = None) -> None:
    """``--device``, ``--dtype`` and ``--threads``: where and how the model runs."""
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N, mps or auto (CUDA, else MPS, else CPU)")
    g.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help=dtype_help or "the model's dtype (default: as stored, float32)")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default: torch's choice)")


def apply_runtime(a: argparse.Namespace):
    """Set the thread count; return the resolved device (a one-line error if unavailable)."""
    from smoe.runs import resolve_device, set_threads

    set_threads(a.threads)
    return resolve_device(a.device)


# -- config files ------------------------------------------------------------------------------
def load_config_file(path: str) -> dict[str, dict[str, Any]]:
    """The sections of a TOML (``.toml``) or JSON file; unknown sections are refused."""
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"--config {path!r} does not exist")
    try:
        if p.suffix == ".toml":
            import tomllib

            with open(p, "rb") as f:
                data = tomllib.load(f)
        elif p.suffix == ".json":
            data = json.loads(p.read_text(encoding="utf-8"))
        else:
            raise CLIError(f"--config {path!r}: give a .toml or .json file")
    except (ValueError, UnicodeDecodeError) as e:  # tomllib.TOMLDecodeError is a ValueError
        raise CLIError(f"--config {path!r} is not valid {p.suffix[1:].upper()}: "
                       f"{str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise CLIError(f"--config {path!r} must hold a table of sections "
                       f"({', '.join(CONFIG_SECTIONS)})")
    unknown = sorted(set(data) - set(CONFIG_SECTIONS))
    if unknown:
        raise CLIError(f"--config {path!r}: unknown section {unknown[0]!r} (sections: "
                       f"{', '.join(CONFIG_SECTIONS)})")
    for name, section in data.items():
        if not isinstance(section, dict):
            raise CLIError(f"--config {path!r}: [{name}] must be a table of fields")
    return {k: dict(v) for k, v in data.items()}


def _parse_value(text: str) -> Any:
    """A ``--set`` value: JSON when it parses (numbers, true/false, null, lists), else text."""
    try:
        return json.loads(text)
    except ValueError:
        lowered = text.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        if lowered in ("none", "null"):
            return None
        return text


def parse_set(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``--set section.field=value`` items as sections (``moe.top_k=4`` -> {"moe": {"top_k": 4}})."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or ():
        key, eq, value = item.partition("=")
        section, dot, field = key.strip().partition(".")
        if not eq or not dot or not field:
            raise CLIError(f"--set {item!r}: give SECTION.FIELD=VALUE, e.g. moe.top_k=4 "
                           f"(sections: {', '.join(CONFIG_SECTIONS)})")
        if section not in CONFIG_SECTIONS:
            raise CLIError(f"--set {item!r}: unknown section {section!r} (sections: "
                           f"{', '.join(CONFIG_SECTIONS)})")
        out.setdefault(section, {})[field] = _parse_value(value.strip())
    return out


def merge_settings(*layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Sections merged left to right: a later layer's field wins."""
    out: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, fields in layer.items():
            out.setdefault(section, {}).update(fields)
    return out


def env_debug() -> bool:
    return os.environ.get("SMOE_DEBUG", "") not in ("", "0")


def add_offload_options(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--offload FRACTION / --offload-policy / --offload-store (see smoe.inference.offload),
    shared by the commands that run a model; returns the group for command-specific additions."""
    g = p.add_argument_group("offloaded experts")
    g.add_argument("--offload", type=float, default=None, metavar="FRACTION",
                   help="keep this fraction of the expert bytes in memory; the rest is read "
                        "from a memory-mapped store on demand (the same tokens)")
    g.add_argument("--offload-policy", choices=("lru", "lfu", "predict"), default="predict",
                   help="cache eviction, or lru + next-layer-router prefetch (predict)")
    g.add_argument("--offload-store", default=None, metavar="PATH",
                   help="the store file (default: a temporary file, removed when the command "
                        "ends)")
    return g
