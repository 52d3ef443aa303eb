"""Training metrics: ``metrics.jsonl`` (one JSON object per line), TensorBoard beside it, and the
expert-load statistics the progress bar and the logs show.

Load imbalance of one MoE layer is ``max / mean`` of its tokens per expert (1.0 is perfectly
balanced, ``E`` is everything on one expert); the run-level number is the mean over MoE layers.
The statistics themselves live in :mod:`smoe.monitor.stats`; the functions here keep their names
for the trainer.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any


from smoe._io import atomic_write_text
from smoe.evaluation import load_fractions, load_imbalance  # noqa: F401 (re-exported)

__all__ = ["METRICS_FILE", "TB_DIR", "MetricsLogger", "load_fractions", "load_imbalance",
           "read_metrics", "truncate_metrics"]

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def _clean(v: Any) -> Any:
    """JSON-safe values: non-finite floats become null."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every complete line of ``RUN_DIR/metrics.jsonl`` (a torn last line is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Keep only the lines with ``step <= step`` (what a run resumed at ``step`` will redo is
    dropped); the file is rewritten atomically."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    keep = [r for r in read_metrics(run_dir) if int(r.get("step", 0)) <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


class MetricsLogger:
    """Appends JSON lines to ``RUN_DIR/metrics.jsonl`` and scalars to ``RUN_DIR/tb/``.

    TensorBoard is optional: if ``torch.utils.tensorboard`` cannot be imported the logger
    says so once on stderr and writes only the JSON lines. ``purge_step`` (a resumed run's
    step) makes TensorBoard hide events after it that the crashed run had written.
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True,
                 purge_step: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception as exc:  # tensorboard is an optional extra
                print(f"smoe: TensorBoard logs skipped ({exc.__class__.__name__}: {exc}); "
                      "metrics.jsonl is still written", file=sys.stderr)
            else:
                self._tb = SummaryWriter(str(self.run_dir / TB_DIR), purge_step=purge_step)

    def log(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(_clean(row)) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(row["step"])
            for key, value in row.items():
                scalar = isinstance(value, (int, float)) and not isinstance(value, bool)
                if key != "step" and scalar:
                    self._tb.add_scalar(key, value, step)
                elif key.endswith("_by_domain") and isinstance(value, dict):
                    for d, v in value.items():
                        if isinstance(v, (int, float)):
                            self._tb.add_scalar(f"{key}/{d}", v, step)
            if isinstance(row.get("load_imbalance_per_layer"), list):
                for i, v in zip(row.get("moe_layers", []), row["load_imbalance_per_layer"]):
                    self._tb.add_scalar(f"load_imbalance/layer{i}", v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
