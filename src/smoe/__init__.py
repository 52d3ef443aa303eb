"""smoe: sparse mixture-of-experts layers, models, training, interop and operations.

``import smoe`` needs only torch; optional parts (``smoe.hf``, ``smoe.serve``, plotting) import
their extras lazily.
"""

from smoe.config import MoEConfig
from smoe.nn.moe import MoEInfo, MoELayer

__version__ = "0.1.0"
__all__ = ["MoEConfig", "MoELayer", "MoEInfo", "__version__"]
