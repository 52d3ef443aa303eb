"""`smoe train`: train a preset (or a config file's model) into a run folder, or resume one."""

from __future__ import annotations

import argparse
import signal
import sys
import textwrap

from smoe.cli.errors import CLIError
from smoe.cli.options import (add_runtime_options, apply_runtime, load_config_file,
                              merge_settings, non_negative_int, parse_set, positive_int)

__all__ = ["register_train", "TRAIN_DEFAULTS"]

#: TrainConfig's defaults, for --help without importing torch (a test holds them equal).
TRAIN_DEFAULTS = dict(steps=200, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=20,
                      grad_accum=1, eval_every=50, eval_batches=8, checkpoint_every=100,
                      keep_checkpoints=2, log_every=1, seed=0)

_DESCRIPTION = """\
Train a model on the default corpus (or --data) into RUN_DIR: config.json, tokenizer.json,
metrics.jsonl, tb/, checkpoint/ (the latest) and previous-checkpoints/ (older ones, --keep-
checkpoints in all). The same seed and data give the same losses.

The model: --preset, changed by a --config file ([model], [moe], [train], [data] sections;
TOML or JSON), by --set SECTION.FIELD=VALUE (any ModelConfig/MoEConfig/TrainConfig/DataConfig
field) and by the explicit flags, in that order (a later one wins).
{presets}
{routers}

Stopping: Ctrl-C (SIGINT) or SIGTERM finishes the current step, writes a checkpoint and exits
(130 / 143); --resume continues exactly. Resuming with a different --steps continues the
learning-rate schedule without a jump: from the resume point the rest of the cosine decay is
stretched (or compressed) to end at the new --steps (a run that had finished stays at
--min-lr). --steps below the checkpoint's step is refused. A failed --resume changes nothing.
--overwrite replaces an existing run folder (e.g. from a failed start)."""


def register_train(sub: argparse._SubParsersAction) -> None:
    from smoe.config import PRESETS, ROUTERS

    d = TRAIN_DEFAULTS
    p = sub.add_parser("train", help="train a model into a run folder (or --resume one)",
                       description=_DESCRIPTION.format(
                           presets=textwrap.fill("Presets: " + ", ".join(PRESETS), 95),
                           routers=textwrap.fill("Routers: " + ", ".join(ROUTERS), 95)),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder (new or empty; "
                   "with --resume an existing run)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest sound checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the smoe run in --out (e.g. one whose start failed)")
    p.add_argument("--init-from", default=None, metavar="SRC_RUN_DIR",
                   help="start a new run from this run's model config, latest weights and "
                        "tokenizer (a trained run or an `smoe import` folder); the model comes "
                        "from there, so no --preset/--router")
    m = p.add_argument_group("model")
    m.add_argument("--preset", default=None, metavar="PRESET",
                   help=f"model preset: {', '.join(PRESETS)} (default tiny-moe)")
    m.add_argument("--config", default=None, metavar="FILE",
                   help="a .toml or .json file with [model] (preset = ..., ModelConfig fields), "
                        "[moe], [train] and [data] sections")
    m.add_argument("--set", action="append", default=None, metavar="SECTION.FIELD=VALUE",
                   help="set one field (repeatable), e.g. --set moe.top_k=4 --set train.lr=1e-3")
    m.add_argument("--router", default=None, choices=ROUTERS, metavar="ROUTER",
                   help=f"MoE router: {', '.join(ROUTERS)} (default: the preset's, "
                        "softmax_topk)")
    m.add_argument("--num-experts", type=positive_int, default=None, help="experts per MoE layer")
    m.add_argument("--top-k", type=positive_int, default=None, help="experts per token")
    m.add_argument("--capacity-factor", type=float, default=None,
                   help="expert capacity = factor * tokens * top_k / experts (default dropless)")
    m.add_argument("--aux-loss-coef", type=float, default=None,
                   help="load-balancing loss weight (default 0.01)")
    m.add_argument("--z-loss-coef", type=float, default=None,
                   help="router z-loss weight (default 0.001)")
    m.add_argument("--allow-noncausal-router", action="store_true",
                   help="train with expert_choice (it sees later tokens; the model cannot "
                        "generate)")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=positive_int, default=None,
                   help=f"optimizer updates (default {d['steps']})")
    t.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"sequences per update (default {d['batch_size']})")
    t.add_argument("--seq-len", type=positive_int, default=None,
                   help=f"tokens per sequence (default {d['seq_len']})")
    t.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default "
                   f"{d['lr']})")
    t.add_argument("--min-lr", type=float, default=None, help="final learning rate "
                   "(default lr / 10)")
    t.add_argument("--warmup-steps", type=non_negative_int, default=None,
                   help=f"linear warm-up updates (default {d['warmup_steps']})")
    t.add_argument("--grad-accum", type=positive_int, default=None,
                   help=f"micro-batches per update, must divide --batch-size (default "
                        f"{d['grad_accum']})")
    t.add_argument("--seed", type=non_negative_int, default=None,
                   help=f"seed of the model init and data order (default {d['seed']})")
    t.add_argument("--eval-every", type=non_negative_int, default=None,
                   help=f"updates between evaluations, 0: only at the end (default "
                        f"{d['eval_every']})")
    t.add_argument("--eval-batches", type=positive_int, default=None,
                   help=f"validation batches per evaluation (default {d['eval_batches']})")
    t.add_argument("--checkpoint-every", type=non_negative_int, default=None,
                   help=f"updates between checkpoints, 0: only at the end (default "
                        f"{d['checkpoint_every']})")
    t.add_argument("--keep-checkpoints", type=positive_int, default=None,
                   help=f"newest checkpoints kept (default {d['keep_checkpoints']})")
    t.add_argument("--log-every", type=positive_int, default=None,
                   help=f"updates between metrics lines (default {d['log_every']})")
    t.add_argument("--bf16", action="store_true", default=None,
                   help="bfloat16 autocast for the forward passes (= --dtype bfloat16)")
    t.add_argument("--expert-parallel", type=positive_int, default=None, metavar="D",
                   help="under torchrun: shard the experts over D processes (DP x EP = "
                   "--nproc_per_node); equal to one process, rank 0 writes the run")
    t.add_argument("--no-progress", action="store_true",
                   help="no progress bar: one line per --log-every steps instead")
    dg = p.add_argument_group("data")
    dg.add_argument("--data", action="append", default=None, metavar="PATH",
                    help="a text file or folder (repeatable); default: the built-in two-domain "
                         "corpus")
    dg.add_argument("--tokenizer", choices=("byte", "bpe"), default=None,
                    help="byte (default) or a BPE trained on the train split")
    add_runtime_options(p, dtype_help="float32 (default) or bfloat16 (autocast; parameters "
                                      "and optimizer stay float32)")
    p.set_defaults(handler=_run)


def _settings(a: argparse.Namespace) -> dict[str, dict]:
    """Config file < --set < explicit flags, as sections."""
    flags = {
        "train": {"steps": a.steps, "batch_size": a.batch_size, "seq_len": a.seq_len,
                  "lr": a.lr, "min_lr": a.min_lr, "warmup_steps": a.warmup_steps,
                  "grad_accum": a.grad_accum, "eval_every": a.eval_every,
                  "eval_batches": a.eval_batches, "checkpoint_every": a.checkpoint_every,
                  "keep_checkpoints": a.keep_checkpoints, "log_every": a.log_every,
                  "seed": a.seed, "bf16": True if a.bf16 or a.dtype == "bfloat16" else None},
        "moe": {"num_experts": a.num_experts, "top_k": a.top_k,
                "capacity_factor": a.capacity_factor, "aux_loss_coef": a.aux_loss_coef,
                "z_loss_coef": a.z_loss_coef},
        "model": {"preset": a.preset},
        "data": {"tokenizer": a.tokenizer, "paths": a.data},
    }
    flags = {s: {k: v for k, v in f.items() if v is not None} for s, f in flags.items()}
    file = load_config_file(a.config) if a.config else {}
    return merge_settings(file, parse_set(a.set), flags)


def _run(a: argparse.Namespace) -> int:
    if a.dtype == "float16":
        raise CLIError("--dtype float16 is not supported for training (it needs loss scaling); "
                       "use bfloat16")
    if a.resume and a.init_from is not None:
        raise CLIError("--init-from starts a new run and --resume continues one: give one of "
                       "them")
    if a.resume and a.overwrite:
        raise CLIError("--overwrite starts the run again and --resume continues it: give one of "
                       "them")
    s = _settings(a)
    train_fields, moe_fields = s.get("train", {}), s.get("moe", {})
    model_fields = dict(s.get("model", {}))
    data_fields = dict(s.get("data", {}))
    steps, warmup = train_fields.get("steps"), train_fields.get("warmup_steps")
    if warmup is not None and warmup > (steps or TRAIN_DEFAULTS["steps"]) and not a.resume:
        raise CLIError(f"--warmup-steps {warmup} is longer than the run (--steps "
                       f"{steps or TRAIN_DEFAULTS['steps']}): the peak learning rate would never "
                       "be reached; give fewer warm-up steps")
    device = apply_runtime(a)
    progress = not a.no_progress
    parallel, log = _parallel(a)
    if parallel is not None and not parallel.is_writer:
        progress = False
    code = _train(a, parallel, log, progress, device, train_fields, moe_fields, model_fields,
                  data_fields)
    if parallel is not None:  # on an error torchrun stops the other ranks
        from smoe.parallel.health import shutdown

        shutdown()  # heartbeat joined, group destroyed: no abort at exit
    return code


def _train(a, parallel, log, progress, device, train_fields, moe_fields, model_fields,
           data_fields) -> int:
    from smoe.train import TrainConfig, TrainingDiverged, resume_run, start_run
    from smoe.train.loop import TrainingStopped
    from smoe.train.report import format_eval

    # Before the loop takes over SIGTERM (data preparation can take a while), it ends the
    # command like Ctrl-C: one line, nothing half-written (files are written atomically).
    previous = _sigterm_as_interrupt()
    try:
        if a.resume:
            unused = sorted(set(moe_fields) | (set(model_fields) - {"preset"}))
            if unused or a.config:
                raise CLIError("a resumed run keeps its model: drop --config and the model "
                               f"settings ({', '.join(unused) or 'the config file'})")
            result = resume_run(a.out, train_fields, progress=progress, device=device,
                                parallel=parallel, log=log,
                                expect={"preset": model_fields.get("preset"),
                                        "router": a.router,
                                        "tokenizer": data_fields.get("tokenizer"),
                                        "data": data_fields.get("paths")})
        else:
            from smoe.train.run import data_config_for

            preset = model_fields.pop("preset", None)
            paths = data_fields.pop("paths", None) or ()
            if isinstance(paths, str):
                paths = (paths,)
            data = data_config_for(paths, data_fields.pop("tokenizer", None), a.init_from,
                                   **data_fields)
            overrides = {k: v for k, v in (("model", model_fields), ("moe", moe_fields)) if v}
            result = start_run(a.out, TrainConfig.from_dict(train_fields), preset=preset, data=data,
                               router=a.router, progress=progress, init_from=a.init_from,
                               replace=a.overwrite, device=device,
                               model_overrides=overrides or None,
                               allow_noncausal_router=a.allow_noncausal_router,
                               parallel=parallel, log=log)
    except TrainingDiverged as exc:
        raise CLIError(f"{exc}; the last checkpoint in {a.out} is intact") from None
    except TrainingStopped as exc:
        name = signal.Signals(exc.signum).name if exc.signum else "stop"
        print(f"smoe train: {name}: stopped at step {exc.step}, checkpoint saved; continue with "
              f"`smoe train --out {a.out} --resume`", file=sys.stderr)
        return 128 + exc.signum if exc.signum else 130
    except TypeError as exc:  # a config file's field of the wrong kind for a dataclass
        raise CLIError(str(exc)) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if parallel is not None and not parallel.is_writer:
        return 0  # rank 0 alone prints
    if result.last_eval is not None:
        print(format_eval(result.last_eval))
    print(f"trained to step {result.step} in {result.elapsed_s:.1f} s; run folder "
          f"{result.run_dir}")
    return 0


def _sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt (the previous handler, or None off the main thread)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


def _parallel(a: argparse.Namespace):
    """(ParallelTraining or None, log function): with --expert-parallel, join torchrun's
    process group and build the DP x EP groups; ranks other than 0 log nothing."""
    if a.expert_parallel is None:
        return None, print
    from smoe.parallel.launch import is_torchrun, setup
    from smoe.train.parallel import ParallelTraining

    if not is_torchrun():
        raise CLIError("--expert-parallel needs torchrun: torchrun --nproc_per_node P -m smoe "
                       "train ... --expert-parallel D (D divides P)")
    try:
        parallel = ParallelTraining(setup(a.expert_parallel))
    except (ValueError, RuntimeError) as exc:
        raise CLIError(str(exc)) from None
    return parallel, (print if parallel.is_writer else (lambda *args, **kw: None))


REGISTER = (register_train,)
