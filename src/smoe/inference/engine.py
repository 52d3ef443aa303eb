"""Continuous batching: requests join and leave the running batch at token granularity.

Legend: B running requests in a decode step, T prompt tokens, V vocabulary.

    engine = Engine(model, max_batch=8)
    rid = engine.add_request(prompt_ids, SamplingParams(max_tokens=32, temperature=0))
    while engine.has_unfinished():
        for event in engine.step():      # one token per running request per step
            ...                          # event.request_id, event.token_id, event.finished

Each step is planned by a :class:`Scheduler` (plain data in, plain data out, testable without
a model, after vLLM's v1 scheduler): the running requests decode one token each in one batched
forward, and waiting requests are admitted into free KV-cache slots and prefilled, up to a
prefill token budget per step so that a long prompt does not stall the running streams for
long. The prompts admitted in one step are prefilled in one forward, packed end to end into
one row (:class:`PackedPrompts`: each attends only to itself, its keys go to its own slot), so
that no token is padding (padding would run through the experts and count in the routing
monitor) and many short prompts cost one forward, not one each. A running
request is never re-prefilled; a finished or aborted one frees its slot at once.

Every request has its own slot of a :class:`~smoe.inference.cache.SlotCache` and its own
positions, and its own sampling generator (seeded like :func:`smoe.inference.generate`), so its
tokens do not depend on who else is in the batch: the tests hold the engine equal to
``generate`` run on each prompt alone. That holds for MoE layers only when routing is per token:
with a capacity factor, which tokens an expert drops depends on the whole batch, and expert
choice picks tokens across the batch. The engine therefore refuses expert choice and, for
capacity-factor models, refuses unless ``force_dropless=True`` (which switches those layers to
dropless routing, the usual choice for inference).
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from smoe.inference.generate import sample_next

__all__ = ["SamplingParams", "TokenEvent", "StepPlan", "Scheduler", "Engine", "NativeRunner",
           "PackedPrompts"]


@dataclass(frozen=True)
class SamplingParams:
    """How one request is continued. temperature 0 is greedy; ``seed`` seeds the request's own
    generator (None: nondeterministic); generation stops at any of ``stop_token_ids`` (the
    token is emitted, with finish reason ``stop``) or after ``max_tokens`` (``length``)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) \
                or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} must be an integer >= 1")
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature < 1e6):
            raise ValueError(f"temperature={self.temperature!r} must be >= 0 (0 is greedy)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        if self.seed is not None and (isinstance(self.seed, bool)
                                      or not isinstance(self.seed, int)):
            raise ValueError(f"seed={self.seed!r} must be an integer or None")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@dataclass(frozen=True)
class TokenEvent:
    """One new token of one request. ``finished`` with ``finish_reason`` ``stop``, ``length``
    or ``abort`` (an abort event carries ``token_id`` None)."""

    request_id: str
    token_id: int | None
    index: int
    finished: bool = False
    finish_reason: str | None = None


@dataclass(frozen=True)
class StepPlan:
    """What one step runs: ``decode`` (running requests, one token each, in this order) and
    ``prefill`` (waiting requests admitted this step, in arrival order)."""

    decode: tuple[str, ...]
    prefill: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


class Scheduler:
    """FIFO admission into ``num_slots`` slots with a prefill token budget per step.

    Plain bookkeeping: ``add`` a request with its prompt length, ``schedule()`` returns the
    :class:`StepPlan` (and moves admitted requests to running), ``finish`` (done or aborted)
    frees the request's slot. At least one waiting request is admitted per step when a slot is
    free, even past the budget, so a long prompt cannot wait forever.
    """

    def __init__(self, num_slots: int, max_prefill_tokens: int = 512) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots={num_slots} must be >= 1")
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens={max_prefill_tokens} must be >= 1")
        self.num_slots = num_slots
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[tuple[str, int]] = deque()
        self.running: list[str] = []

    def add(self, request_id: str, prompt_len: int) -> None:
        self.waiting.append((request_id, prompt_len))

    def schedule(self) -> StepPlan:
        decode = tuple(self.running)
        admitted: list[str] = []
        budget = self.max_prefill_tokens
        while self.waiting and len(self.running) < self.num_slots:
            rid, n = self.waiting[0]
            if admitted and n > budget:
                break
            self.waiting.popleft()
            admitted.append(rid)
            self.running.append(rid)
            budget -= n
        return StepPlan(decode, tuple(admitted))

    def finish(self, request_id: str) -> bool:
        """Forget the request (running or waiting); False when it was unknown."""
        if request_id in self.running:
            self.running.remove(request_id)
            return True
        for i, (rid, _) in enumerate(self.waiting):
            if rid == request_id:
                del self.waiting[i]
                return True
        return False

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)


class NativeRunner:
    """Runs an :class:`smoe.model.SMoETransformer` on a slot cache: ``prefill`` one request,
    ``decode`` many in one forward. Slots are the cache's."""

    def __init__(self, model: torch.nn.Module, num_slots: int, max_seq_len: int | None = None):
        from smoe.inference.cache import SlotCache

        self.model = model
        self.max_seq_len = max_seq_len or model.config.max_seq_len
        self.cache = SlotCache.for_model(model, num_slots, self.max_seq_len)
        self.device = model.embed.weight.device

    @property
    def num_free(self) -> int:
        return self.cache.num_free

    def allocate(self) -> int:
        return self.cache.allocate()

    def free(self, slot: int) -> None:
        self.cache.free(slot)

    def prefill(self, slot: int, prompt_ids: Sequence[int]) -> torch.Tensor:
        ids_1T = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
        return self.model(ids_1T, cache=self.cache.select([slot])).logits[0, -1]

    def prefill_many(self, slots: Sequence[int],
                     prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Prompts into fresh slots in one forward, packed into one row: each prompt's last
        logits, (len(prompts), V)."""
        packed = PackedPrompts(self.cache, slots, [len(p) for p in prompts])
        ids_1T = torch.tensor([[t for p in prompts for t in p]], dtype=torch.long,
                              device=self.device)
        return self.model(ids_1T, cache=packed).logits[0, packed.last_T]

    def decode(self, slots: Sequence[int], token_ids: Sequence[int]) -> torch.Tensor:
        ids_B1 = torch.tensor(list(token_ids), dtype=torch.long, device=self.device)[:, None]
        return self.model(ids_B1, cache=self.cache.select(slots)).logits[:, -1]


class PackedPrompts:
    """The cache protocol (see :mod:`smoe.inference.cache`) for prompts packed end to end into
    one row of T tokens, each going into its own fresh slot of ``cache``: positions restart at
    0 at every prompt, each token's key and value are stored in its prompt's slot at its
    position, and the mask (1, T, T) lets a token see the tokens of its own prompt up to
    itself (block-diagonal causal), i.e. what prefilling each prompt alone computes. The
    packed prefill of sequence-packing trainers and of ragged-batch servers (vLLM, TGI);
    here for slots of a :class:`~smoe.inference.cache.SlotCache`."""

    def __init__(self, cache: Any, slots: Sequence[int], lengths: Sequence[int]) -> None:
        if len(slots) != len(lengths) or not slots or min(lengths) < 1:
            raise ValueError("give one slot and a length >= 1 for each prompt")
        if any(cache.lengths[s] for s in slots):
            raise ValueError(f"slots {list(slots)} must be fresh (length 0)")
        self.cache, self.max_seq_len = cache, cache.max_seq_len
        if max(lengths) > self.max_seq_len:
            raise ValueError(f"a prompt of {max(lengths)} tokens does not fit in the cache's "
                             f"max_seq_len={self.max_seq_len}")
        dev = cache.k[0].device
        lengths_P = torch.tensor(list(lengths), device=dev)
        seg_T = torch.repeat_interleave(torch.arange(len(lengths), device=dev), lengths_P)
        starts_P = torch.cumsum(lengths_P, 0) - lengths_P
        self.positions_1T = (torch.arange(int(lengths_P.sum()), device=dev)
                             - starts_P[seg_T]).unsqueeze(0)
        self.rows_1T = torch.tensor(list(slots), device=dev)[seg_T].unsqueeze(0)
        pos_T = self.positions_1T[0]
        self.mask_1TT = ((seg_T[:, None] == seg_T[None, :])
                         & (pos_T[None, :] <= pos_T[:, None])).unsqueeze(0)
        self.last_T = (starts_P + lengths_P - 1).tolist()
        for s, n in zip(slots, lengths):
            cache.lengths[s] = n

    def next_positions(self, batch_size: int, num_tokens: int, device: Any) -> torch.Tensor:
        if (batch_size, num_tokens) != tuple(self.positions_1T.shape):
            raise ValueError(f"packed prompts are {tuple(self.positions_1T.shape)} tokens, "
                             f"the forward gave ({batch_size}, {num_tokens})")
        return self.positions_1T

    def update(self, layer_idx: int, positions_BT: torch.Tensor, k_BHTd: torch.Tensor,
               v_BHTd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Advanced indices on dims 0 and 2 put (1, T) first: write (1, T, H, d).
        self.cache.k[layer_idx][self.rows_1T, :, positions_BT] = k_BHTd.transpose(1, 2)
        self.cache.v[layer_idx][self.rows_1T, :, positions_BT] = v_BHTd.transpose(1, 2)
        return k_BHTd, v_BHTd, self.mask_1TT


@dataclass
class _Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    slot: int | None = None
    output_ids: list[int] = field(default_factory=list)
    arrival: float = field(default_factory=time.monotonic)


def check_model_for_batching(model: torch.nn.Module, force_dropless: bool = False) -> None:
    """Refuse (ValueError) MoE layers whose routing couples the rows of a batch: expert choice
    always, capacity factors unless ``force_dropless`` (then they are made dropless)."""
    layers = list(model.moe_layers()) if hasattr(model, "moe_layers") else []
    for name, layer in layers:
        cfg = layer.config
        if cfg.router == "expert_choice":
            raise ValueError("router='expert_choice' picks tokens across the batch, so "
                             "co-batched requests would change each other's outputs: the "
                             "engine cannot serve it; use a token-choice router")
        if cfg.capacity_factor is not None:
            if not force_dropless:
                raise ValueError(f"MoE layer {name} has capacity_factor={cfg.capacity_factor}: "
                                 "which tokens it drops depends on the whole batch, so "
                                 "co-batched requests would change each other's outputs; "
                                 "pass force_dropless=True (--force-dropless) to serve it "
                                 "dropless")
            layer.config = dataclasses.replace(cfg, capacity_factor=None)


class Engine:
    """Continuous-batching generation (see the module docstring).

    ``add_request`` and ``abort`` may be called from any thread (they go through an inbox the
    next :meth:`step` reads); ``step`` runs on one thread (the model's).
    """

    def __init__(self, model: torch.nn.Module, *, max_batch: int = 8,
                 max_seq_len: int | None = None, max_prefill_tokens: int = 512,
                 force_dropless: bool = False, runner=None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        check_model_for_batching(model, force_dropless)
        model.eval()
        self.model = model
        self.runner = runner or NativeRunner(model, max_batch, max_seq_len)
        self.max_seq_len = self.runner.max_seq_len
        self.max_batch = max_batch
        self.scheduler = Scheduler(max_batch, max_prefill_tokens)
        self._requests: dict[str, _Request] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._ids = itertools.count()
        self._id_lock = threading.Lock()
        self._live: set[str] = set()  # ids added and not finished (any thread may read)
        self.steps = 0

    # -- requests -------------------------------------------------------------------------
    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
                    request_id: str | None = None) -> str:
        """Queue a request; returns its id. ValueError for an empty prompt or one that does not
        fit the context with ``max_tokens``."""
        params = params or SamplingParams()
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise ValueError("prompt_ids is empty: give at least one token")
        vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
        if vocab is not None and not all(0 <= t < vocab for t in ids):
            raise ValueError(f"prompt_ids must be token ids in [0, {vocab})")
        if len(ids) + params.max_tokens > self.max_seq_len:
            raise ValueError(f"prompt length {len(ids)} + max_tokens {params.max_tokens} "
                             f"exceeds the context of {self.max_seq_len} tokens")
        with self._id_lock:
            rid = request_id or f"req-{next(self._ids)}"
            if rid in self._live:
                raise ValueError(f"request id {rid!r} is already in use")
            self._live.add(rid)
        gen = torch.Generator(device=self.runner.device)
        if params.seed is None:
            gen.seed()
        else:
            gen.manual_seed(params.seed)
        self._inbox.put(("add", _Request(rid, ids, params, gen)))
        return rid

    def abort(self, request_id: str) -> None:
        """Stop a request (waiting or running); its slot is freed at the next step, which
        emits an ``abort`` event for it. Unknown or finished ids are ignored."""
        self._inbox.put(("abort", request_id))

    def _drain_inbox(self, events: list[TokenEvent]) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._requests[item.id] = item
                self.scheduler.add(item.id, len(item.prompt_ids))
            elif item in self._requests:
                req = self._requests[item]
                self._finish(req)
                events.append(TokenEvent(req.id, None, len(req.output_ids), True, "abort"))

    def _finish(self, req: _Request) -> None:
        self.scheduler.finish(req.id)
        if req.slot is not None:
            self.runner.free(req.slot)
            req.slot = None
        self._requests.pop(req.id, None)
        with self._id_lock:
            self._live.discard(req.id)

    # -- stepping -------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return bool(self._requests) or not self._inbox.empty()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    def _emit_rows(self, reqs: Sequence[_Request], logits_BV: torch.Tensor,
                   events: list[TokenEvent]) -> None:
        """Each row's next token: one arg-max and one host read for all greedy rows (what
        :func:`sample_next` computes for each, row by row); sampled rows use their own
        generators."""
        greedy = [r.params.temperature == 0 for r in reqs]
        best = logits_BV.float().argmax(dim=-1).tolist() if any(greedy) else None
        for i, req in enumerate(reqs):
            self._emit(req, logits_BV[i], events, best[i] if greedy[i] else None)

    def _emit(self, req: _Request, logits_V: torch.Tensor, events: list[TokenEvent],
              token: int | None = None) -> None:
        p = req.params
        if token is None:
            token = int(sample_next(logits_V[None].float(), p.temperature, p.top_p,
                                    req.generator)[0])
        req.output_ids.append(token)
        reason = None
        if token in p.stop_token_ids:
            reason = "stop"
        elif len(req.output_ids) >= p.max_tokens:
            reason = "length"
        events.append(TokenEvent(req.id, token, len(req.output_ids) - 1, reason is not None,
                                 reason))
        if reason is not None:
            self._finish(req)

    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        """One step: decode every running request by one token (one batched forward), then
        admit and prefill waiting requests (their first token; one packed forward for all).
        Returns the new events."""
        events: list[TokenEvent] = []
        self._drain_inbox(events)
        plan = self.scheduler.schedule()
        if plan.empty:
            return events
        self.steps += 1
        decode = [self._requests[r] for r in plan.decode]
        if decode:
            logits_BV = self.runner.decode([r.slot for r in decode],
                                           [r.output_ids[-1] for r in decode])
            self._emit_rows(decode, logits_BV, events)
        admitted = [self._requests[rid] for rid in plan.prefill]
        for req in admitted:
            req.slot = self.runner.allocate()
        many = getattr(self.runner, "prefill_many", None)
        if len(admitted) > 1 and many is not None:
            self._emit_rows(admitted, many([r.slot for r in admitted],
                                           [r.prompt_ids for r in admitted]), events)
        else:
            for req in admitted:
                self._emit(req, self.runner.prefill(req.slot, req.prompt_ids), events)
        return events

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[list[int]]:
        """Run ``prompts`` to completion together; each prompt's new tokens, in order."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        out: dict[str, list[int]] = {i: [] for i in ids}
        while self.has_unfinished():
            for ev in self.step():
                if ev.token_id is not None and ev.request_id in out:
                    out[ev.request_id].append(ev.token_id)
        return [out[i] for i in ids]
