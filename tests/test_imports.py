"""The import direction of DESIGN.md: nothing but the training entry points imports the trainer,
and ``nn/`` and ``model.py`` import only torch and config (checked in a fresh interpreter, so
what other tests imported does not hide a dependency)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import smoe

SRC = Path(smoe.__file__).resolve().parent
#: Entry points whose job is to train: they must import smoe.train.
TRAINING_ENTRY_POINTS = {"smoe.cli.train", "smoe.demo", "smoe.__main__", "smoe.cli.__main__"}


def _modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages([str(SRC)], prefix="smoe."):
        if info.name.startswith("smoe.train") or info.name in TRAINING_ENTRY_POINTS:
            continue
        names.append(info.name)
    return sorted(names)


def test_no_module_outside_train_imports_the_trainer():
    modules = _modules()
    assert "smoe.runs" in modules and "smoe.evaluation" in modules and "smoe.serve.app" in modules
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "bad = sorted(m for m in sys.modules if m == 'smoe.train' or "
            "m.startswith('smoe.train.'))\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                           "PATH": "/usr/bin:/bin", "PYTHONPATH": str(SRC.parent)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"these modules import smoe.train: {out.stdout}"
