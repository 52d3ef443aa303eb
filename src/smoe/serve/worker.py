"""The engine's thread: steps the :class:`~smoe.inference.engine.Engine` while requests are
pending, hands each request's tokens to its asyncio queue, and keeps the live figures the
metrics and the dashboard read (queue depth, batch size, throughput, latencies).

The HTTP handlers run on the event loop and never touch the model: they ``submit`` (bounded:
beyond ``max_batch + max_queue`` pending requests :class:`QueueFull`, which the app answers
with 429 and Retry-After), read events from their queue, and ``abort`` when the client leaves.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from smoe.inference.engine import Engine, SamplingParams, TokenEvent

__all__ = ["EngineWorker", "QueueFull", "Draining", "Submitted"]


class QueueFull(Exception):
    """More requests are pending than the server admits (answer 429)."""


class Draining(Exception):
    """The server is shutting down and takes no new requests (answer 503)."""


@dataclass
class Submitted:
    request_id: str
    events: asyncio.Queue
    prompt_tokens: int
    start: float


def _put_all(items: list[tuple[asyncio.Queue, TokenEvent]]) -> None:
    for q, ev in items:
        q.put_nowait(ev)


class EngineWorker:
    """Runs ``engine.step()`` on a daemon thread. ``monitor_window_s``: close the routing
    monitor's window at least this often (so a quiet server's dashboard still moves)."""

    def __init__(self, engine: Engine, *, max_queue: int, monitor: Any = None,
                 monitor_window_s: float = 2.0, throughput_window_s: float = 10.0) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue={max_queue} must be >= 0")
        self.engine, self.monitor = engine, monitor
        self.max_pending = engine.max_batch + max_queue
        self.monitor_window_s = monitor_window_s
        self.throughput_window_s = throughput_window_s
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tokens: deque[tuple[float, int]] = deque()
        self.generated_tokens = 0
        self.draining = False
        self.error: BaseException | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="smoe-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    async def drain(self, timeout: float) -> None:
        """Refuse new requests and wait (up to ``timeout`` s) for the pending ones."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.num_pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    # -- requests ---------------------------------------------------------------------------
    @property
    def num_pending(self) -> int:
        with self._lock:
            return len(self._queues)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Submitted:
        """Queue a request (raises :class:`QueueFull`, :class:`Draining`, or ValueError from
        the engine for a request that cannot fit)."""
        if self.draining:
            raise Draining("the server is shutting down")
        if self.error is not None:
            raise RuntimeError(f"the engine stopped: {self.error}")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if len(self._queues) >= self.max_pending:
                raise QueueFull(f"{len(self._queues)} requests are pending (limit "
                                f"{self.max_pending}); retry later")
            rid = self.engine.add_request(prompt_ids, params)
            self._queues[rid] = (loop, q)
        self._wake.set()
        return Submitted(rid, q, len(prompt_ids), time.monotonic())

    def abort(self, request_id: str) -> None:
        """Stop a request now (a client left): its slot is freed at the next step."""
        with self._lock:
            known = self._queues.pop(request_id, None) is not None
        if known:
            self.engine.abort(request_id)
            self._wake.set()

    # -- figures ----------------------------------------------------------------------------
    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._tokens and self._tokens[0][0] < now - self.throughput_window_s:
                self._tokens.popleft()
            n = sum(k for _, k in self._tokens)
        return n / self.throughput_window_s

    # -- the thread -------------------------------------------------------------------------
    def _deliver(self, events: list[TokenEvent]) -> None:
        n = sum(ev.token_id is not None for ev in events)
        now = time.monotonic()
        with self._lock:
            if n:
                self._tokens.append((now, n))
                self.generated_tokens += n
            targets = []
            for ev in events:
                entry = self._queues.get(ev.request_id)
                if entry is not None:
                    targets.append((entry, ev))
                    if ev.finished:
                        self._queues.pop(ev.request_id, None)
        # One wake-up of each event loop per step, not one per token: every
        # call_soon_threadsafe writes to the loop's self-pipe.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, TokenEvent]]] = {}
        for (loop, q), ev in targets:
            by_loop.setdefault(loop, []).append((q, ev))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop is closed (shutdown): nobody is listening
                pass

    def _run(self) -> None:
        last_window = time.monotonic()
        try:
            while not self._stop.is_set():
                if self.engine.has_unfinished():
                    self._deliver(self.engine.step())
                else:
                    self._wake.wait(0.1)
                    self._wake.clear()
                if self.monitor is not None and \
                        time.monotonic() - last_window >= self.monitor_window_s:
                    self.monitor.close_window()
                    last_window = time.monotonic()
        except BaseException as exc:  # report, fail every pending request, stop stepping
            self.error = exc
            with self._lock:
                pending = list(self._queues.items())
                self._queues.clear()
            for rid, (loop, q) in pending:
                ev = TokenEvent(rid, None, 0, True, "error")
                try:
                    loop.call_soon_threadsafe(q.put_nowait, ev)
                except RuntimeError:
                    pass
            raise
