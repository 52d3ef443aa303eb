"""The Hugging Face format in and out: an smoe model as a transformers checkpoint, and back.

    from smoe.hf.convert import export_hf, import_hf
    export_hf("runs/x", "hf/x")       # config.json + model.safetensors (+ tokenizer)
    import_hf("hf/x", "runs/y")       # an smoe run folder at step 0

``transformers.AutoModelForCausalLM.from_pretrained("hf/x")`` gives the logits of smoe's model
(float32: within 1e-5). Export needs only torch and safetensors; import reads the config with
transformers (its defaults) and the tensors with safetensors, never with pickle.

Which architecture, and how the config is mapped: :mod:`smoe.hf.formats` (:func:`hf_format_for`)
and :mod:`smoe.hf.import_config` (:func:`model_config_from_hf`), re-exported here. This module holds the rest: export and import,
the safetensors files, and what ``smoe export``/``smoe import`` print.

Writes are atomic: everything goes into a temporary folder beside ``out_dir``, renamed at the
end. ``out_dir`` must not exist or be empty. Bad input (a damaged or truncated safetensors file,
an index naming missing shards, a config.json that is not JSON or does not match the weights, a
broken tokenizer.json, an unknown ``model_type``) is one ``ValueError`` (``FileNotFoundError`` /
``FileExistsError`` for missing or occupied folders) naming the file and the problem, and leaves
nothing on disk (:mod:`smoe.hf.files`).

Import keeps the checkpoint's dtype (config.json's ``dtype``, else the dtype holding most bytes;
every floating tensor is cast to it except float32 buffers such as the selection bias) unless
``dtype`` asks for another; the run's config.json records it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from smoe.config import ModelConfig
from smoe.hf.files import (HFTensors, abandon_output, begin_output, check_output,
                           finish_output, read_json, read_safetensors, write_error,
                           write_safetensors)
from smoe.hf.formats import (_SMOE_KEY, EXPORT_FAMILIES, IMPORT_FAMILIES, HFFormat,
                             _key_context, hf_format_for)
from smoe.hf.import_config import _one_line, mla_refusal, model_config_from_hf, unknown_family
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
    dtype: torch.dtype = torch.float32
    notes: list[str] = field(default_factory=list)



_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise ValueError(f"dtype={value!r} is invalid: must be one of float32, bfloat16, "
                         "float16 (or None: keep the stored one)")
    return _DTYPES[value]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _read_run(run_dir: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], int, Path]:
    """(model config, weights, step, weights file) of a run folder's latest checkpoint. The
    only place this module reads smoe's run layout (``smoe.runs``)."""
    from smoe.checkpoint import MODEL_FILE
    from smoe.runs import latest_checkpoint

    try:
        _, folder, state, config = latest_checkpoint(run_dir)
        step = int(state.get("step", 0))
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"RUN_DIR {str(run_dir)!r} has a malformed config.json or checkpoint "
                         f"state ({type(e).__name__}: {_one_line(e)})") from None
    weights = Path(folder) / MODEL_FILE
    return config, read_safetensors(weights), step, weights


def _load_smoe(source: Any) -> tuple[ModelConfig, dict[str, torch.Tensor], Path | None,
                                     int | None]:
    """(config, state dict, tokenizer.json path, step) of an smoe model or run folder."""
    if isinstance(source, torch.nn.Module):
        config = getattr(source, "config", None)
        if not isinstance(config, ModelConfig):
            raise ValueError("export_hf needs an smoe SMoETransformer (or a run folder), not "
                             f"{type(source).__name__}")
        return config, dict(source.state_dict()), None, None
    run_dir = Path(source)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"RUN_DIR {str(run_dir)!r} is a file, not an smoe run folder")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"RUN_DIR {str(run_dir)!r} does not exist")
    config, state, step, weights = _read_run(run_dir)
    try:
        _check_state(config, state)
    except ValueError as e:
        raise ValueError(f"{str(weights)!r} does not match the run's model config: "
                         f"{str(e).removeprefix('the weights do not fit the model config: ')}"
                         ) from None
    return config, state, run_dir / "tokenizer.json", step


def _check_state(config: ModelConfig, state: Mapping[str, torch.Tensor]) -> int:
    """Check ``state`` against the model ``config`` builds (keys and shapes, on the meta
    device); a one-line ``ValueError`` naming the first differences. Returns the parameter
    count."""
    from smoe.model import SMoETransformer

    with torch.device("meta"):
        model = SMoETransformer(config)
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    shapes = [f"{k} is {tuple(state[k].shape)}, the config implies {tuple(want[k].shape)}"
              for k in sorted(set(want) & set(state)) if state[k].shape != want[k].shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", extra), ("shape", shapes)):
        if items:
            problems.append(f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                            f" ({len(items)})")
    if problems:
        raise ValueError("the weights do not fit the model config: " + "; ".join(problems))
    return model.num_params()


# -- export and import ------------------------------------------------------------------------
def export_hf(run_dir_or_model: str | Path | torch.nn.Module, out_dir: str | Path, *,
              dtype: torch.dtype | str | None = None, tokenizer: str | Path | None = None,
              max_shard_bytes: int = _DEFAULT_SHARD_BYTES) -> ExportResult:
    """Write an smoe model (a run folder's latest checkpoint, or an ``SMoETransformer``) as a
    Hugging Face folder: ``config.json``, ``model.safetensors`` (shards and an index above
    ``max_shard_bytes``), and the tokenizer (``tokenizer.json`` + ``tokenizer_config.json``)
    when the run has one or ``tokenizer`` names a ``tokenizer.json``.

    ``dtype``: cast the weights (default: as stored). Raises ``ValueError`` naming the
    features no supported family expresses exactly, or a damaged checkpoint or tokenizer;
    ``FileExistsError`` if ``out_dir`` is not empty; ``FileNotFoundError`` for a missing run.
    Nothing is left behind on error.
    """
    from smoe import __version__

    target_dtype = _dtype(dtype)
    out_dir = Path(out_dir)
    check_output(out_dir)
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
    tmp, created = begin_output(out_dir)
    try:
        eos_id, tok_kind = export_tokenizer(tok_path, tmp, config.max_seq_len,
                                             config.vocab_size, notes)
        fmt = hf_format_for(config, eos_token_id=eos_id)
        ctx = _key_context(config, fmt.flags)
        files, count, nbytes = write_safetensors(
            to_hf(fmt.family, state, ctx, target_dtype), tmp, max_shard_bytes)
        hf_config = dict(fmt.config)
        stored = target_dtype or _main_dtype(state)
        hf_config["dtype"] = _dtype_name(stored)
        hf_config[_SMOE_KEY] = {"model": config.to_dict(), "smoe_version": __version__}
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n",
                                         encoding="utf-8")
        files = ["config.json"] + files + (["tokenizer.json", "tokenizer_config.json"]
                                           if tok_kind else [])
        notes += _export_notes(config, fmt)
        finish_output(tmp, out_dir)
    except OSError as e:  # disk full, no permission: one line, and nothing left behind
        abandon_output(tmp, created)
        if isinstance(e, (FileExistsError, FileNotFoundError)):
            raise
        raise write_error(out_dir, e) from None
    except BaseException:
        abandon_output(tmp, created)
        raise
    return ExportResult(out_dir, fmt.family, fmt.architecture, files, count, nbytes, step,
                        tok_kind, notes)


def _main_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype holding most bytes of a state dict (float32 if none)."""
    sizes: dict[torch.dtype, int] = {}
    for t in state.values():
        if t.is_floating_point():
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel() * t.element_size()
    return max(sizes, key=sizes.get) if sizes else torch.float32


def _export_notes(config: ModelConfig, fmt: HFFormat) -> list[str]:
    notes = []
    if "shared_ungated" in fmt.flags:
        notes.append("the shared expert has no gate in smoe: written with a zero gate "
                     "(sigmoid(0) = 0.5) and its down projection doubled (exact)")
    if "no_shared" in fmt.flags:
        notes.append(f"{fmt.family} always builds a shared expert: written with width 0 "
                     "(its output is exactly 0)")
    if fmt.family == "gpt_oss":
        notes.append("gpt_oss attention: zero q/k/v/o biases, sinks of -inf (no sink) and "
                     "every layer full attention, which is smoe's attention exactly")
        missing = [n for n, f in (("expert", "no_expert_bias"), ("router", "no_router_bias"))
                   if f in fmt.flags]
        if missing:
            notes.append(f"gpt_oss always has {' and '.join(missing)} biases: written as zeros")
    m = config.moe
    if m is not None and fmt.family != "glm4_moe":
        notes.append(f"router_aux_loss_coef = aux_loss_coef * {len(config.moe_layer_indices())}"
                     f" MoE layers / K={m.top_k} (transformers divides by T, not T*K, and "
                     "pools the layers)")
    return notes


def _read_hf_config(hf_dir: Path) -> dict[str, Any]:
    """config.json of an HF folder, checked for what import can use, with one-line errors."""
    if hf_dir.exists() and not hf_dir.is_dir():
        raise ValueError(f"HF_DIR {str(hf_dir)!r} is a file, not a Hugging Face model folder "
                         "(config.json and safetensors)")
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"HF_DIR {str(hf_dir)!r} does not exist")
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{str(hf_dir)!r} has no config.json: not a Hugging Face model "
                                "folder")
    raw = read_json(cfg_path, "Hugging Face config.json")
    mla = mla_refusal(raw)
    if mla:
        raise ValueError(f"{str(cfg_path)!r}: {mla}")
    family = raw.get("model_type")
    if family not in IMPORT_FAMILIES:
        raise ValueError(f"{str(cfg_path)!r}: {unknown_family(family)}")
    return raw


def _refuse_quantized(raw: Mapping[str, Any], hf_dir: Path) -> None:
    """Checked after the architecture, so that a model smoe cannot express is not sent to
    look for unquantized weights first."""
    quant = raw.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise ValueError(f"{str(hf_dir / 'config.json')!r}: quantization_config (quant_method="
                         f"{method!r}): quantized checkpoints cannot be imported; use the "
                         "unquantized weights")


def _checkpoint_dtype(raw: Mapping[str, Any], tensors: HFTensors) -> torch.dtype:
    """The dtype import keeps: config.json's ``dtype`` (``torch_dtype`` before transformers
    5) when it names a floating type, else the floating dtype holding most bytes."""
    named = raw.get("dtype") or raw.get("torch_dtype")
    if isinstance(named, str) and named in _DTYPES:
        return _DTYPES[named]
    sizes = tensors.dtypes()
    return max(sizes, key=sizes.get) if sizes else torch.float32


def import_hf(hf_dir: str | Path, out_dir: str | Path, *,
              dtype: torch.dtype | str | None = None) -> ImportResult:
    """Write an HF causal LM folder (one of :data:`IMPORT_FAMILIES`) as an smoe run folder:
    ``config.json`` (``{"format": "smoe-run", "model": ..., "dtype": ...}``), ``checkpoint/``
    at step 0 with the weights and no optimizer state, and ``tokenizer.json`` when smoe can use
    the HF one (a tokenizer it cannot use is left out with a note).

    ``dtype``: the weights' dtype in the run; default ``None`` keeps the checkpoint's (see the
    module docstring). Raises ``ValueError`` naming what smoe cannot express exactly or what is
    wrong with a file, ``FileNotFoundError`` for a missing folder or weights,
    ``FileExistsError`` if ``out_dir`` is not empty; nothing is written then.
    """
    from smoe.checkpoint import save_checkpoint

    target_dtype = _dtype(dtype)
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    raw = _read_hf_config(hf_dir)
    family = raw["model_type"]
    check_output(out_dir)
    from transformers import AutoConfig

    try:
        hf_cfg = AutoConfig.from_pretrained(str(hf_dir))
    except Exception as e:  # strict validation of transformers' config classes
        raise ValueError(f"{str(hf_dir / 'config.json')!r} does not fit transformers' {family} "
                         f"config: {_one_line(e)}") from None
    try:
        derived, flags = model_config_from_hf(hf_cfg)
    except ValueError as e:
        raise ValueError(f"{str(hf_dir)!r}: {e}") from None
    _refuse_quantized(raw, hf_dir)
    tensors = HFTensors(hf_dir)
    notes: list[str] = []
    if target_dtype is None:
        target_dtype = _checkpoint_dtype(raw, tensors)
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
        except (ValueError, TypeError) as e:
            notes.append(f"{_SMOE_KEY} in config.json is not usable ({e}): ignored")
    for k, (config, cflags, own) in enumerate(candidates):
        try:
            state = from_hf(family, tensors.get, tensors.keys, _key_context(config, cflags),
                            target_dtype)
            num_params = _check_state(config, state)
            break
        except ValueError as e:
            if k == len(candidates) - 1:
                raise ValueError(f"{str(hf_dir)!r} ({family}): config.json and the weights "
                                 f"disagree: {e}") from None
            notes.append(f"{_SMOE_KEY} in config.json does not fit the weights ({e}): read as a "
                         f"plain {family} model")
    if not own:
        if config.moe is not None and family != "glm4_moe":
            n_moe = len(config.moe_layer_indices())
            notes.append(f"aux_loss_coef = router_aux_loss_coef * K / {n_moe} MoE layers (smoe's "
                         "convention); z_loss_coef = 0")
    tmp, created = begin_output(out_dir)
    try:
        tok = import_tokenizer(hf_dir, tmp, notes, config.vocab_size)
        imported_from = {"path": str(hf_dir.resolve()), "model_type": family,
                         "architectures": raw.get("architectures")}
        run_cfg = {"format": "smoe-run", "version": 1, "preset": None, "router": None,
                   "model": config.to_dict(), "dtype": _dtype_name(target_dtype),
                   "imported_from": imported_from,
                   "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / "config.json").write_text(json.dumps(run_cfg, indent=2) + "\n", encoding="utf-8")
        save_checkpoint(tmp, state, {}, {"step": 0, "tokens_seen": 0, "elapsed_s": 0.0,
                                         "model_config": config.to_dict(),
                                         "dtype": run_cfg["dtype"],
                                         "imported_from": imported_from})
        finish_output(tmp, out_dir)
    except OSError as e:  # disk full, no permission: one line, and nothing left behind
        abandon_output(tmp, created)
        if isinstance(e, (FileExistsError, FileNotFoundError)):
            raise
        raise write_error(out_dir, e) from None
    except BaseException:
        abandon_output(tmp, created)
        raise
    return ImportResult(out_dir, family, config, num_params, tok, own, target_dtype, notes)


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
             f"  checkpoint/ at step 0 without optimizer state, {_dtype_name(r.dtype)}; "
             f"tokenizer: {r.tokenizer or 'none'}",
             f"  config: {origin}"]
    lines += [f"  note: {n}" for n in r.notes]
    if r.tokenizer:
        lines.append(f'generate with: smoe generate {r.out_dir} --prompt "..."')
    return "\n".join(lines)
