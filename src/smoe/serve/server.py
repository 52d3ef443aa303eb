"""The server's parts and settings, assembled in one fixed order: model, routing monitor,
engine (continuous batching), engine thread, metrics. ``app.py`` adds HTTP on top."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smoe.serve.loading import ServedModel

__all__ = ["ServeConfig", "ServerState", "build_state"]


@dataclass(frozen=True)
class ServeConfig:
    """``smoe serve``'s settings (each flag of the command is one field).

    max_batch: KV-cache slots, i.e. requests decoded together. max_queue: requests waiting for
    a slot beyond those; more get 429 with Retry-After. max_tokens: the largest ``max_tokens``
    a request may ask for (more: 400); max_prompt_tokens: the longest prompt (default: the
    context minus one). max_prefill_tokens: prompt tokens the engine prefills per step (one
    packed forward; at least one prompt whatever its length). request_timeout: seconds before a request is aborted (504).
    drain_timeout: seconds a graceful shutdown waits for running requests.
    metrics_detail: ``expert`` (per-expert series) or ``summary`` (per layer only).
    """

    max_batch: int = 8
    max_queue: int = 64
    max_tokens: int = 256
    max_prompt_tokens: int | None = None
    max_prefill_tokens: int = 512
    api_key: str | None = None
    request_timeout: float = 300.0
    drain_timeout: float = 30.0
    metrics_detail: str = "expert"
    monitor_window_tokens: int = 512
    monitor_window_s: float = 2.0
    routing_reference: str | None = None
    force_dropless: bool = False
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_tokens", "max_prefill_tokens", "monitor_window_tokens",
                     "retry_after_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be an integer >= 1")
        if not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ValueError(f"max_queue={self.max_queue!r} must be an integer >= 0")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens={self.max_prompt_tokens!r} must be >= 1")
        for name in ("request_timeout", "drain_timeout", "monitor_window_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0 seconds")
        if self.metrics_detail not in ("expert", "summary"):
            raise ValueError(f"metrics_detail={self.metrics_detail!r} must be 'expert' or "
                             "'summary'")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")


@dataclass
class ServerState:
    config: ServeConfig
    served: ServedModel
    engine: Any
    worker: Any
    monitor: Any
    metrics: Any
    context: int
    started: float

    @property
    def max_prompt_tokens(self) -> int:
        return self.config.max_prompt_tokens or self.context - 1


def build_state(served: ServedModel, config: ServeConfig) -> ServerState:
    from smoe.inference.engine import Engine
    from smoe.monitor import RoutingMonitor
    from smoe.serve.metrics import ServerMetrics
    from smoe.serve.worker import EngineWorker

    engine = Engine(served.model, max_batch=config.max_batch,
                    max_prefill_tokens=config.max_prefill_tokens,
                    force_dropless=config.force_dropless)
    monitor = None
    if any(True for _ in served.model.moe_layers()):
        monitor = RoutingMonitor(window_tokens=config.monitor_window_tokens,
                                 reference=Path(config.routing_reference)
                                 if config.routing_reference else "first")
        monitor.attach(served.model.moe_layers())
    worker = EngineWorker(engine, max_queue=config.max_queue, monitor=monitor,
                          monitor_window_s=config.monitor_window_s)
    metrics = ServerMetrics(worker, monitor, detail=config.metrics_detail)
    return ServerState(config, served, engine, worker, monitor, metrics, engine.max_seq_len,
                       time.time())
