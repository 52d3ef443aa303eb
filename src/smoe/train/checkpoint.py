"""Checkpoints moved to :mod:`smoe.checkpoint` (outside ``train/``, so that loading a run
needs no trainer); the names stay importable from here."""

from smoe.checkpoint import (CHECKPOINT, FORMAT, MODEL_FILE, OPTIMIZER_FILE, PREVIOUS,  # noqa: F401
                             STATE_FILE, checkpoint_dir, list_checkpoints, load_model_weights,
                             load_optimizer_state, read_state, rng_state, safetensors_problem,
                             save_checkpoint, save_tensors, set_rng_state, verify_checkpoint)

__all__ = ["CHECKPOINT", "PREVIOUS", "FORMAT", "save_checkpoint", "checkpoint_dir",
           "list_checkpoints", "verify_checkpoint", "read_state", "load_model_weights",
           "load_optimizer_state", "rng_state", "set_rng_state", "save_tensors"]
