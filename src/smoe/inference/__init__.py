"""Inference: autoregressive generation with a KV cache (post-build transforms such as
quantization and offloading also live here)."""

from smoe.inference.generate import generate, sample_next

__all__ = ["generate", "sample_next"]
