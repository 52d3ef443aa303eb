"""Weight-only quantization of a built model, in place: experts, attention and dense parts.

    from smoe.inference.quantize import quantize
    quantize(model, experts="int4", attention="int8", group_size=128)   # model.eval() after

A post-build transform (DESIGN.md): each MoE layer's ``experts`` is swapped for a module of
:mod:`smoe.inference.quantized_modules` implementing the experts protocol, and attention / dense
``nn.Linear`` modules for :mod:`smoe.inference.quantized_linears` (int8 or int4). ``nn/`` and
``model.py`` learn nothing about it. Works for native smoe models (``model.moe_layers()``) and
for transformers models patched by :func:`smoe.hf.patch` (``smoe.hf.patched_layers``; there the
transformers model keeps owning its float expert tensors, which the patched layers no longer
read).

Saving and loading (gpt-fast's two steps): :func:`save_quantized_run` writes a run folder whose
``checkpoint/model.safetensors`` holds the packed integers and scales and whose ``config.json``
has a ``quantization`` section with a format version; :func:`prepare_quantized` swaps empty
quantized modules into a model built on the meta device, so that ``load_state_dict(...,
assign=True)`` loads the packed tensors directly and no float expert is ever materialised.
:func:`load_quantized` does the whole load. Inference only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smoe.inference.quantized_linears import LINEAR_SCHEMES
from smoe.inference.quantized_modules import EXPERT_SCHEMES, GROUP_SIZES

__all__ = ["QuantConfig", "quantize", "prepare_quantized", "moe_layers_of", "save_quantized_run",
           "load_quantized", "quantization_of", "FORMAT_VERSION", "weight_bytes"]

#: Version of the quantized run format this smoe writes and the newest it reads.
FORMAT_VERSION = 1
_LINEAR_SCHEMES = (None, *LINEAR_SCHEMES)


@dataclass(frozen=True)
class QuantConfig:
    """What :func:`quantize` does: the scheme of the routed experts (``int8``, ``int4``,
    ``bf16`` or None to leave them), of the attention projections and of the dense parts
    (shared experts and dense FFN layers): ``int8``, ``int4`` or None; the int4 group size
    (experts and linears alike)."""

    experts: str | None = "int4"
    attention: str | None = None
    dense: str | None = None
    group_size: int = 128

    def __post_init__(self) -> None:
        if self.experts is not None and self.experts not in EXPERT_SCHEMES:
            raise ValueError(f"experts={self.experts!r} is invalid: must be one of "
                             f"{', '.join(EXPERT_SCHEMES)} (or None)")
        for name in ("attention", "dense"):
            if getattr(self, name) not in _LINEAR_SCHEMES:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be 'int8', "
                                 "'int4' or None")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size={self.group_size} is invalid: must be one of "
                             f"{', '.join(map(str, GROUP_SIZES))}")

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        if not isinstance(data, dict):
            raise ValueError("the run's 'quantization' section is not an object")
        version = data.get("format_version")
        if not isinstance(version, int):
            raise ValueError("the run's 'quantization' section has no format_version")
        if version > FORMAT_VERSION:
            raise ValueError(f"this run was quantized by a newer smoe (quantization format "
                             f"{version}; this smoe reads up to {FORMAT_VERSION}): upgrade smoe")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields - {"format_version"})
        if unknown:
            raise ValueError(f"the run's 'quantization' section has unknown fields {unknown}")
        return cls(**{k: v for k, v in data.items() if k in fields})


# -- finding the parts ------------------------------------------------------------------------
def moe_layers_of(model: nn.Module) -> list[Any]:
    """The MoE layers of a native smoe model or of a patched transformers model."""
    if hasattr(model, "moe_layers"):
        return [layer for _, layer in model.moe_layers()]
    from smoe.hf.patch import is_patched, patched_layers

    if is_patched(model):
        return list(patched_layers(model).values())
    raise ValueError(f"{type(model).__name__} has no smoe MoE layers: pass an smoe model, or "
                     "patch a transformers model first (smoe.hf.patch(model))")


def _linears(model: nn.Module, part: str) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) of the attention projections or the dense MLP linears."""
    from smoe.nn.experts import DenseMLP
    from smoe.nn.moe import MoELayer

    found = []
    if part == "attention":
        for name, m in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("attn", "self_attn", "attention"):
                found += [(m, n, c) for n, c in m.named_children() if type(c) is nn.Linear]
        return found
    dense = [m for m in model.modules() if isinstance(m, DenseMLP)]
    dense += [layer.shared_experts for layer in moe_layers_of(model)
              if isinstance(layer, MoELayer) and layer.shared_experts is not None]
    seen: set[int] = set()
    for m in dense:
        if id(m) not in seen:
            seen.add(id(m))
            found += [(m, n, c) for n, c in m.named_children() if type(c) is nn.Linear]
    return found


def _as_config(config: QuantConfig | None, **kwargs) -> QuantConfig:
    if config is not None:
        return config
    return QuantConfig(**kwargs)


# -- the transform ----------------------------------------------------------------------------
@torch.no_grad()
def quantize(model: nn.Module, experts: str | None = "int4", attention: str | None = None,
             group_size: int = 128, *, dense: str | None = None,
             config: QuantConfig | None = None) -> QuantConfig:
    """Quantize ``model`` in place (see the module docstring) and put it in eval mode.

    Everything is validated before anything changes (a bad scheme or group size leaves the
    model as it was). Returns the :class:`QuantConfig` applied, also kept as
    ``model.smoe_quantization``.
    """
    cfg = _as_config(config, experts=experts, attention=attention, dense=dense,
                     group_size=group_size)
    if getattr(model, "smoe_quantization", None) is not None:
        raise ValueError("the model is already quantized: quantize the float model instead")
    layers = moe_layers_of(model) if cfg.experts else []
    if cfg.experts == "int4":
        for layer in layers:  # group_size must divide every expert input width
            c = layer.config
            for K, what in ((c.hidden_size, "hidden_size"), (c.expert_size, "expert_size")):
                if K % cfg.group_size:
                    raise ValueError(f"group_size={cfg.group_size} does not divide the experts' "
                                     f"{what} ({K}): choose one of "
                                     f"{', '.join(str(g) for g in GROUP_SIZES if K % g == 0)}"
                                     if any(K % g == 0 for g in GROUP_SIZES) else
                                     f"group_size={cfg.group_size} does not divide the experts' "
                                     f"{what} ({K}) and no int4 group size does: use int8")
    linears = {part: _linears(model, part) for part in ("attention", "dense")
               if getattr(cfg, part) is not None}
    for part, found in linears.items():
        if getattr(cfg, part) == "int4":
            for _, name, lin in found:
                if lin.in_features % cfg.group_size:
                    raise ValueError(f"group_size={cfg.group_size} does not divide the input "
                                     f"width {lin.in_features} of {part} projection {name!r}: "
                                     f"choose a group size that divides it, or {part}='int8'")
    for layer in layers:
        kwargs = {"group_size": cfg.group_size} if cfg.experts == "int4" else {}
        layer.experts = EXPERT_SCHEMES[cfg.experts].from_experts(layer.experts, **kwargs)
    for part, found in linears.items():
        scheme = getattr(cfg, part)
        kwargs = {"group_size": cfg.group_size} if scheme == "int4" else {}
        for parent, name, lin in found:
            setattr(parent, name, LINEAR_SCHEMES[scheme].from_linear(lin, **kwargs))
    model.smoe_quantization = cfg
    model.eval()
    return cfg


def prepare_quantized(model: nn.Module, config: QuantConfig | dict[str, Any]) -> nn.Module:
    """Swap empty quantized modules (on the parameters' device, typically meta) into a freshly
    built model so that its quantized state dict loads with ``assign=True``. No float expert
    weight is created for the swapped parts."""
    cfg = config if isinstance(config, QuantConfig) else QuantConfig.from_dict(config)
    if cfg.experts:
        for layer in moe_layers_of(model):
            old = layer.experts
            device = next(iter(old.parameters())).device
            kwargs = {"group_size": cfg.group_size} if cfg.experts == "int4" else {}
            with torch.device(device):
                layer.experts = EXPERT_SCHEMES[cfg.experts](
                    old.config, interleaved=bool(getattr(old, "interleaved", False)), **kwargs)
    for part in ("attention", "dense"):
        scheme = getattr(cfg, part)
        if scheme is not None:
            kwargs = {"group_size": cfg.group_size} if scheme == "int4" else {}
            for parent, name, lin in _linears(model, part):
                with torch.device(lin.weight.device):
                    setattr(parent, name, LINEAR_SCHEMES[scheme](
                        lin.in_features, lin.out_features, bias=lin.bias is not None, **kwargs))
    model.smoe_quantization = cfg
    return model.eval()


def quantization_of(model: nn.Module) -> QuantConfig | None:
    return getattr(model, "smoe_quantization", None)


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's tensors by part: routed experts, the rest, total."""
    experts = 0
    seen: set[int] = set()
    for layer in moe_layers_of(model):
        for t in list(layer.experts.parameters()) + list(layer.experts.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                experts += t.numel() * t.element_size()
    total = sum(t.numel() * t.element_size()
                for t in {id(t): t for t in list(model.parameters()) + list(model.buffers())}
                .values())
    return {"experts": experts, "other": total - experts, "total": total}


# -- run folders ------------------------------------------------------------------------------
def save_quantized_run(src_run: str | Path, out_dir: str | Path, config: QuantConfig) -> Path:
    """Quantize the run at ``src_run`` and write it as a new run folder ``out_dir``.

    Everything is written into a temporary sibling folder, fsynced, then renamed: a failure
    leaves nothing behind, and an existing ``out_dir`` is refused.
    """
    from smoe._io import fsync_dir, fsync_file
    from smoe.checkpoint import CHECKPOINT, FORMAT, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE
    from smoe.checkpoint import read_state, save_tensors
    from smoe.runs import RUN_CONFIG, latest_checkpoint, load_run

    src, out = Path(src_run), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{str(out)!r} exists and is not empty: nothing was written; "
                              "choose a new output folder")
    run_cfg, folder, state, _ = latest_checkpoint(src)
    if "quantization" in run_cfg:
        raise ValueError(f"{str(src)!r} is already quantized: quantize the float run instead")
    run = load_run(src)
    quantize(run.model, config=config)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / CHECKPOINT).mkdir(parents=True)
        for item in src.iterdir():  # the tokenizer; not checkpoints, config or training logs
            if item.is_file() and item.name not in (RUN_CONFIG, "metrics.jsonl"):
                shutil.copy2(item, tmp / item.name)
        ck = tmp / CHECKPOINT
        save_tensors(run.model.state_dict(), ck / MODEL_FILE)
        save_tensors({}, ck / OPTIMIZER_FILE)  # an inference-only run: no optimizer state
        kept = {k: state[k] for k in ("step", "model_config") if k in state}
        (ck / STATE_FILE).write_text(json.dumps({"format": FORMAT, "version":
                                                 read_state(folder).get("version", 1), **kept})
                                     + "\n", encoding="utf-8")
        new_cfg = {**run_cfg, "quantization": config.to_dict(), "quantized_from": str(src)}
        (tmp / RUN_CONFIG).write_text(json.dumps(new_cfg, indent=2) + "\n", encoding="utf-8")
        for f in [ck / MODEL_FILE, ck / OPTIMIZER_FILE, ck / STATE_FILE, tmp / RUN_CONFIG]:
            fsync_file(f)
        fsync_dir(ck)
        fsync_dir(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_quantized(run_dir: str | Path, device: torch.device | str = "cpu"):
    """Load a quantized run folder (or a float one) for inference: the run loader
    (:func:`smoe.runs.load_run`) builds on meta, calls :func:`prepare_quantized` for a run with
    a ``quantization`` section, and loads the packed tensors with ``assign=True``. Returns its
    ``LoadedRun``."""
    from smoe.runs import load_run

    return load_run(run_dir, device)
