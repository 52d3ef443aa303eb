"""Training: the typed config, AdamW and its schedule, the loop, checkpoints that resume
exactly, and run folders (start, resume; loading a run for inference is :mod:`smoe.runs`,
re-exported here under the old names).

    from smoe.train import TrainConfig, start_run, resume_run, load_run
    result = start_run("runs/x", TrainConfig(steps=200), preset="tiny-moe")
"""

from smoe.train.checkpoint import checkpoint_dir, save_checkpoint
from smoe.train.config import TrainConfig
from smoe.train.loop import (Trainer, TrainingDiverged, TrainingStopped, apply_loss_overrides,
                             evaluate_model)
from smoe.train.metrics import MetricsLogger, load_imbalance, read_metrics
from smoe.train.optim import build_optimizer, lr_at, param_groups
from smoe.train.report import format_eval, format_load_table
from smoe.train.run import (LoadedRun, RunResult, eval_run, generate_text, is_smoe_run, load_run,
                            model_config_for, resume_run, start_run)

__all__ = [
    "TrainConfig", "Trainer", "TrainingDiverged", "TrainingStopped", "apply_loss_overrides", "evaluate_model",
    "build_optimizer", "lr_at", "param_groups", "checkpoint_dir", "save_checkpoint",
    "MetricsLogger", "load_imbalance", "read_metrics", "format_eval", "format_load_table",
    "LoadedRun", "RunResult", "eval_run", "generate_text", "is_smoe_run", "load_run",
    "model_config_for", "resume_run", "start_run",
]
