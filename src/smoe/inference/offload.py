"""Offloaded experts: expert weights in a slow tier, a byte-budgeted cache in the fast tier.

    from smoe.inference.offload import offload
    off = offload(model, budget=0.5, policy="predict", store="experts.safetensors")
    ... generate ...
    print(off.stats())          # hit rate, bytes moved per token, prefetch precision/recall, stall
    off.close()

A post-build transform (DESIGN.md): each MoE layer's ``experts`` (float or quantized, native or
a patched transformers model's) is written, one tensor per expert, into a safetensors file that
is memory-mapped (the slow tier: disk here; host memory when the model runs on an accelerator),
and replaced by :class:`OffloadedExperts`, which implements the experts protocol by asking the
shared :class:`ExpertOffloader` for the expert it needs. The offloader keeps as many experts as
``budget`` allows in the fast tier (one cache over all layers) and evicts by policy:

* ``lru``: least recently used, the baseline of every offloading system;
* ``lfu``: least frequently used so far (ties: least recent);
* ``predict``: LRU eviction plus speculative prefetch. Before layer l runs, layer l+1's router is
  applied to layer l's input; the top K + ``prefetch_extra`` experts of each token are loaded by
  a background thread while layer l computes (Eliseev & Mazur 2023, "Fast Inference of
  Mixture-of-Experts Language Models with Offloading", arXiv 2312.17238, section 3.2: the next
  layer's gate on the current hidden state guesses its experts; extra candidates raise coverage).

:func:`belady_hit_rate` replays a recorded demand trace under Belady's optimal offline eviction
(Belady 1966, "A study of replacement algorithms for a virtual-storage computer"): the bound no
demand-fetching policy can beat. Outputs equal the resident model's: the same tensors run the
same per-expert math (the resident prefill may use a grouped GEMM, so logits agree to float
tolerance and greedy tokens are equal).
"""

from __future__ import annotations

import heapq
import json
import os
import struct
import tempfile
import threading
import time
from collections import OrderedDict, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smoe.nn.experts import ExpertsBase

__all__ = ["offload", "ExpertOffloader", "OffloadedExperts", "POLICIES", "belady_hit_rate",
           "simulate_hit_rate", "check_store", "drop_page_cache", "write_stats_json"]

POLICIES = ("lru", "lfu", "predict")


# -- the slow tier: one safetensors file, one tensor per expert and name ----------------------
def _key(layer: int, expert: int, name: str) -> str:
    return f"layer{layer}.expert{expert}.{name}"


def _per_expert_tensors(experts: nn.Module) -> dict[str, torch.Tensor]:
    """The stacked tensors of an experts module (leading dimension = its experts), in the form
    its ``expert_forward`` reads (an Int4Experts keeps its CPU-kernel packing)."""
    E = experts.num_experts
    out = {}
    for name, t in list(experts.named_parameters(recurse=False)) + list(
            experts.named_buffers(recurse=False)):
        if t is not None and t.dim() >= 1 and t.shape[0] == E:
            out[name] = t.detach()
    if not out:
        raise ValueError(f"cannot offload {type(experts).__name__}: it holds no stacked "
                         "per-expert tensors")
    return out


def check_store(path: Path) -> dict[str, Any]:
    """The safetensors header of ``path``; one-line errors for a missing or truncated file."""
    if not path.is_file():
        raise FileNotFoundError(f"expert store {str(path)!r} is missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"expert store {str(path)!r} is truncated ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"expert store {str(path)!r} is truncated or not safetensors") \
                from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
              default=0)
    if size < 8 + n + end:
        raise ValueError(f"expert store {str(path)!r} is truncated: {size} bytes, the header "
                         f"promises {8 + n + end}")
    return header


def _write_store(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Atomic write: a temporary file in the same folder, fsync, rename."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def drop_page_cache(path: str | Path) -> bool:
    """Ask the kernel to drop ``path``'s cached pages (``POSIX_FADV_DONTNEED``; no root
    needed), so the next reads come from the disk. Returns whether the call was available."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


# -- the experts protocol over the cache ------------------------------------------------------
class OffloadedExperts(ExpertsBase):
    """Experts whose weights live in the offloader's store; ``expert_forward`` fetches the
    expert (from the fast-tier cache, or the slow tier) and runs the original module's math."""

    def __init__(self, source: nn.Module, layer: int, offloader: "ExpertOffloader") -> None:
        super().__init__(source.config, source.num_experts)
        self.layer = layer
        # Not registered as submodules: the offloader owns them; state_dict stays empty.
        self.__dict__["_offloader"] = offloader

    def expert_forward(self, x_RD: torch.Tensor, e: int) -> torch.Tensor:
        return self._offloader.fetch(self.layer, e).expert_forward(x_RD, 0)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, experts={self.num_experts}, offloaded"


def _shell(source: nn.Module, names: list[str]) -> nn.Module:
    """A shallow copy of ``source`` without the tensors ``names`` (set to None): the frame of a
    one-expert module that :meth:`ExpertOffloader._load` fills."""
    import copy

    shell = copy.copy(source)
    shell._parameters = dict(source._parameters)
    shell._buffers = dict(source._buffers)
    shell._modules = dict(source._modules)
    for name in names:
        (shell._parameters if name in shell._parameters else shell._buffers)[name] = None
    shell.num_experts = 1
    return shell


class ExpertOffloader:
    """The fast-tier cache, the store, the policy, the prefetcher and the statistics.

    ``budget``: a fraction of all experts' bytes (0 < budget <= 1) or a number of bytes
    (> 1). Every expert of a model has the same size, so the cache holds
    ``floor(budget_bytes / expert_bytes)`` experts.
    """

    def __init__(self, model: nn.Module, layers: list[nn.Module], *, budget: float,
                 policy: str, store: Path, prefetch_extra: int, device: torch.device) -> None:
        self.model, self.layers, self.policy, self.store = model, layers, policy, store
        self.prefetch_extra = prefetch_extra
        self.device = device
        self.names = [list(_per_expert_tensors(layer.experts)) for layer in layers]
        self.shells = [_shell(layer.experts, n) for layer, n in zip(layers, self.names)]
        sizes = {sum(t[0].numel() * t.element_size() for t in _per_expert_tensors(
            layer.experts).values()) for layer in layers}
        self.expert_bytes = max(sizes)
        self.total_bytes = sum(layer.experts.num_experts for layer in layers) * self.expert_bytes
        budget_bytes = budget * self.total_bytes if budget <= 1 else budget
        self.capacity = int(budget_bytes // self.expert_bytes)
        if self.capacity < 1:
            raise ValueError(f"budget={budget} is below one expert ({self.expert_bytes} bytes): "
                             "give a larger budget")
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int], nn.Module] = OrderedDict()
        self._freq: dict[tuple[int, int], int] = defaultdict(int)
        self._inflight: dict[tuple[int, int], Future] = {}
        self._unused_prefetch: set[tuple[int, int]] = set()
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="smoe-prefetch") \
            if policy == "predict" else None
        self._predicted: dict[int, set[int]] = {}
        self._used: dict[int, set[int]] = defaultdict(set)
        self._hooks: list[Any] = []
        self.owns_store = False
        self.reset_stats()

    # -- statistics ---------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.trace: list[tuple[int, int]] = []
        self.hits = self.late = self.misses = 0
        self.bytes_moved = self.prefetched = self.prefetch_wasted = 0
        self.pred_tp = self.pred_n = self.used_n = 0
        self.stall_s = 0.0
        self.tokens = 0

    def stats(self, seconds: float | None = None) -> dict[str, Any]:
        """Hit rate (demand accesses found in the fast tier), late prefetches (waited for),
        bytes moved (demand + prefetch) in total and per token, prefetch precision and recall
        (of the predicted expert sets against the used ones), stall seconds; tokens/s when
        ``seconds`` is given."""
        n = max(1, self.hits + self.late + self.misses)
        out = {"policy": self.policy, "capacity_experts": self.capacity,
               "total_experts": self.total_bytes // self.expert_bytes,
               "expert_bytes": self.expert_bytes, "accesses": self.hits + self.late + self.misses,
               "hit_rate": self.hits / n, "late_prefetch_rate": self.late / n,
               "miss_rate": self.misses / n, "bytes_moved": self.bytes_moved,
               "bytes_moved_per_token": self.bytes_moved / max(1, self.tokens),
               "prefetched": self.prefetched, "prefetch_wasted": self.prefetch_wasted,
               "prefetch_precision": self.pred_tp / self.pred_n if self.pred_n else None,
               "prefetch_recall": self.pred_tp / self.used_n if self.used_n else None,
               "stall_s": self.stall_s, "tokens": self.tokens}
        if seconds is not None:
            out["seconds"] = seconds
            out["tokens_per_s"] = self.tokens / seconds if seconds > 0 else None
        return out

    # -- the slow tier ----------------------------------------------------------------------
    def _handle(self):
        h = getattr(self._local, "handle", None)
        if h is None:
            from safetensors import safe_open

            h = self._local.handle = safe_open(str(self.store), framework="pt")
        return h

    def _load(self, layer: int, e: int) -> nn.Module:
        """Read one expert from the store into a one-expert module on the fast tier."""
        h = self._handle()
        slot = _shell(self.shells[layer], [])
        for name in self.names[layer]:
            t = h.get_tensor(_key(layer, e, name)).to(self.device).unsqueeze(0)
            if name in slot._parameters:
                slot._parameters[name] = nn.Parameter(t, requires_grad=False)
            else:
                slot._buffers[name] = t
        with self._lock:
            self.bytes_moved += self.expert_bytes
        return slot

    # -- the cache ----------------------------------------------------------------------------
    def _insert(self, key: tuple[int, int], slot: nn.Module) -> None:
        """Add under the lock, evicting by policy down to the capacity."""
        self._cache[key] = slot
        self._cache.move_to_end(key)
        while len(self._cache) > self.capacity:
            # Never the expert just added; LFU ties go to the least recent (first in order).
            others = (k for k in self._cache if k != key)
            victim = (min(others, key=lambda k: self._freq[k]) if self.policy == "lfu"
                      else next(others))
            del self._cache[victim]
            if victim in self._unused_prefetch:
                self._unused_prefetch.discard(victim)
                self.prefetch_wasted += 1

    def fetch(self, layer: int, e: int) -> nn.Module:
        """The one-expert module of (layer, e): a demand access, counted in the statistics."""
        key = (layer, e)
        self.trace.append(key)
        self._used[layer].add(e)
        with self._lock:
            self._freq[key] += 1
            slot = self._cache.get(key)
            if slot is not None:
                self._cache.move_to_end(key)
                self._unused_prefetch.discard(key)
                self.hits += 1
                return slot
            future = self._inflight.get(key)
            if future is not None and future.cancel():
                # Queued behind other prefetches, not started: load it here instead of waiting.
                del self._inflight[key]
                future = None
        t0 = time.perf_counter()
        if future is not None:
            slot = future.result()
            with self._lock:
                self.late += 1
                self._unused_prefetch.discard(key)
                if key not in self._cache:
                    self._insert(key, slot)
                self._cache.move_to_end(key)
        else:
            slot = self._load(layer, e)
            with self._lock:
                self.misses += 1
                self._insert(key, slot)
        self.stall_s += time.perf_counter() - t0
        return slot

    def _prefetch_many(self, futures: dict[tuple[int, int], Future]) -> None:
        """The background job of one layer's prediction: load each expert in order of its
        predicted rank, resolving its future (a demand fetch may cancel one not yet started)."""
        for key, future in futures.items():
            if not future.set_running_or_notify_cancel():
                continue
            try:
                slot = self._load(*key)
                with self._lock:
                    if key not in self._cache:
                        self._insert(key, slot)
                        self._unused_prefetch.add(key)
                        self.prefetched += 1
                future.set_result(slot)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting demand fetch
                future.set_exception(exc)
            finally:
                with self._lock:
                    self._inflight.pop(key, None)

    # -- hooks: prediction and per-layer bookkeeping ----------------------------------------
    def _pre_hook(self, index: int):
        def hook(module, args):
            if index == 0:
                x = args[0]
                self.tokens += x.numel() // x.shape[-1]
            if self._pool is None or index + 1 >= len(self.layers):
                return
            nxt = self.layers[index + 1]
            x_TD = args[0].reshape(-1, args[0].shape[-1])
            with torch.no_grad():
                logits_TE = nxt.router(x_TD).logits_TE
                bias = getattr(nxt.router, "expert_bias", None)
                if bias is not None:
                    logits_TE = logits_TE.sigmoid() + bias
                k = min(nxt.config.top_k + self.prefetch_extra, logits_TE.shape[-1])
                # rank-major order: every token's first choice, then its second, ...
                ranked = logits_TE.topk(k, dim=-1).indices.t().reshape(-1).tolist()
            order = list(dict.fromkeys(ranked))
            self._predicted[index + 1] = set(order)
            with self._lock:
                futures = {(index + 1, e): Future() for e in order
                           if (index + 1, e) not in self._cache
                           and (index + 1, e) not in self._inflight}
                self._inflight.update(futures)
            if futures:
                # One job per layer, not one per expert: each submit wakes the worker thread,
                # and each wake-up hands it the GIL while the decode waits (profiled here:
                # about 1 ms of the main thread per submit under load).
                self._pool.submit(self._prefetch_many, futures)
        return hook

    def _post_hook(self, index: int):
        def hook(module, args, output):
            used = self._used.pop(index, set())
            guess = self._predicted.pop(index, None)
            if guess is not None:
                self.pred_tp += len(guess & used)
                self.pred_n += len(guess)
                self.used_n += len(used)
        return hook

    def attach(self) -> None:
        for i, layer in enumerate(self.layers):
            self._hooks.append(layer.register_forward_pre_hook(self._pre_hook(i)))
            self._hooks.append(layer.register_forward_hook(self._post_hook(i)))

    def warm(self, keys: list[tuple[int, int]] | None = None) -> None:
        """Fill the cache (first ``capacity`` experts in layer order, or ``keys``) without
        counting statistics."""
        keys = keys or [(l, e) for l, layer in enumerate(self.layers)
                        for e in range(layer.experts.num_experts)]
        for key in keys[:self.capacity]:
            if key not in self._cache:
                slot = self._load(*key)
                with self._lock:
                    self._insert(key, slot)
        self.bytes_moved = 0

    def clear(self) -> None:
        """Empty the fast tier (wait for prefetches first)."""
        for f in list(self._inflight.values()):
            f.result()
        with self._lock:
            self._cache.clear()
            self._unused_prefetch.clear()
            self._freq.clear()

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self.owns_store:
            Path(self.store).unlink(missing_ok=True)


# -- the transform ------------------------------------------------------------------------------
@torch.no_grad()
def offload(model: nn.Module, budget: float = 0.5, policy: str = "predict",
            store: str | Path | None = None, *, prefetch_extra: int = 0,
            device: torch.device | str | None = None) -> ExpertOffloader:
    """Move every MoE layer's experts to a memory-mapped safetensors ``store`` (a temporary
    file when None, removed by ``close()``) and serve them from a fast-tier cache of
    ``budget`` (see :class:`ExpertOffloader`). Validates everything before changing the model.

    ``prefetch_extra``: candidates prefetched beyond each token's predicted top-K. They raise
    recall (E8 top-2 at 50%: 0.79 -> 0.86 with one more) but cost loads; on a CPU, where the
    prefetch thread's loads compete with the decode for cores and the GIL, the default 0 gave
    the best tokens/s (BENCHMARKS.md, "Offloaded experts"); with a DMA link (host to GPU) more
    candidates are cheap.
    """
    from smoe.inference.quantize import moe_layers_of

    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r} is invalid: must be one of {', '.join(POLICIES)}")
    if not (isinstance(budget, (int, float)) and budget > 0):
        raise ValueError(f"budget={budget!r} is invalid: give a fraction in (0, 1] of the "
                         "experts' bytes, or a number of bytes")
    if prefetch_extra < 0:
        raise ValueError(f"prefetch_extra={prefetch_extra} is invalid: must be >= 0")
    layers = moe_layers_of(model)
    if not layers:
        raise ValueError("the model has no MoE layers to offload")
    if any(isinstance(layer.experts, OffloadedExperts) for layer in layers):
        raise ValueError("the model is already offloaded")
    first = _per_expert_tensors(layers[0].experts)
    device = torch.device(device) if device is not None else next(iter(first.values())).device
    for layer in layers:  # Int4 experts: store the packing their CPU kernel reads
        if hasattr(layer.experts, "_set_cpu_layout") and layer.experts._kernel_fits \
                and device.type == "cpu":
            layer.experts._set_cpu_layout(True)
    owns = store is None
    if store is None:
        fd, name = tempfile.mkstemp(prefix="smoe-experts-", suffix=".safetensors")
        os.close(fd)
        store = name
    store = Path(store)
    off = ExpertOffloader(model, layers, budget=budget, policy=policy, store=store,
                          prefetch_extra=prefetch_extra, device=device)
    tensors = {_key(i, e, name): t[e] for i, layer in enumerate(layers)
               for name, t in _per_expert_tensors(layer.experts).items()
               for e in range(t.shape[0])}
    _write_store(store, tensors, {"format": "smoe-expert-store", "version": "1"})
    del tensors
    check_store(store)
    off.owns_store = owns
    for i, layer in enumerate(layers):
        layer.experts = OffloadedExperts(layer.experts, i, off)
    off.attach()
    return off


def write_stats_json(path: str | Path, stats: dict[str, Any]) -> Path:
    """Write ``stats`` as JSON atomically (:func:`smoe._io.atomic_write_json`)."""
    from smoe._io import atomic_write_json

    return atomic_write_json(path, stats)


# -- offline policies on a recorded trace -------------------------------------------------------
def belady_hit_rate(trace: list[tuple[int, int]], capacity: int) -> float:
    """Hit rate of Belady's optimal eviction (evict the expert used farthest in the future)."""
    if not trace:
        return 0.0
    nxt = [0] * len(trace)
    last: dict[tuple[int, int], int] = {}
    for i in range(len(trace) - 1, -1, -1):
        nxt[i] = last.get(trace[i], len(trace) + i)   # never again: farther than any use
        last[trace[i]] = i
    cache: dict[tuple[int, int], int] = {}   # key -> its next use
    heap: list[tuple[int, tuple[int, int]]] = []  # (-next use, key), lazily invalidated
    hits = 0
    for i, key in enumerate(trace):
        if key in cache:
            hits += 1
        elif len(cache) >= capacity:
            while True:
                neg, victim = heapq.heappop(heap)
                if cache.get(victim) == -neg:
                    del cache[victim]
                    break
        cache[key] = nxt[i]
        heapq.heappush(heap, (-nxt[i], key))
    return hits / len(trace)


def simulate_hit_rate(trace: list[tuple[int, int]], capacity: int, policy: str) -> float:
    """Hit rate of ``lru`` or ``lfu`` (demand fetching only) replayed on ``trace``."""
    cache: OrderedDict[tuple[int, int], None] = OrderedDict()
    freq: dict[tuple[int, int], int] = defaultdict(int)
    hits = 0
    for key in trace:
        freq[key] += 1
        if key in cache:
            hits += 1
            cache.move_to_end(key)
            continue
        cache[key] = None
        while len(cache) > capacity:
            victim = (min((k for k in cache if k != key), key=lambda k: freq[k])
                      if policy == "lfu" else next(iter(cache)))
            del cache[victim]
    return hits / len(trace) if trace else 0.0
