"""The routing recorder: forward hooks on MoE layers that add each forward's counts into
on-device tensors, read on demand, with sliding windows, drift against a reference and alerts.

Legend: L attached MoE layers, E experts per layer.

    monitor = RoutingMonitor(window_tokens=2048).attach(model.moe_layers())   # native model
    monitor = RoutingMonitor().attach(smoe.hf.patched_layers(hf_model))        # patched model
    ... forwards ...
    monitor.counts()            # [L, E] cumulative assignments, on the model's device
    monitor.windows[-1]         # the last closed window: counts, summary, drift
    monitor.pop_alerts()        # hot spots, collapse, drift since the last call

Design (after SGLang's expert-distribution recorder, without its module-global state): the
hook keeps a reference to the layer's small routing tensors (its choices ``[T, K]`` when
dropless, else its counts), and every ``flush_every`` layer-forwards, or when anything is read,
they are added up on the device in one batch (one bincount for all dropless layers): no host
sync and no tensor op per forward, which keeps a decode step's overhead small. The host
learns how many tokens went through from the input's shape, and closes a window once
``window_tokens`` tokens have passed, at the start of the next forward so that a window always
holds whole forwards of every layer. Closing a window is the only sync: it copies ``[L, E]``
to the CPU, computes the figures of :mod:`smoe.monitor.stats`, the drift against the reference
and the alerts.

Rows that are padding must not reach the layers while recording (the engine never pads);
wrap warm-up or padded forwards in ``with monitor.paused():``.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smoe.monitor import stats

__all__ = ["RoutingMonitor", "AlertConfig", "Alert", "WindowRecord"]


@dataclass(frozen=True)
class AlertConfig:
    """Thresholds of the alerts, checked when a window closes.

    hot_factor, hot_windows: a hot spot is an expert whose share is above ``hot_factor`` times
        its fair share (1/E) for ``hot_windows`` consecutive windows.
    entropy_floor: collapse when a layer's normalized routing entropy (entropy / ln E) falls
        below it; max_dead_experts: collapse also when more experts than this got no token in
        the window (None: dead experts alone never raise it; small windows leave some idle).
    drift_threshold: drift when the Jensen-Shannon divergence (bits, in [0, 1]) of a layer's
        window distribution against the reference exceeds it.
    Each alert fires once when its condition starts and re-arms when the condition ends.
    """

    hot_factor: float = 2.0
    hot_windows: int = 3
    entropy_floor: float = 0.5
    max_dead_experts: int | None = None
    drift_threshold: float = 0.1

    def __post_init__(self) -> None:
        if not self.hot_factor > 1:
            raise ValueError(f"hot_factor={self.hot_factor!r} must be > 1 (times the fair share)")
        if isinstance(self.hot_windows, bool) or not isinstance(self.hot_windows, int) \
                or self.hot_windows < 1:
            raise ValueError(f"hot_windows={self.hot_windows!r} must be an integer >= 1")
        if not 0 <= self.entropy_floor <= 1:
            raise ValueError(f"entropy_floor={self.entropy_floor!r} must be in [0, 1]")
        if self.max_dead_experts is not None and (not isinstance(self.max_dead_experts, int)
                                                  or self.max_dead_experts < 0):
            raise ValueError(f"max_dead_experts={self.max_dead_experts!r} must be None or >= 0")
        if not 0 < self.drift_threshold <= 1:
            raise ValueError(f"drift_threshold={self.drift_threshold!r} must be in (0, 1] bits")


@dataclass(frozen=True)
class Alert:
    """One alert event: ``kind`` is ``hot_spot``, ``collapse`` or ``drift``."""

    kind: str
    layer: str
    window: int
    value: float
    threshold: float
    expert: int | None = None
    message: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class WindowRecord:
    """A closed window: its index, tokens, ``[L, E]`` counts (CPU), figures and drift."""

    index: int
    tokens: int
    counts_LE: torch.Tensor
    summary: stats.LoadSummary
    drift_L: list[float] = field(default_factory=list)
    closed_at: float = 0.0  # time.time() when the window closed

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "tokens": self.tokens, "closed_at": self.closed_at,
                "counts": self.counts_LE.tolist(),
                "drift": self.drift_L, **self.summary.as_dict()}


def _named_layers(layers: Any) -> list[tuple[str, nn.Module]]:
    """(name, layer) pairs from ``model.moe_layers()``, ``patched_layers(model)``, a model, or
    any iterable of layers."""
    if hasattr(layers, "moe_layers"):
        layers = layers.moe_layers()
    elif isinstance(layers, nn.Module):
        from smoe.nn.moe import MoELayer

        found = [(n, m) for n, m in layers.named_modules() if isinstance(m, MoELayer)]
        if not found:
            raise ValueError("the model has no smoe MoE layers: patch it first "
                             "(smoe.hf.patch) or pass its layers")
        layers = found
    if isinstance(layers, Mapping):
        layers = layers.items()
    out = []
    for i, item in enumerate(layers):
        name, layer = item if isinstance(item, tuple) else (i, item)
        out.append((str(name), layer))
    return out


class RoutingMonitor:
    """Per-layer, per-expert routing counts of the attached MoE layers (see module docstring).

    window_tokens: tokens per sliding window (None: windows close only by
        :meth:`close_window`). history: closed windows kept. co_selection: also count how often
        each pair of experts is chosen by the same token (``[L, E, E]``). alerts: thresholds
        (:class:`AlertConfig`). reference: ``"first"`` (the first closed window) or a path to a
        reference saved by :meth:`save_reference`.
    """

    def __init__(self, *, window_tokens: int | None = 4096, history: int = 512,
                 co_selection: bool = True, alerts: AlertConfig | None = None,
                 reference: str | Path = "first", flush_every: int = 256) -> None:
        if window_tokens is not None and (isinstance(window_tokens, bool)
                                          or not isinstance(window_tokens, int)
                                          or window_tokens < 1):
            raise ValueError(f"window_tokens={window_tokens!r} must be None or an integer >= 1")
        if not isinstance(history, int) or history < 1:
            raise ValueError(f"history={history!r} must be an integer >= 1")
        self.window_tokens = window_tokens
        self.flush_every = max(int(flush_every), 1)
        self.co_selection_enabled = co_selection
        self.alert_config = alerts or AlertConfig()
        self.windows: deque[WindowRecord] = deque(maxlen=history)
        self.alerts: list[Alert] = []
        self.layer_names: list[str] = []
        self.num_experts = 0
        self._handles: list[Any] = []
        self._lock = threading.RLock()
        self._paused = 0
        self._reference_LE: torch.Tensor | None = None
        self._reference_source = "first"
        self._new_alerts = 0
        self.reset()
        if str(reference) != "first":
            self.load_reference(reference)

    # -- attaching ----------------------------------------------------------------------
    def attach(self, layers: Any) -> RoutingMonitor:
        """Hook every layer (see :func:`_named_layers` for what ``layers`` may be)."""
        if self._handles:
            raise ValueError("this monitor is already attached: detach() it first")
        named = _named_layers(layers)
        if not named:
            raise ValueError("no MoE layers to attach to")
        sizes = {int(layer.config.num_experts) for _, layer in named}
        if len(sizes) != 1:
            raise ValueError(f"attached layers have different expert counts {sorted(sizes)}: "
                             "attach each group to its own monitor")
        self.layer_names = [n for n, _ in named]
        self.num_experts = sizes.pop()
        self._dropless = [bool(layer.config.dropless) for _, layer in named]
        self.reset()
        for li, (_, layer) in enumerate(named):
            self._handles.append(layer.register_forward_hook(self._hook(li)))
        return self

    def detach(self) -> None:
        """Remove the hooks; the counts stay readable."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forwards inside this block are not recorded (warm-up, padded batches)."""
        with self._lock:
            self._paused += 1
        try:
            yield
        finally:
            with self._lock:
                self._paused -= 1

    def reset(self) -> None:
        """Forget counts, windows and alerts (the reference and the hooks stay)."""
        with self._lock:
            self._counts_LE: torch.Tensor | None = None
            self._window_LE: torch.Tensor | None = None
            self._dropped_L: torch.Tensor | None = None
            self._co_LEE: torch.Tensor | None = None
            self._pending: list[tuple] = []
            self._window_tokens_seen = 0
            self.total_tokens = 0
            self._window_index = 0
            self.windows.clear()
            self.alerts = []
            self._new_alerts = 0
            L, E = len(self.layer_names), self.num_experts
            self._hot_streak_LE = torch.zeros(L, E, dtype=torch.long)
            self._collapsed_L = [False] * L
            self._drifting_L = [False] * L
            if self._reference_source == "first":
                self._reference_LE = None

    # -- recording ----------------------------------------------------------------------
    def _buffers(self, device: torch.device) -> None:
        if self._counts_LE is not None and self._counts_LE.device == device:
            return
        L, E = len(self.layer_names), self.num_experts
        move = self._counts_LE is not None
        new = dict(counts=torch.zeros(L, E, dtype=torch.long, device=device),
                   window=torch.zeros(L, E, dtype=torch.long, device=device),
                   dropped=torch.zeros(L, dtype=torch.long, device=device),
                   co=torch.zeros(L, E, E, dtype=torch.long, device=device))
        if move:  # the model moved: carry what was counted
            new["counts"] += self._counts_LE.to(device)
            new["window"] += self._window_LE.to(device)
            new["dropped"] += self._dropped_L.to(device)
            new["co"] += self._co_LEE.to(device)
        self._counts_LE, self._window_LE = new["counts"], new["window"]
        self._dropped_L, self._co_LEE = new["dropped"], new["co"]

    def _hook(self, li: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self._paused:
                return
            info = output[1]
            x = args[0] if args else None
            with self._lock:
                if li == 0 and x is not None:
                    if self.window_tokens is not None \
                            and self._window_tokens_seen >= self.window_tokens:
                        self._close_window_locked()
                    T = x.numel() // max(x.shape[-1], 1)
                    self._window_tokens_seen += T
                    self.total_tokens += T
                ids_TK = info.expert_indices
                if self._dropless[li] and ids_TK is not None:
                    # Dropless: the counts are the bincount of the choices; defer it, so a
                    # decode step costs no tensor op here (one batched bincount per flush).
                    self._pending.append((li, ids_TK.detach(), None, None))
                else:
                    self._pending.append((li, ids_TK.detach() if ids_TK is not None else None,
                                          info.tokens_per_expert.detach(),
                                          info.dropped_tokens.detach()))
                if len(self._pending) >= self.flush_every:
                    self._flush_locked()
        return hook

    def _flush_locked(self) -> None:
        """Add the pending forwards' counts into the on-device tensors: one concatenation
        and one bincount for all dropless entries (layer l's expert e is bin l * E + e), two
        in-place adds per entry for the others."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        L, E = len(self.layer_names), self.num_experts
        device = next(p[1] if p[1] is not None else p[2] for p in pending).device
        self._buffers(device)
        ids = [(li, t) for li, t, c, _ in pending if c is None]
        if ids:
            flat = torch.cat([t.reshape(-1) for _, t in ids])
            offs = torch.repeat_interleave(
                torch.tensor([li * E for li, _ in ids], device=device),
                torch.tensor([t.numel() for _, t in ids], device=device))
            counts_LE = torch.bincount(flat + offs, minlength=L * E).view(L, E)
            self._counts_LE += counts_LE
            self._window_LE += counts_LE
        for li, _, counts_E, dropped in pending:
            if counts_E is not None:
                self._counts_LE[li] += counts_E
                self._window_LE[li] += counts_E
                self._dropped_L[li] += dropped
        if self.co_selection_enabled:
            self._add_co_selection([(li, t) for li, t, _, _ in pending if t is not None], device)

    def _add_co_selection(self, ids: list[tuple[int, torch.Tensor]], device) -> None:
        L, E = len(self.layer_names), self.num_experts
        by_k: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for li, t in ids:
            if t.dim() == 2 and t.shape[1] > 1:
                by_k.setdefault(t.shape[1], []).append((li, t))
        for K, group in by_k.items():
            ids_NK = torch.cat([t for _, t in group])
            a, b = torch.triu_indices(K, K, 1, device=device)
            layer_N = torch.repeat_interleave(
                torch.tensor([li for li, _ in group], device=device),
                torch.tensor([t.shape[0] for _, t in group], device=device))
            flat = (layer_N[:, None] * (E * E) + ids_NK[:, a] * E + ids_NK[:, b]).reshape(-1)
            co = torch.bincount(flat, minlength=L * E * E).view(L, E, E)
            self._co_LEE += co + co.transpose(1, 2)

    # -- reading ------------------------------------------------------------------------
    def _read(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        with self._lock:
            self._flush_locked()
            t = getattr(self, name)
            return torch.zeros(shape, dtype=torch.long) if t is None else t.clone()

    def counts(self) -> torch.Tensor:
        """Cumulative assignments per (layer, expert), ``[L, E]`` (a copy, on the device)."""
        return self._read("_counts_LE", (len(self.layer_names), self.num_experts))

    def window_counts(self) -> torch.Tensor:
        """Assignments of the window still open, ``[L, E]``."""
        return self._read("_window_LE", (len(self.layer_names), self.num_experts))

    def dropped_tokens(self) -> torch.Tensor:
        """Tokens that got no expert (capacity or expert choice), per layer, ``[L]``."""
        return self._read("_dropped_L", (len(self.layer_names),))

    def co_selection(self) -> torch.Tensor:
        """How often experts i and j were chosen by the same token, ``[L, E, E]`` symmetric,
        zero diagonal (the diagonal would be :meth:`counts`)."""
        E = self.num_experts
        return self._read("_co_LEE", (len(self.layer_names), E, E))

    def summary(self) -> stats.LoadSummary:
        """The figures of :mod:`smoe.monitor.stats` on the cumulative counts."""
        return stats.summarize(self.counts())

    def drift(self) -> list[float]:
        """Per-layer JS divergence (bits) of the last closed window against the reference."""
        with self._lock:
            return list(self.windows[-1].drift_L) if self.windows else [0.0] * len(
                self.layer_names)

    # -- windows and alerts -------------------------------------------------------------
    def close_window(self) -> WindowRecord | None:
        """Close the open window now (None when it saw no token)."""
        with self._lock:
            return self._close_window_locked()

    def _close_window_locked(self) -> WindowRecord | None:
        self._flush_locked()
        if self._window_LE is None or self._window_tokens_seen == 0:
            return None
        counts_LE = self._window_LE.to("cpu", copy=True)  # .cpu() aliases a CPU tensor
        self._window_LE.zero_()
        tokens, self._window_tokens_seen = self._window_tokens_seen, 0
        if self._reference_LE is None:
            self._reference_LE = counts_LE.clone()
        drift_L = stats.js_divergence(counts_LE, self._reference_LE).tolist()
        record = WindowRecord(self._window_index, tokens, counts_LE, stats.summarize(counts_LE),
                              drift_L, time.time())
        self._window_index += 1
        self.windows.append(record)
        self._check_alerts(record)
        return record

    def _fire(self, alert: Alert) -> None:
        self.alerts.append(alert)
        self._new_alerts += 1

    def _check_alerts(self, w: WindowRecord) -> None:
        cfg, E = self.alert_config, self.num_experts
        share_LE = stats.shares(w.counts_LE)
        fair = 1.0 / E
        hot_LE = share_LE > cfg.hot_factor * fair
        self._hot_streak_LE = torch.where(hot_LE, self._hot_streak_LE + 1,
                                          torch.zeros_like(self._hot_streak_LE))
        for li, e in (self._hot_streak_LE == cfg.hot_windows).nonzero().tolist():
            s = float(share_LE[li, e])
            self._fire(Alert("hot_spot", self.layer_names[li], w.index, s,
                             cfg.hot_factor * fair, e,
                             f"layer {self.layer_names[li]} expert {e} took {s:.1%} of "
                             f"assignments for {cfg.hot_windows} windows (fair share "
                             f"{fair:.1%}, threshold {cfg.hot_factor:g}x)"))
        for li, name in enumerate(self.layer_names):
            ent = w.summary.normalized_entropy[li]
            dead = w.summary.dead_experts[li]
            collapsed = ent < cfg.entropy_floor or (cfg.max_dead_experts is not None
                                                   and dead > cfg.max_dead_experts)
            if collapsed and not self._collapsed_L[li]:
                self._fire(Alert("collapse", name, w.index, ent, cfg.entropy_floor, None,
                                 f"layer {name}: routing entropy {ent:.2f} of its maximum, "
                                 f"{dead} of {E} experts got no token"))
            self._collapsed_L[li] = collapsed
            d = w.drift_L[li]
            drifting = d > cfg.drift_threshold
            if drifting and not self._drifting_L[li]:
                self._fire(Alert("drift", name, w.index, d, cfg.drift_threshold, None,
                                 f"layer {name}: routing drifted {d:.3f} bits (Jensen-Shannon) "
                                 f"from the reference"))
            self._drifting_L[li] = drifting

    def pop_alerts(self) -> list[Alert]:
        """Alerts fired since the last call (all of them stay in :attr:`alerts`)."""
        with self._lock:
            n, self._new_alerts = self._new_alerts, 0
            return self.alerts[len(self.alerts) - n:] if n else []

    def training_row(self) -> dict[str, Any]:
        """Figures for a trainer's metrics row (metrics.jsonl / TensorBoard): closes the open
        window, then the mean and per-layer drift, the number of hot experts and the alerts
        fired since the last call."""
        self.close_window()
        drift = self.drift()
        alerts = self.pop_alerts()
        return {"routing_drift": sum(drift) / len(drift) if drift else 0.0,
                "routing_drift_per_layer": [round(d, 5) for d in drift],
                "hot_experts": int((self._hot_streak_LE >= self.alert_config.hot_windows)
                                   .sum()),
                "routing_alerts": [a.as_dict() for a in alerts]}

    # -- reference ----------------------------------------------------------------------
    def set_reference(self, counts_LE: torch.Tensor) -> None:
        """Use ``counts_LE`` (``[L, E]``) as the drift reference instead of the first window."""
        c = torch.as_tensor(counts_LE).detach().cpu().to(torch.long)
        if self.layer_names and tuple(c.shape) != (len(self.layer_names), self.num_experts):
            raise ValueError(f"reference has shape {tuple(c.shape)}, the monitor counts "
                             f"{(len(self.layer_names), self.num_experts)}")
        with self._lock:
            self._reference_LE = c
            self._reference_source = "given"

    def save_reference(self, path: str | Path, counts_LE: torch.Tensor | None = None) -> Path:
        """Write ``counts_LE`` (default: the cumulative counts) as a reference: safetensors for
        ``.safetensors``, else JSON; atomically."""
        from smoe.monitor._files import atomic_write_bytes

        c = (self.counts() if counts_LE is None else torch.as_tensor(counts_LE)).cpu().long()
        path = Path(path)
        if path.suffix == ".safetensors":
            from safetensors.torch import save

            data = save({"counts_LE": c.contiguous()},
                        metadata={"layers": json.dumps(self.layer_names)})
        else:
            data = (json.dumps({"format": "smoe-routing-reference", "layers": self.layer_names,
                                "counts": c.tolist()}) + "\n").encode("utf-8")
        atomic_write_bytes(path, data)
        return path

    def load_reference(self, path: str | Path) -> None:
        """Read a reference written by :meth:`save_reference` (safetensors or JSON)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"routing reference {str(path)!r} does not exist")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            if "counts_LE" not in tensors:
                raise ValueError(f"{str(path)!r} has no 'counts_LE' tensor")
            c = tensors["counts_LE"]
        else:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                c = torch.tensor(data["counts"], dtype=torch.long)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{str(path)!r} is not a routing reference: {exc}") from None
        if c.dim() != 2:
            raise ValueError(f"{str(path)!r}: reference counts must be [L, E], got "
                             f"{tuple(c.shape)}")
        self.set_reference(c)

