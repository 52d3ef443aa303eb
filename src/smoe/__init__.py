"""smoe: sparse mixture-of-experts layers, models, training, interop and operations.

``import smoe`` needs only torch, and imports it only when a name that needs it is used
(PEP 562 ``__getattr__``): ``smoe --help`` and ``smoe.__version__`` stay instant. Optional parts
(``smoe.hf``, plotting) import their extras lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["MoEConfig", "MoELayer", "MoEInfo", "__version__"]

_LAZY = {"MoEConfig": "smoe.config", "MoELayer": "smoe.nn.moe", "MoEInfo": "smoe.nn.moe"}

if TYPE_CHECKING:
    from smoe.config import MoEConfig
    from smoe.nn.moe import MoEInfo, MoELayer


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'smoe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
