"""A training run in a folder: start one, resume one, load one for generation or evaluation.

``RUN_DIR`` holds::

    config.json       {"format": "smoe-run", "model": ..., "train": ..., "data": ..., ...}
    tokenizer.json    the tokenizer (smoe.data)
    metrics.jsonl     one JSON object per logged step and per evaluation
    tb/               TensorBoard events (when tensorboard is installed)
    checkpoint/       the latest checkpoint (smoe.train.checkpoint)

Nothing is written until every input has been checked: a missing data path, an unknown preset
or a folder that holds something else raise before the folder is touched.

``start_run(..., init_from=SRC)`` starts a new run (step 0, a fresh optimizer and schedule) from
another run's model config, latest weights and tokenizer: a trained run, or a folder written by
``smoe import``. Its metrics then begin with an evaluation at step 0, the starting model's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch

from smoe._io import atomic_write_json
from smoe.checkpoint import checkpoint_dir, load_model_weights, read_state
from smoe.config import ModelConfig, preset as get_preset
from smoe.runs import (RUN_CONFIG, RUN_FORMAT, LoadedRun, generate_text, is_smoe_run,  # noqa: F401
                       latest_checkpoint, load_run, read_run_config)
from smoe.train.config import TrainConfig
from smoe.evaluation import eval_run  # noqa: F401 (re-exported)
from smoe.train.loop import Trainer, stop_on_signals
from smoe.train.metrics import MetricsLogger, truncate_metrics
from smoe.train.optim import rescheduled

__all__ = ["RUN_CONFIG", "RUN_FORMAT", "RESUMABLE_CHANGES", "RunResult", "LoadedRun",
           "is_smoe_run", "read_run_config", "model_config_for", "init_tokenizer_kind",
           "data_config_for", "check_causal",
           "start_run", "resume_run",
           "load_run", "eval_run", "generate_text"]

#: TrainConfig fields a resumed run may change (they do not alter the updates already made;
#: ``steps`` moves the end of the cosine schedule, by the rule of
#: :func:`smoe.train.optim.rescheduled`: the rest of the decay is stretched to the new end).
RESUMABLE_CHANGES = ("steps", "eval_every", "eval_batches", "checkpoint_every", "log_every",
                     "keep_checkpoints")


@dataclass
class RunResult:
    run_dir: Path
    step: int
    elapsed_s: float          # training time of this call (not counting data preparation)
    last_eval: dict[str, Any] | None
    model: torch.nn.Module
    tokenizer: Any


# -- run folders ------------------------------------------------------------------------------
def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_json(path, data)


def _check_fresh_dir(run_dir: Path, replace: bool) -> None:
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise FileExistsError(f"{str(run_dir)!r} exists and is not a folder: choose another "
                              "output folder")
    if not any(run_dir.iterdir()):
        return
    if is_smoe_run(run_dir):
        if replace:
            return
        step = _checkpoint_step(run_dir)
        at = f" (checkpoint at step {step})" if step is not None else ""
        raise FileExistsError(f"{str(run_dir)!r} is an existing smoe run{at}: pass --resume to "
                              "continue it, --overwrite to replace it, or choose a new output "
                              "folder")
    raise FileExistsError(f"{str(run_dir)!r} is not empty and is not an smoe run: nothing was "
                          "written; choose a new or empty output folder")


def _checkpoint_step(run_dir: Path) -> int | None:
    folder = checkpoint_dir(run_dir, warn=False)
    if folder is None:
        return None
    try:
        return int(read_state(folder)["step"])
    except (ValueError, KeyError, OSError):
        return None


# -- building -------------------------------------------------------------------------------
def model_config_for(preset: str, vocab_size: int, seq_len: int, router: str | None = None,
                     train: TrainConfig | None = None, *,
                     overrides: dict[str, dict[str, Any]] | None = None) -> ModelConfig:
    """The preset's config fitted to a tokenizer and a sequence length.

    ``vocab_size`` is the tokenizer's; ``max_seq_len`` grows to ``seq_len`` if needed (RoPE has
    no learned positions). ``router`` replaces the MoE router (``switch`` also sets top_k=1).
    ``overrides``: ``{"model": {field: value}, "moe": {field: value}}`` of ModelConfig and
    MoEConfig fields (a config file's ``[model]``/``[moe]``, ``--set``), applied after the
    router; a new ``model.hidden_size`` carries over to the MoE unless ``moe`` sets its own.
    The train config's ``aux_loss_coef``/``z_loss_coef`` overrides go into the MoE config.
    """
    from smoe.config import MoEConfig, check_known_fields

    overrides = overrides or {}
    model_over = dict(overrides.get("model") or {})
    moe_over = dict(overrides.get("moe") or {})
    model_over.pop("preset", None)
    if "moe" in model_over:
        raise ValueError("model.moe: give the MoE fields in the [moe] section (moe.FIELD)")
    check_known_fields(ModelConfig, model_over)
    check_known_fields(MoEConfig, moe_over)
    cfg = get_preset(preset)
    cfg = cfg.replace(vocab_size=vocab_size, max_seq_len=max(cfg.max_seq_len, seq_len))
    if model_over:
        if "hidden_size" in model_over and cfg.moe is not None:
            moe_over.setdefault("hidden_size", model_over["hidden_size"])
        cfg = dataclasses.replace(cfg, **model_over, moe=cfg.moe.replace(**moe_over)
                                  if cfg.moe is not None and moe_over else cfg.moe)
        moe_over = {}
    changes: dict[str, Any] = {}
    if router is not None:
        changes["router"] = router
        if router == "switch":
            changes["top_k"] = 1
    changes.update(moe_over)
    if train is not None:
        for name in ("aux_loss_coef", "z_loss_coef"):
            if getattr(train, name) is not None:
                changes[name] = getattr(train, name)
    if changes:
        if cfg.moe is None:
            if router is not None or moe_over:
                raise ValueError(f"preset {preset!r} is dense: --router and MoE settings need "
                                 "an MoE preset (e.g. tiny-moe)")
            return cfg
        cfg = cfg.replace(moe=cfg.moe.replace(**changes))
    return cfg


def check_causal(cfg: ModelConfig, allow_noncausal_router: bool = False) -> None:
    """Refuse a router that sees the whole batch (``expert_choice``) for a causal language
    model: it trains, but on information from later tokens, and cannot generate."""
    if cfg.moe is not None and cfg.moe.router == "expert_choice" and not allow_noncausal_router:
        raise ValueError("router='expert_choice' is not causal (each expert picks tokens from the "
                         "whole batch, later tokens included): a language model trained with it "
                         "cannot generate; pass --allow-noncausal-router to train it anyway")


def _build_model(cfg: ModelConfig, device: torch.device | str):
    from smoe.model import SMoETransformer

    return SMoETransformer(cfg).to(device)


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


def _run(run_dir: Path, run_cfg: dict[str, Any], data, *, resume: bool, progress: bool,
         device: torch.device | str, log, init_weights: Path | None = None,
         commit_config: dict[str, Any] | None = None, parallel=None) -> RunResult:
    """``parallel``: a :class:`smoe.train.parallel.ParallelTraining` under torchrun (it shards
    the model and makes the trainer; only its writer rank writes the run folder)."""
    from smoe.data import Batcher, val_batches

    writer = parallel is None or parallel.is_writer

    train_cfg = TrainConfig.from_dict(run_cfg["train"])
    model_cfg = ModelConfig.from_dict(run_cfg["model"])
    batcher = Batcher(data.train, train_cfg.batch_size, train_cfg.seq_len, seed=train_cfg.seed)
    val = val_batches(data.val, train_cfg.micro_batch_size, train_cfg.seq_len,
                      max_batches=train_cfg.eval_batches * train_cfg.grad_accum)
    bpt: dict[str | None, float] = {None: data.val.bytes_per_token()}
    for name in data.val.domain_names:
        if data.val.num_tokens(name):
            bpt[name] = data.val.bytes_per_token(name)

    _seed_all(train_cfg.seed)
    model = _build_model(model_cfg, device)
    folder = checkpoint_dir(run_dir, warn=False) if resume else None
    if folder is not None:
        init_weights = None  # the run's own checkpoint has the weights
    if init_weights is not None:
        model.load_state_dict(load_model_weights(init_weights, device), strict=True)
    make_trainer = Trainer
    if parallel is not None:
        model = parallel.shard(model)
        make_trainer = parallel.trainer
    trainer = make_trainer(model, train_cfg, batcher, val, val_bytes_per_token=bpt,
                           domain_names=data.val.domain_names, run_dir=run_dir,
                           progress=progress)
    if folder is not None:
        trainer.load_checkpoint(folder)
        log(f"resuming {run_dir} from step {trainer.step} ({folder.name})")
    elif resume:
        log(f"{run_dir} has no checkpoint yet: starting it from step 0")
    # A run initialized from another starts with a step-0 evaluation, logged again below.
    if writer:
        truncate_metrics(run_dir, -1 if init_weights is not None else trainer.step)
    n = model.num_params()
    active = model.num_active_params()
    name = run_cfg.get("preset") or "?"
    if init_weights is not None:
        name = f"{name} initialized from {run_cfg['init_from']['path']}"
    log(f"model {name}: {n / 1e6:.2f}M parameters, {active / 1e6:.2f}M "
        f"active per token; data: {len(data.train):,} train / {len(data.val):,} val tokens "
        f"({', '.join(data.train.domain_names)}), tokenizer {data.tokenizer.kind} "
        f"({data.tokenizer.vocab_size} ids)")
    if trainer.step >= train_cfg.steps:
        log(f"{run_dir} is already at step {trainer.step} of {train_cfg.steps}: nothing to do")
        return RunResult(run_dir, trainer.step, 0.0, None, model, data.tokenizer)
    start = trainer.elapsed_s
    trainer.print_log = not progress and writer
    if commit_config is not None:  # a resumed run's changed settings: written with its
        def commit(folder: Path) -> None:   # first checkpoint, so a failed resume changes nothing
            _write_json(run_dir / RUN_CONFIG, commit_config)
            trainer.on_checkpoint = None
        trainer.on_checkpoint = commit
    metrics = (MetricsLogger(run_dir, purge_step=trainer.step or None) if writer
               else contextlib.nullcontext())
    with stop_on_signals(trainer), metrics as logger:
        trainer.logger = logger
        if init_weights is not None and trainer.val:  # where the new run starts from
            ev = trainer.evaluate()  # every rank: the forward is distributed
            if logger is not None:
                logger.log(ev)
        last_eval = trainer.fit()
    return RunResult(run_dir, trainer.step, trainer.elapsed_s - start, last_eval, model,
                     data.tokenizer)


@dataclass
class _InitSource:
    """What ``init_from`` gives a new run."""

    run_dir: Path
    config: dict[str, Any]       # the source's config.json
    weights: Path                # its latest checkpoint folder
    step: int
    model: ModelConfig
    tokenizer: Any               # None: the source has no tokenizer.json


def _init_source(src: str | Path) -> _InitSource:
    from smoe.data import TOKENIZER_FILE, load_tokenizer

    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"--init-from {str(src)!r} does not exist")
    try:
        cfg = read_run_config(src)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"--init-from {str(src)!r} is not an smoe run ({e}); give a run folder "
                         "made by `smoe train` or `smoe import`") from None
    try:
        cfg, folder, state, model = latest_checkpoint(src)
    except FileNotFoundError:
        raise FileNotFoundError(f"--init-from {str(src)!r} has no checkpoint: nothing to start "
                                "from (train it first, or import the model again)") from None
    _check_weights(folder, model, src)
    tok = load_tokenizer(src) if (src / TOKENIZER_FILE).is_file() else None
    return _InitSource(src, cfg, folder, int(state["step"]), model, tok)


def _check_weights(folder: Path, cfg: ModelConfig, src: Path) -> None:
    """The checkpoint holds exactly the tensors, of the shapes, that ``cfg``'s model has (read
    from the safetensors header; nothing is loaded)."""
    from safetensors import safe_open

    from smoe.model import SMoETransformer
    from smoe.checkpoint import MODEL_FILE

    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in SMoETransformer(cfg).state_dict().items()}
    with safe_open(str(folder / MODEL_FILE), framework="pt") as f:
        have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if have != want:
        wrong = sorted(set(have) ^ set(want)) or sorted(k for k in want if have[k] != want[k])
        more = ", ..." if len(wrong) > 3 else ""
        raise ValueError(f"--init-from {str(src)!r}: the checkpoint's weights do not fit its "
                         f"model config ({', '.join(wrong[:3])}{more})")


def init_tokenizer_kind(src: str | Path) -> str | None:
    """The tokenizer kind of a run started with ``init_from=src``: that of ``src``'s
    ``tokenizer.json``, or ``None`` when it has none. Raises if ``src`` cannot be started from."""
    tok = _init_source(src).tokenizer
    return tok.kind if tok is not None else None


def data_config_for(paths: Sequence[str] = (), tokenizer: str | None = None,
                    init_from: str | Path | None = None, **fields: Any):
    """The :class:`smoe.data.DataConfig` of a new run: ``tokenizer`` ``None`` means ``byte``,
    or for a run started from ``init_from`` the kind of that run's tokenizer (a source without
    ``tokenizer.json`` needs ``tokenizer="byte"`` given explicitly)."""
    from smoe.config import check_known_fields
    from smoe.data import DataConfig

    check_known_fields(DataConfig, fields)
    if tokenizer is None and init_from is not None:
        tokenizer = init_tokenizer_kind(init_from)
        if tokenizer is None:
            raise ValueError(f"{str(init_from)!r} has no tokenizer.json: pass --tokenizer byte to "
                             "train its model on bytes (257 ids; the model's vocabulary must "
                             "hold them)")
    return DataConfig(paths=tuple(paths), tokenizer=tokenizer or "byte", **fields)


def _fit_init_model(cfg: ModelConfig, train: TrainConfig) -> ModelConfig:
    """The source's model config with the train config's MoE loss overrides."""
    if train.seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len={train.seq_len} is longer than the model's context "
                         f"(max_seq_len={cfg.max_seq_len}): give --seq-len {cfg.max_seq_len} or "
                         "less")
    changes = {k: getattr(train, k) for k in ("aux_loss_coef", "z_loss_coef")
               if getattr(train, k) is not None}
    if changes and cfg.moe is not None:
        cfg = cfg.replace(moe=cfg.moe.replace(**changes))
    return cfg


def start_run(run_dir: str | Path, train: TrainConfig, *, preset: str | None = None,
              data=None, router: str | None = None, replace: bool = False,
              progress: bool = True, device: torch.device | str = "cpu", log=print,
              extra: dict[str, Any] | None = None,
              init_from: str | Path | None = None,
              model_overrides: dict[str, dict[str, Any]] | None = None,
              allow_noncausal_router: bool = False, parallel=None) -> RunResult:
    """Train a new run into ``run_dir`` (missing or empty; with ``replace=True`` an earlier
    smoe run there, finished or from a failed start, is deleted first, once every input has
    been checked). ``model_overrides``: ModelConfig/MoEConfig fields over the preset's (see
    :func:`model_config_for`). A non-causal router (``expert_choice``) is refused unless
    ``allow_noncausal_router``. ``data`` is an :class:`smoe.data.DataConfig` (default:
    the default corpus, byte tokenizer). ``preset`` defaults to ``tiny-moe``.

    ``init_from``: another run folder (trained, or written by ``smoe import``) whose model
    config, latest weights and tokenizer the new run starts from, at step 0 with a fresh
    optimizer and schedule. The model comes from there, so ``preset`` and ``router`` must be
    ``None``; ``data.tokenizer`` must be the kind of the source's ``tokenizer.json``
    (``data=None``: that kind). A source without one needs ``tokenizer="byte"`` and a
    vocabulary of at least 257 ids.
    """
    from smoe.data import ByteTokenizer, DataConfig, prepare_data

    run_dir = Path(run_dir)
    src = None
    if init_from is not None:
        given = [f"{k}={v!r}" for k, v in (("preset", preset), ("router", router),
                                           ("model_overrides", model_overrides))
                 if v]
        if given:
            raise ValueError(f"{' and '.join(given)} conflicts with --init-from: the model (its "
                             f"size and router) comes from {str(init_from)!r}")
        if _abs(init_from) == _abs(run_dir):
            raise ValueError(f"--init-from {str(init_from)!r} is the output folder: give a new "
                             "folder for the new run")
        src = _init_source(init_from)
    else:
        preset = preset if preset is not None else "tiny-moe"
    writer = parallel is None or parallel.is_writer  # under torchrun: rank 0 alone writes
    if writer:
        _check_fresh_dir(run_dir, replace)
    tokenizer = None
    if src is not None:
        kind = src.tokenizer.kind if src.tokenizer is not None else "byte"
        data_cfg = data if data is not None else DataConfig(tokenizer=kind)
        if src.tokenizer is not None:
            tokenizer = src.tokenizer
            if data_cfg.tokenizer != kind:
                raise ValueError(f"tokenizer={data_cfg.tokenizer!r} differs from the {kind} "
                                 f"tokenizer of {str(src.run_dir)!r}: its model reads that "
                                 "tokenizer's ids (leave --tokenizer out)")
        elif data is None or data_cfg.tokenizer != "byte":
            raise ValueError(f"{str(src.run_dir)!r} has no tokenizer.json: pass --tokenizer byte "
                             f"(257 ids) to train its model (vocab_size={src.model.vocab_size}) on "
                             "bytes")
        else:
            tokenizer = ByteTokenizer()
        if tokenizer.vocab_size > src.model.vocab_size:
            raise ValueError(f"the {tokenizer.kind} tokenizer has {tokenizer.vocab_size} ids, more "
                             f"than the vocab_size={src.model.vocab_size} of the model in "
                             f"{str(src.run_dir)!r}")
        model_cfg = _fit_init_model(src.model, train)
        check_causal(model_cfg, allow_noncausal_router)
    else:
        get_preset(preset)  # an unknown name raises here, before the data is read
        data_cfg = data if data is not None else DataConfig()
    # Absolute data paths, so that the run resumes from any working directory.
    data_cfg = dataclasses.replace(data_cfg, paths=tuple(_abs(p) for p in data_cfg.paths))
    prepared = prepare_data(data_cfg, tokenizer=tokenizer)
    if src is None:
        model_cfg = model_config_for(preset, prepared.tokenizer.vocab_size, train.seq_len, router,
                                     train, overrides=model_overrides)
    check_causal(model_cfg, allow_noncausal_router)
    for name, stream in (("train", prepared.train), ("validation", prepared.val)):
        if len(stream) < train.seq_len + 1:
            raise ValueError(f"the {name} split has {len(stream)} tokens, fewer than seq_len + 1 "
                             f"= {train.seq_len + 1}: give more data or a smaller --seq-len")
    if writer and replace and run_dir.exists() and any(run_dir.iterdir()):
        shutil.rmtree(run_dir)  # _check_fresh_dir made sure it is an smoe run
    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
    run_cfg = {"format": RUN_FORMAT, "version": 1, "preset": preset, "router": router,
               "model": model_cfg.to_dict(), "train": train.to_dict(),
               "data": data_cfg.to_dict(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               **(extra or {})}
    if src is not None:
        run_cfg["preset"] = src.config.get("preset")
        run_cfg["router"] = src.config.get("router")
        run_cfg["init_from"] = {"path": _abs(src.run_dir), "step": src.step,
                                **({"imported_from": src.config["imported_from"]}
                                   if "imported_from" in src.config else {})}
    # config.json first: a folder it is in is an smoe run, which --overwrite may replace.
    if writer:
        _write_json(run_dir / RUN_CONFIG, run_cfg)
        prepared.tokenizer.save(run_dir)
    return _run(run_dir, run_cfg, prepared, resume=False, progress=progress, device=device,
                log=log, init_weights=src.weights if src is not None else None,
                parallel=parallel)


def resume_run(run_dir: str | Path, changes: dict[str, Any] | None = None, *,
               expect: dict[str, Any] | None = None, progress: bool = True,
               device: torch.device | str = "cpu", log=print, parallel=None) -> RunResult:
    """Continue the run in ``run_dir`` from its checkpoint, exactly as if never stopped.

    ``changes``: TrainConfig fields to change; only :data:`RESUMABLE_CHANGES` may differ from
    the saved values. ``expect``: other settings the caller gave (``preset``, ``router``,
    ``tokenizer``, ``data``), checked against the run's.
    """
    from smoe.data import DataConfig, prepare_data

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"nothing to resume: {str(run_dir)!r} does not exist")
    run_cfg = read_run_config(run_dir)
    if "train" not in run_cfg or "data" not in run_cfg:
        raise ValueError(f"{str(run_dir)!r} holds no training settings (an imported model?): "
                         "there is nothing to resume")
    saved = TrainConfig.from_dict(run_cfg["train"])
    for key, value in (changes or {}).items():
        old = getattr(saved, key)
        if key not in RESUMABLE_CHANGES and _differs(value, old):
            raise ValueError(f"{key}={value!r} differs from the run's {old!r}: a resumed run keeps "
                             f"its settings (it may change {', '.join(RESUMABLE_CHANGES)})")
    data_saved = dict(run_cfg["data"])
    for key, value in (expect or {}).items():
        old = {"preset": run_cfg.get("preset"), "router": run_cfg.get("router"),
               "tokenizer": data_saved.get("tokenizer"),
               "data": list(data_saved.get("paths", []))}[key]
        if key == "data" and value is not None:
            value = [_abs(p) for p in value]
        if value is not None and _differs(value, old):
            raise ValueError(f"{key}={value!r} differs from the run's {old!r}: resume with the "
                             "run's settings, or start a new run in a new folder")
    changes = {k: v for k, v in (changes or {}).items() if k in RESUMABLE_CHANGES}
    folder = checkpoint_dir(run_dir)
    step = int(read_state(folder)["step"]) if folder is not None else 0
    train = saved.replace(**{k: v for k, v in changes.items() if k != "steps"})
    if "steps" in changes:
        train = rescheduled(train, step, changes["steps"])  # no jump in the learning rate
    commit = None
    if train != saved:  # written with the first checkpoint: a failed resume changes nothing
        commit = {**run_cfg, "train": train.to_dict()}
        run_cfg = commit
    prepared = prepare_data(DataConfig(**data_saved), run_dir=run_dir)
    init_weights = None
    if "init_from" in run_cfg and folder is None:
        # stopped before its first checkpoint: start again from the source's weights
        init_weights = _init_source(run_cfg["init_from"]["path"]).weights
    return _run(run_dir, run_cfg, prepared, resume=True, progress=progress, device=device,
                log=log, init_weights=init_weights, commit_config=commit, parallel=parallel)


def _abs(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return [str(x) for x in a] != [str(x) for x in b]
    return a != b


