"""Inference: key/value caches and autoregressive generation (post-build transforms such as
quantization and offloading also live here)."""

from smoe.inference.cache import SlotBatch, SlotCache, StaticCache
from smoe.inference.generate import generate, sample_next

__all__ = ["generate", "sample_next", "StaticCache", "SlotCache", "SlotBatch"]
