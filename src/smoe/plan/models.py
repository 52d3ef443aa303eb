"""Published model configs shipped with smoe (``src/smoe/plan/catalog/*.json``), so that
``smoe plan deepseek-v3`` needs no download. Each file is the model's ``config.json`` (the
fields the planner reads, as published) plus ``_source_url`` (where it comes from) and
``_note``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["CATALOG_DIR", "catalog_names", "load_named"]

CATALOG_DIR = Path(__file__).with_name("catalog")


def catalog_names() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in CATALOG_DIR.glob("*.json")))


def load_named(name: str) -> dict[str, Any] | None:
    """The catalog config called ``name`` (case-insensitive), or ``None``."""
    path = CATALOG_DIR / f"{name.lower()}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
