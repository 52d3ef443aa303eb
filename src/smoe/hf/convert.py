"""The Hugging Face format in and out: an smoe model as a transformers checkpoint, and back.

    from smoe.hf.convert import export_hf, import_hf
    export_hf("runs/x", "hf/x")       # config.json + model.safetensors (+ tokenizer)
    import_hf("hf/x", "runs/y")       # an smoe run folder at step 0

``transformers.AutoModelForCausalLM.from_pretrained("hf/x")`` gives the logits of smoe's model
(float32: within 1e-5). Export needs only torch and safetensors; import reads the config with
transformers (its defaults) and the tensors with safetensors, never with pickle.

Which architecture, and how the config is mapped: :mod:`smoe.hf.formats` (:func:`hf_format_for`,
:func:`model_config_from_hf`), re-exported here. This module holds the rest: export and import,
the safetensors files, and what ``smoe export``/``smoe import`` print.

Writes are atomic: everything goes into a temporary folder beside ``out_dir``, renamed at the
end. ``out_dir`` must not exist or be empty.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from smoe.config import ModelConfig
from smoe.hf.formats import (_SMOE_KEY, EXPORT_FAMILIES, IMPORT_FAMILIES, HFFormat,
                             _key_context, hf_format_for, model_config_from_hf)
from smoe.hf.keymaps import from_hf, to_hf
from smoe.hf.tokenizer import export_tokenizer, import_tokenizer

__all__ = ["HFFormat", "ExportResult", "ImportResult", "EXPORT_FAMILIES", "IMPORT_FAMILIES",
           "hf_format_for", "model_config_from_hf", "export_hf", "import_hf",
           "format_export", "format_import"]

_DEFAULT_SHARD_BYTES = 5 * 1024 ** 3


@dataclass
class ExportResult:
    out_dir: Path
    family: str
    architecture: str
    files: list[str]
    num_tensors: int
    num_bytes: int
    step: int | None
    tokenizer: str | None          # what was written for the tokenizer, or None
    notes: list[str] = field(default_factory=list)


@dataclass
class ImportResult:
    out_dir: Path
    family: str
    config: ModelConfig
    num_params: int
    tokenizer: str | None
    used_smoe_config: bool
    notes: list[str] = field(default_factory=list)



# -- files ------------------------------------------------------------------------------------
def _check_out(out_dir: Path) -> None:
    """``out_dir`` must be missing or an empty folder (checked first, and again at the end)."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{str(out_dir)!r} exists and is not a folder: choose another "
                                  "output folder")
        if any(out_dir.iterdir()):
            raise FileExistsError(f"{str(out_dir)!r} is not empty: nothing was written; choose a "
                                  "new or empty output folder")


def _begin(out_dir: Path) -> Path:
    """A fresh temporary folder beside ``out_dir`` (which must be missing or empty)."""
    _check_out(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _finish(tmp: Path, out_dir: Path) -> None:
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if out_dir.exists():
        try:
            out_dir.rmdir()
        except OSError:
            raise FileExistsError(f"{str(out_dir)!r} was filled while writing: the result is "
                                  f"left in {str(tmp)!r}") from None
    os.rename(tmp, out_dir)


def _write_safetensors(items, tmp: Path, max_shard_bytes: int) -> tuple[list[str], int, int]:
    """Write (key, tensor) pairs as ``model.safetensors``, or as shards with an index."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = count = total = 0
    names: list[str] = []

    def flush() -> None:
        name = f"shard-{len(names):05d}.tmp"
        save_file(shards[-1], str(tmp / name), metadata={"format": "pt"})
        names.append(name)
        shards[-1] = {}

    weight_map: dict[str, int] = {}
    for key, value in items:
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        shards[-1][key] = value
        weight_map[key] = len(names)
        size += nbytes
        total += nbytes
        count += 1
    if shards[-1] or not names:
        flush()
    if len(names) == 1:
        os.rename(tmp / names[0], tmp / "model.safetensors")
        return ["model.safetensors"], count, total
    final = [f"model-{k + 1:05d}-of-{len(names):05d}.safetensors" for k in range(len(names))]
    for old, new in zip(names, final):
        os.rename(tmp / old, tmp / new)
    index = {"metadata": {"total_size": total},
             "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n",
                                                      encoding="utf-8")
    return final + ["model.safetensors.index.json"], count, total


class _HFTensors:
    """The tensors of an HF folder (``model.safetensors`` or shards with an index), read
    lazily with safetensors."""

    def __init__(self, hf_dir: Path) -> None:
        from safetensors import safe_open

        index = hf_dir / "model.safetensors.index.json"
        single = hf_dir / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            files = ["model.safetensors"]
            weight_map = None
        else:
            pickles = [p.name for p in hf_dir.glob("*.bin")] + [p.name for p in
                                                                hf_dir.glob("*.pt")]
            extra = (f" (found {', '.join(sorted(pickles)[:3])}: smoe never reads pickle "
                     "checkpoints; convert them to safetensors first)") if pickles else ""
            raise FileNotFoundError(f"{str(hf_dir)!r} has no model.safetensors or "
                                    f"model.safetensors.index.json{extra}")
        self._handles = {}
        self._where: dict[str, str] = {}
        for name in files:
            path = hf_dir / name
            if not path.is_file():
                raise FileNotFoundError(f"the index names {name!r}, which is not in "
                                        f"{str(hf_dir)!r}")
            h = safe_open(str(path), framework="pt")
            self._handles[name] = h
            for key in h.keys():
                self._where[key] = name
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self._where))
            if missing:
                raise ValueError(f"the index lists tensors its files do not hold: "
                                 f"{', '.join(missing[:5])}")
        self.keys = frozenset(self._where)

    def get(self, key: str) -> torch.Tensor:
        return self._handles[self._where[key]].get_tensor(key)


def _dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if value not in names:
        raise ValueError(f"dtype={value!r} is invalid: must be one of float32, bfloat16, "
                         "float16")
    return names[value]


def _load_smoe(source: Any) -> tuple[ModelConfig, dict[str, torch.Tensor], Path | None,
                                     int | None]:
    """(config, state dict, tokenizer.json path, step) of an smoe model or run folder."""
    if isinstance(source, torch.nn.Module):
        config = getattr(source, "config", None)
        if not isinstance(config, ModelConfig):
            raise ValueError("export_hf needs an smoe SMoETransformer (or a run folder), not "
                             f"{type(source).__name__}")
        return config, dict(source.state_dict()), None, None
    from smoe.train.checkpoint import load_model_weights
    from smoe.train.run import latest_checkpoint

    run_dir = Path(source)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"RUN_DIR {str(run_dir)!r} does not exist")
    _, folder, state, config = latest_checkpoint(run_dir)
    return (config, load_model_weights(folder), run_dir / "tokenizer.json",
            int(state.get("step", 0)))


def _check_state(config: ModelConfig, state: Mapping[str, torch.Tensor]) -> int:
    """Load ``state`` into a meta-built model (strict): a clear error for a wrong key or shape.
    Returns the parameter count."""
    from smoe.model import SMoETransformer

    with torch.device("meta"):
        model = SMoETransformer(config)
    try:
        model.load_state_dict(dict(state), strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"the weights do not fit the model config: {e}") from None
    return model.num_params()


# -- export and import ------------------------------------------------------------------------
def export_hf(run_dir_or_model: str | Path | torch.nn.Module, out_dir: str | Path, *,
              dtype: torch.dtype | str | None = None, tokenizer: str | Path | None = None,
              max_shard_bytes: int = _DEFAULT_SHARD_BYTES) -> ExportResult:
    """Write an smoe model (a run folder's latest checkpoint, or an ``SMoETransformer``) as a
    Hugging Face folder: ``config.json``, ``model.safetensors`` (shards and an index above
    ``max_shard_bytes``), and the tokenizer (``tokenizer.json`` + ``tokenizer_config.json``)
    when the run has one or ``tokenizer`` names a ``tokenizer.json``.

    ``dtype``: cast the weights (default: as stored, float32). Raises ``ValueError`` naming the
    features no supported family expresses exactly; ``FileExistsError`` if ``out_dir`` is not
    empty; ``FileNotFoundError`` for a missing run. Nothing is left behind on error.
    """
    from smoe import __version__

    target_dtype = _dtype(dtype)
    out_dir = Path(out_dir)
    _check_out(out_dir)
    config, state, tok_path, step = _load_smoe(run_dir_or_model)
    if tokenizer is not None:
        tok_path = Path(tokenizer)
        if tok_path.is_dir():
            tok_path = tok_path / "tokenizer.json"
        if not tok_path.is_file():
            raise FileNotFoundError(f"tokenizer {str(tokenizer)!r}: no such tokenizer.json")
    _check_state(config, state)
    hf_format_for(config)  # refuse before touching the disk
    notes: list[str] = []
    tmp = _begin(out_dir)
    try:
        eos_id, tok_kind = export_tokenizer(tok_path, tmp, config.max_seq_len,
                                             config.vocab_size, notes)
        fmt = hf_format_for(config, eos_token_id=eos_id)
        ctx = _key_context(config, fmt.flags)
        files, count, nbytes = _write_safetensors(
            to_hf(fmt.family, state, ctx, target_dtype), tmp, max_shard_bytes)
        hf_config = dict(fmt.config)
        if target_dtype is not None:
            hf_config["dtype"] = str(target_dtype).removeprefix("torch.")
        hf_config[_SMOE_KEY] = {"model": config.to_dict(), "smoe_version": __version__}
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n",
                                         encoding="utf-8")
        files = ["config.json"] + files + (["tokenizer.json", "tokenizer_config.json"]
                                           if tok_kind else [])
        if "shared_ungated" in fmt.flags:
            notes.append("the shared expert has no gate in smoe: written with a zero gate "
                         "(sigmoid(0) = 0.5) and its down projection doubled (exact)")
        if "no_shared" in fmt.flags:
            notes.append(f"{fmt.family} always builds a shared expert: written with width 0 "
                         "(its output is exactly 0)")
        m = config.moe
        if m is not None and fmt.family != "glm4_moe":
            notes.append(f"router_aux_loss_coef = aux_loss_coef * {len(config.moe_layer_indices())}"
                         f" MoE layers / K={m.top_k} (transformers divides by T, not T*K, and "
                         "pools the layers)")
        _finish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out_dir, fmt.family, fmt.architecture, files, count, nbytes, step,
                        tok_kind, notes)


def import_hf(hf_dir: str | Path, out_dir: str | Path, *,
              dtype: torch.dtype | str | None = torch.float32) -> ImportResult:
    """Write an HF causal LM folder (one of :data:`IMPORT_FAMILIES`) as an smoe run folder:
    ``config.json`` (``{"format": "smoe-run", "model": ...}``), ``checkpoint/`` at step 0 with
    the weights and no optimizer state, and ``tokenizer.json`` when smoe can use the HF one.

    ``dtype``: the weights' dtype in the run (default float32, what smoe trains in; ``None``
    keeps the stored one). Raises ``ValueError`` naming what smoe cannot express exactly,
    ``FileNotFoundError`` for a missing folder or weights, ``FileExistsError`` if ``out_dir`` is
    not empty.
    """
    from smoe.train.checkpoint import save_checkpoint

    target_dtype = _dtype(dtype)
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"HF_DIR {str(hf_dir)!r} does not exist")
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{str(hf_dir)!r} has no config.json: not a Hugging Face model "
                                "folder")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(cfg_path)!r} is not valid JSON: {e}") from None
    family = raw.get("model_type")
    if family not in IMPORT_FAMILIES:
        raise ValueError(f"model_type {family!r} cannot be imported: smoe reads "
                         f"{', '.join(IMPORT_FAMILIES)}")
    if raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method", "?")
        raise ValueError(f"quantization_config (quant_method={method!r}): quantized checkpoints "
                         "cannot be imported; use the unquantized weights")
    _check_out(out_dir)
    from transformers import AutoConfig

    derived, flags = model_config_from_hf(AutoConfig.from_pretrained(str(hf_dir)))
    tensors = _HFTensors(hf_dir)
    notes: list[str] = []
    candidates = [(derived, flags, False)]
    meta = raw.get(_SMOE_KEY)
    if isinstance(meta, dict) and isinstance(meta.get("model"), dict):
        try:
            own = ModelConfig.from_dict(meta["model"])
            own_fmt = hf_format_for(own)
            if model_config_from_hf(own_fmt.config)[0] == derived:
                candidates.insert(0, (own, own_fmt.flags, True))
            else:
                notes.append(f"{_SMOE_KEY} in config.json describes another model: ignored")
        except ValueError as e:
            notes.append(f"{_SMOE_KEY} in config.json is not usable ({e}): ignored")
    for k, (config, cflags, own) in enumerate(candidates):
        try:
            state = from_hf(family, tensors.get, tensors.keys, _key_context(config, cflags),
                            target_dtype)
            num_params = _check_state(config, state)
            break
        except ValueError as e:
            if k == len(candidates) - 1:
                raise ValueError(f"{str(hf_dir)!r} ({family}): {e}") from None
            notes.append(f"{_SMOE_KEY} in config.json does not fit the weights ({e}): read as a "
                         f"plain {family} model")
    if not own:
        if config.moe is not None and family != "glm4_moe":
            n_moe = len(config.moe_layer_indices())
            notes.append(f"aux_loss_coef = router_aux_loss_coef * K / {n_moe} MoE layers (smoe's "
                         "convention); z_loss_coef = 0")
    tmp = _begin(out_dir)
    try:
        tok = import_tokenizer(hf_dir, tmp, notes)
        if tok is not None:
            from smoe.data import load_tokenizer

            vocab = load_tokenizer(tmp).vocab_size
            if vocab > config.vocab_size:
                raise ValueError(f"the tokenizer has {vocab} ids, the model {config.vocab_size}")
        run_cfg = {"format": "smoe-run", "version": 1, "preset": None, "router": None,
                   "model": config.to_dict(),
                   "imported_from": {"path": str(hf_dir.resolve()), "model_type": family,
                                     "architectures": raw.get("architectures")},
                   "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / "config.json").write_text(json.dumps(run_cfg, indent=2) + "\n", encoding="utf-8")
        save_checkpoint(tmp, state, {}, {"step": 0, "tokens_seen": 0, "elapsed_s": 0.0,
                                         "model_config": config.to_dict(),
                                         "imported_from": run_cfg["imported_from"]})
        _finish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ImportResult(out_dir, family, config, num_params, tok, own, notes)


# -- reports ----------------------------------------------------------------------------------
def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def format_export(r: ExportResult, source: str) -> str:
    """What ``smoe export`` prints."""
    step = f" (step {r.step})" if r.step is not None else ""
    lines = [f"exported {source}{step} as {r.family} ({r.architecture}) to {r.out_dir}",
             f"  files: {', '.join(r.files)} ({r.num_tensors} tensors, {_size(r.num_bytes)})",
             f"  tokenizer: {r.tokenizer or 'none'}"]
    lines += [f"  note: {n}" for n in r.notes if not n.startswith("no tokenizer")]
    lines.append(f'load it with: transformers.AutoModelForCausalLM.from_pretrained("{r.out_dir}")')
    return "\n".join(lines)


def format_import(r: ImportResult, source: str) -> str:
    """What ``smoe import`` prints."""
    c = r.config
    if c.moe is not None:
        layers = (f"{c.num_layers} layers ({len(c.moe_layer_indices())} MoE: "
                  f"{c.moe.num_experts} experts, top-{c.moe.top_k}, router {c.moe.router})")
    else:
        layers = f"{c.num_layers} dense layers"
    origin = ("the smoe_config stored in config.json (exact round trip)" if r.used_smoe_config
              else f"derived from the {r.family} config")
    lines = [f"imported {source} ({r.family}) into {r.out_dir}: {r.num_params / 1e6:.2f}M "
             f"parameters, {layers}",
             f"  checkpoint/ at step 0 without optimizer state; tokenizer: {r.tokenizer or 'none'}",
             f"  config: {origin}"]
    lines += [f"  note: {n}" for n in r.notes]
    if r.tokenizer:
        lines.append(f'generate with: smoe generate {r.out_dir} --prompt "..."')
    return "\n".join(lines)
