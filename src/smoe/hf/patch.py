"""Run a loaded transformers MoE model's sparse MoE blocks on smoe layers, in place.

    import smoe.hf
    model = AutoModelForCausalLM.from_pretrained(path)
    smoe.hf.patch(model)     # every sparse MoE block now runs on an smoe MoELayer
    smoe.hf.unpatch(model)   # back to the original blocks

How it works
------------
Nothing in the model's module tree is replaced. Each sparse MoE block (found by class name in
:data:`smoe.hf.families.BLOCKS`) keeps its class, children, parameters, buffers, state-dict keys
and hooks; patching sets an instance attribute ``forward`` on the block, so ``block(x)`` still
goes through ``nn.Module.__call__`` (and every hook on the block) and lands in the smoe path.
``unpatch`` deletes that attribute: the same objects run their own code again.

The smoe :class:`~smoe.MoELayer` of a block is built on the meta device and then handed the
block's own ``nn.Parameter`` objects (router weight and bias, stacked expert weights and biases,
shared expert, shared-expert gate) and its selection-bias tensor: no weight is copied. Layouts
smoe does not store natively are read in place: gpt-oss and Llama 4 through
``Experts.transposed`` / ``Experts.interleaved``, DBRX through
:class:`smoe.hf.experts.SplitExperts`. The layer is not registered as a submodule, so
``parameters()``, ``state_dict()`` and ``save_pretrained`` see exactly the original model; it is
a view over the block's tensors. Each forward re-binds any tensor the model has swapped since
(``model.to()`` replaces buffers) and follows the block's ``train()`` / ``eval()`` mode.

Router logits. transformers 5 collects ``router_logits`` (for ``output_router_logits=True`` and
its auxiliary loss) with forward hooks that ``OutputRecorder`` installs, lazily, on the router
modules. The patched block therefore still calls the block's original router module, so every
hook on it fires, whether installed before or after patching. While patched, the router's
``forward`` is a replay: inside the patched block's call it returns what the smoe router decided,
in the original router's format and dtypes (logits with the same values, the routing weights
and indices), instead of routing a second time; called from anywhere else it runs its own
``forward``. The recorded logits keep their autograd graph, so the model's own auxiliary loss
trains the router as before.

Numerics follow each family (see :mod:`smoe.hf.families`): whether the router linear runs in
the input dtype or in float32, the renormalisation rule and its epsilon, routed scaling, group
limits, the selection bias, biases and clamped SwiGLU of gpt-oss, weights on the expert input
for Llama 4. Input jitter that a block applies in training (Mixtral's ``router_jitter_noise``,
Phi-3.5-MoE's ``input_jitter_noise``, DBRX's ``moe_jitter_eps``) is applied to the layer's input.

Flows besides a plain forward:

* ``torch.compile`` (``fullgraph=True`` too): the grouped GEMM runs through the custom operator
  of :mod:`smoe.nn.grouped_mm` while compiling (aten's compile-time rule rejects float32), the
  router replay keeps its pending output on an attribute instead of a ContextVar (as
  transformers' own ``CompileableContextVar`` does), and the decode shortcut, which reads
  routing on the host, is skipped.
* Built on the meta device, patched, then materialised (``to_empty`` and initialisation): the
  layer rebinds the new tensors on its first call and creates the tensors it owns (a zero
  selection bias, the load counter) as zeros on the weights' device.
* ``model.set_experts_implementation(...)``: followed on the next call (``eager`` -> smoe's
  ``loop``, ``grouped_mm`` -> ``grouped_mm``, ``batched_mm`` -> ``auto``); another name is
  refused with a ``ValueError``.
* Configs transformers accepts but smoe's own config would reject are computed as transformers
  does (group-limited routing with top_k above the kept groups' experts, where the result is
  well defined) or refused with the exact difference (see ``smoe.hf.blocks._groups``).
* Phi-3.5-MoE in training samples its experts and uses SparseMixer's Heun gradient estimator,
  drawing the same random numbers in the same order as the original
  (:class:`smoe.hf.routers.HFRouter`): with the same seed a float32 model trains identically.
* Families smoe recognises but cannot compute (:data:`smoe.hf.families.REFUSED`) are refused
  naming the missing feature, as are blocks whose SwiGLU clamp is set (``Block.unclamped``:
  Step-3.7's clamped layers); nothing is patched then.

Limits: hooks that replace a module's ``forward`` themselves (accelerate's offloading) are not
composed with. The router replay is not thread-safe while compiling (transformers' recorder
is not either).
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as module_mod
from torch.overrides import TorchFunctionMode

from smoe.config import MoEConfig
from smoe.hf.experts import SplitExperts
from smoe.hf.blocks import (
    _activation,
    _experts,
    _owner,
    _read,
    _routing,
    experts_backend_for,
)
from smoe.hf.families import BLOCKS, NO_ROUTED_EXPERTS, REFUSED, SUPPORTED_FAMILIES, Block
from smoe.hf.routers import HFRouter
from smoe.nn.experts import DenseMLP
from smoe.nn.moe import MoEInfo, MoELayer

__all__ = ["patch", "unpatch", "is_patched", "patched_layers"]

_ATTR = "_smoe_hf_patch"
# (router module, its replayed output) while a patched block calls its router for the hooks.
_REPLAY: ContextVar[tuple[nn.Module, Any] | None] = ContextVar("smoe_hf_replay", default=None)


def _require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("smoe.hf needs transformers: pip install smoe[hf]") from e


def _lookup(obj: Any, name: str) -> Any:
    """``getattr(obj, name)`` without ``nn.Module.__getattr__``'s slow path where possible."""
    d = obj.__dict__
    if name in d:
        return d[name]
    for store in ("_parameters", "_buffers"):
        tensors = d.get(store)
        if tensors is not None and name in tensors:
            return tensors[name]
    return getattr(obj, name)


class _NoInitOnMeta(TorchFunctionMode):
    """Skip in-place initialisation of meta tensors while the layer is built: the layer only
    views the model's tensors, and torch runs meta ``normal_`` through Python references at
    a few milliseconds a call (most of ``patch``'s time on a small model)."""

    _INIT = frozenset({torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_,
                       torch.Tensor.fill_}
                      | {getattr(nn.init, n) for n in dir(nn.init)
                         if n.endswith("_") and not n.startswith("_")})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._INIT:
            target = args[0] if args else kwargs.get("tensor")
            if getattr(target, "is_meta", False):
                return target
        return func(*args, **kwargs)


def _store_of(obj: Any, name: str) -> dict:
    """The dict that holds ``obj.name`` (instance dict, parameters or buffers); an empty dict
    when it is computed (a property), so that the next call looks it up in full again."""
    d = obj.__dict__
    if name in d:
        return d
    for store in ("_parameters", "_buffers"):
        tensors = d.get(store)
        if tensors is not None and name in tensors:
            return tensors
    return {}


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run any forward hook (its own or a global one)."""
    return bool(module._forward_hooks or module._forward_pre_hooks
                or module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks)


def _needs_call(module: nn.Module) -> bool:
    """Whether ``module(x)`` would do more than ``module.forward(x)``: any forward or backward
    hook, its own or a global one."""
    return bool(_has_hooks(module) or module._backward_hooks or module._backward_pre_hooks
                or module_mod._global_backward_hooks or module_mod._global_backward_pre_hooks)


# -- one patched block ----------------------------------------------------------------------
class _RouterReplay:
    """A router's ``forward`` while patched: the smoe decision inside the patched block's call,
    the router's own ``forward`` anywhere else."""

    def __init__(self, router: nn.Module, forward: Any) -> None:
        self.router = router
        self.forward = forward
        # torch.compile cannot trace a ContextVar: while compiling, the pending output is kept
        # here instead (as transformers' own CompileableContextVar does; not thread-safe there).
        self.pending: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.pending is not None:
            return self.pending
        if torch.compiler.is_compiling():
            return self.forward(*args, **kwargs)
        replay = _REPLAY.get()
        if replay is not None and replay[0] is self.router:
            return replay[1]
        return self.forward(*args, **kwargs)

    def replay(self, x_TD: torch.Tensor, routed: Any) -> None:
        """Call the router module (so its hooks fire) with its output replaced by ``routed``."""
        if torch.compiler.is_compiling():
            self.pending = routed
            try:
                self.router(x_TD)
            finally:
                self.pending = None
            return
        token = _REPLAY.set((self.router, routed))
        try:
            self.router(x_TD)
        finally:
            _REPLAY.reset(token)


class _Patch:
    """The smoe layer of one block and what is needed to run and undo it."""

    def __init__(self, block: nn.Module, spec: Block, backend: str) -> None:
        self.block, self.spec = block, spec
        self.router = router = getattr(block, spec.router)
        r = spec.routing
        ex = _experts(block, spec)
        kw = _routing(block, router, spec)
        self.weight_owner = _owner(block, router, r.weight)
        router_weight = getattr(*self.weight_owner)
        if router_weight.shape != (ex["E"], ex["D"]):
            raise ValueError(f"smoe.hf: {type(block).__name__} router weight has shape "
                             f"{tuple(router_weight.shape)}, expected {(ex['E'], ex['D'])}")
        for path in spec.unclamped:
            limit = _read(block, router, path)
            if limit is not None and limit != 0 and limit != float("inf"):
                raise ValueError(f"smoe.hf: {type(block).__name__} clamps its SwiGLU "
                                 f"({path.split('.')[-2]} limit {limit}: silu(gate) capped, up "
                                 "clamped to +-limit), which no smoe activation computes")
        mlp = getattr(block, spec.shared, None) if spec.shared else None
        shared_gate = getattr(block, spec.shared_gate, None) if spec.shared_gate else None
        shared_bias = False
        if mlp is not None:
            act = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn")
            if _activation(act) != ex["activation"]:
                raise ValueError(f"smoe.hf: {type(block).__name__}'s shared expert uses another "
                                 "activation than its routed experts")
            shared_bias = mlp.gate_proj.bias is not None
            kw.update(num_shared_experts=1, shared_expert_size=mlp.gate_proj.out_features,
                      shared_expert_gate=shared_gate is not None)
        extra = {} if ex["alpha"] is None else dict(activation_alpha=ex["alpha"],
                                                    activation_limit=ex["limit"])
        cfg = MoEConfig(hidden_size=ex["D"], expert_size=ex["F"], num_experts=ex["E"],
                        activation=ex["activation"], expert_bias=ex["expert_bias"],
                        aux_loss_coef=0.0, z_loss_coef=0.0, **kw, **extra)
        with torch.device("meta"), _NoInitOnMeta():
            layer = MoELayer(cfg, backend=backend)
            if ex["split"]:
                layer.experts = SplitExperts(cfg, backend=backend)
            if shared_bias:
                layer.shared_experts = DenseMLP(cfg.hidden_size, cfg.shared_size, cfg.activation,
                                                bias=True)
            if r.selection or r.softcap:
                softcap = float(_read(block, router, r.softcap) or 0.0) if r.softcap else 0.0
                norm_min = float(_read(block, router, r.norm_min)) if r.norm_min else 0.0
                layer.router = HFRouter(cfg, selection=r.selection, softcap=softcap,
                                        norm_min=norm_min)
        layer.experts.transposed = ex["transposed"]
        layer.experts.interleaved = ex["interleaved"]
        self.layer = layer
        # transformers' experts-implementation setting (``model.set_experts_implementation``),
        # read by decorated experts classes from their config on every call: followed here.
        experts_module = getattr(block, spec.experts) if spec.experts else block
        impl_config = getattr(experts_module, "config", None)
        self.impl_config = (impl_config if hasattr(impl_config, "_experts_implementation")
                            else None)
        # Its instance dict, read directly: ``vars(config)`` goes through the config class's
        # __getattribute__ (a few microseconds per forward in transformers 5).
        self._impl_dict: dict | None = (object.__getattribute__(impl_config, "__dict__")
                                        if self.impl_config is not None else None)
        self.impl_seen = self._implementation()

        # (smoe module, name, source object, source name): re-checked on every forward.
        binds = [(layer.router, "weight", *self.weight_owner)]
        if r.bias is not None:
            binds.append((layer.router, "bias", *_owner(block, router, r.bias)))
        binds += [(layer.experts, dst, src, name) for dst, src, name in ex["binds"]]
        if mlp is not None:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                binds.append((getattr(layer.shared_experts, proj), "weight",
                              getattr(mlp, proj), "weight"))
                if shared_bias:
                    binds.append((getattr(layer.shared_experts, proj), "bias",
                                  getattr(mlp, proj), "bias"))
            if shared_gate is not None:
                binds.append((layer.shared_expert_gate, "weight", shared_gate, "weight"))
        # Tensors the model does not have (a zero selection bias, smoe's load counter) are owned
        # here and follow the router weight's device.
        self.owned: list[tuple[nn.Module, str]] = []
        device = router_weight.device
        if cfg.router == "sigmoid_bias" or r.selection in ("softmax_bias", "logits_bias"):
            owner = (_owner(block, router, r.correction_bias) if r.correction_bias else None)
            if owner is not None and getattr(owner[0], owner[1], None) is not None:
                binds.append((layer.router, "expert_bias", *owner))
            else:
                layer.router.expert_bias = torch.zeros(cfg.num_experts, device=device)
                self.owned.append((layer.router, "expert_bias"))
        if cfg.router == "sigmoid_bias":
            layer.load_since_update = torch.zeros(cfg.num_experts, dtype=torch.long,
                                                  device=device)
            self.owned.append((layer, "load_since_update"))
        self.binds = binds
        self._sources: tuple[Any, ...] = ()
        self._stores: list[tuple[dict, str]] = []
        self._bind()
        left = [n for n, t in list(layer.named_parameters()) + list(layer.named_buffers())
                if t.is_meta and not router_weight.is_meta]
        if left:  # a table row that misses a tensor: fail loudly rather than run on garbage
            raise RuntimeError(f"smoe.hf: {type(block).__name__}: unbound tensors {left}")
        self.jitter = [_owner(block, router, p) for p in spec.jitter]
        self.output_bias = (_owner(block, router, spec.output_bias) if spec.output_bias
                            else None)
        self.output_norm = (getattr(*_owner(block, router, spec.output_norm))
                            if spec.output_norm else None)
        self.average = (spec.shared_combine is not None and mlp is not None
                        and _read(block, router, spec.shared_combine) == "average")
        self._saved: dict[str, Any] = {}

    # -- install / remove -------------------------------------------------------------------
    def install(self) -> None:
        block, router = self.block, self.router
        self._saved = {"block": block.__dict__.get("forward"),
                       "router": router.__dict__.get("forward")}
        self.replay = _RouterReplay(router, router.forward)
        router.forward = self.replay
        block.forward = self.forward
        setattr(block, _ATTR, self)

    def remove(self) -> None:
        for module, key in ((self.block, "block"), (self.router, "router")):
            del module.forward
            if self._saved[key] is not None:
                module.forward = self._saved[key]
        delattr(self.block, _ATTR)

    # -- running ----------------------------------------------------------------------------
    def _bind(self) -> None:
        # Runs on every call, so the common case (nothing swapped) is one dict lookup and one
        # identity test per tensor, in the dict where each source was found last time. The
        # full rebind runs only when the model swapped a tensor (``to_empty``, ``model.to()``
        # on buffers, ``load_state_dict(assign=True)``). Parameters moved by ``model.to()`` keep
        # their objects (their ``.data`` changes), so the layer sees the move anyway.
        for (store, key), seen in zip(self._stores, self._sources):
            if store.get(key) is not seen:
                break
        else:
            if self._sources:
                sources = self._sources
                self._check_owned(sources[0].device)
                return
        sources = tuple(_lookup(src, src_name) for _, _, src, src_name in self.binds)
        for (dst, name, _, _), t in zip(self.binds, sources):
            if getattr(dst, name) is not t:
                setattr(dst, name, t)
        self._sources = sources
        self._stores = [(_store_of(src, src_name), src_name)
                        for _, _, src, src_name in self.binds]
        self._check_owned(sources[0].device)  # the router weight's device

    def _check_owned(self, device: torch.device) -> None:
        for module, name in self.owned:
            t = getattr(module, name)
            if t.device != device:
                # Owned tensors start as zeros (no selection bias, no load yet). A model built
                # on the meta device and materialised later (``to_empty`` + init, as
                # low-memory loading and FSDP do) has no data to copy: start from zeros there.
                t = (torch.zeros(t.shape, dtype=t.dtype, device=device) if t.is_meta
                     else t.to(device))
                setattr(module, name, t)

    def _implementation(self) -> str | None:
        # The instance dict, not the property: transformers configs have a slow
        # __getattribute__, and this runs on every call.
        if self._impl_dict is None:
            return None
        return self._impl_dict.get("_experts_implementation_internal")

    def _logits_dtype(self, x: torch.Tensor) -> torch.dtype:
        """dtype of the router linear in the original model."""
        policy = self.spec.routing.logits
        if policy == "float32":
            return torch.float32
        if policy == "weight":
            return getattr(*self.weight_owner).dtype
        return x.dtype

    def forward(self, hidden_states: torch.Tensor) -> Any:
        """The block's ``forward`` while patched: same argument, same return value."""
        block, layer = self.block, self.layer
        self._bind()
        impl = self._implementation()
        if impl != self.impl_seen:
            layer.experts.backend = experts_backend_for(impl)
            self.impl_seen = impl
        if layer.training != block.training:
            layer.train(block.training)
        x = hidden_states
        if self.spec.returns == "flattened":  # a 1-D selection of tokens (ERNIE-4.5-VL)
            x = x.reshape(-1, layer.config.hidden_size)
        logits_dtype = self._logits_dtype(x)
        in_float32 = logits_dtype == torch.float32
        if layer.router.logits_in_float32 != in_float32:  # nn.Module.__setattr__ is slow
            layer.router.logits_in_float32 = in_float32
        if block.training:
            for owner, name in self.jitter:
                amp = getattr(owner, name, None)
                if amp:
                    x = x * torch.empty_like(x).uniform_(1.0 - amp, 1.0 + amp)
        # The layer is not a submodule: only hooks put on it directly (a routing monitor on
        # ``patched_layers``) or global ones need nn.Module.__call__; skipping it otherwise
        # saves its dispatch on every call (tiny models feel it).
        y, info = layer(x) if _needs_call(layer) else layer.forward(x)
        returns = self.spec.returns
        observed = _has_hooks(self.router)
        if observed or returns != "hidden":
            x_TD = x.reshape(-1, x.shape[-1])
            routed = self._router_output(x_TD, info, logits_dtype)
            if observed:  # the router's hooks (router_logits recording) see `routed`
                self.replay.replay(x_TD, routed)
        if self.output_bias is not None:
            y = y + getattr(*self.output_bias)
        if self.average:
            y = y / 2
        if self.output_norm is not None:
            y = self.output_norm(y)
        if returns == "hidden_and_weights":
            return y, routed[1]
        if returns == "flat_hidden_and_logits":
            return y.reshape(-1, y.shape[-1]), routed[1]
        if returns == "flattened":
            return y.flatten(), routed[0].flatten()
        return y

    def _router_output(self, x_TD: torch.Tensor, info: MoEInfo,
                       logits_dtype: torch.dtype) -> Any:
        """What the original router would have returned, from the smoe router's decision."""
        r = self.spec.routing
        logits = info.router_logits
        logits = logits.to(torch.float32 if r.logits_out == "float32" else logits_dtype)
        weights_dtype = {"float32": torch.float32, "logits": logits.dtype,
                         "input": x_TD.dtype}[r.weights_out]
        indices, weights = info.expert_indices, info.expert_weights.to(weights_dtype)
        if r.returns == "logits":
            return logits
        if r.returns == "scores_logits":
            scores = torch.zeros_like(logits).scatter(1, indices, weights.to(logits.dtype))
            return scores, logits
        if r.returns == "jetmoe":
            K = indices.shape[1]
            _, index_sorted = indices.flatten().sort(0)
            expert_size = torch.bincount(indices.flatten(),
                                         minlength=self.layer.config.num_experts).tolist()
            return (index_sorted, index_sorted.div(K, rounding_mode="trunc"),
                    weights.flatten()[index_sorted], expert_size, logits)
        return logits, weights, indices


# -- public API -----------------------------------------------------------------------------
def patch(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Make every sparse MoE block of a transformers model run on an smoe MoELayer, in place.

    The layers use the model's own parameters (no copy); outputs, router logits, the model's
    auxiliary loss, ``generate`` and training work unchanged. ``backend`` is the experts
    backend (see :class:`smoe.nn.Experts`). Returns ``model``. Raises ``ValueError`` for a
    model with no supported MoE block (the message lists the supported families) or one that
    is already patched.
    """
    _require_transformers()
    if is_patched(model):
        raise ValueError("smoe.hf.patch: the model is already patched; call unpatch first")
    for m in model.modules():
        reason = REFUSED.get(type(m).__name__)
        if reason is not None:
            raise ValueError(f"smoe.hf.patch: {type(m).__name__} cannot run on smoe: {reason}")
    found = [(m, BLOCKS[type(m).__name__]) for m in model.modules()
             if type(m).__name__ in BLOCKS]
    if not found:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        if model_type in NO_ROUTED_EXPERTS:
            raise ValueError(f"smoe.hf.patch: nothing to patch: "
                             f"{NO_ROUTED_EXPERTS[model_type]}")
        raise ValueError(f"smoe.hf.patch: no sparse MoE block smoe can run in this "
                         f"{model_type!r} model; supported families: "
                         f"{', '.join(SUPPORTED_FAMILIES)}")
    patches = [_Patch(block, spec, backend) for block, spec in found]  # all built, then installed
    for p in patches:
        p.install()
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: the original blocks run their own code again. Returns ``model``."""
    for m in model.modules():
        p = m.__dict__.get(_ATTR)
        if p is not None:
            p.remove()
    return model


def is_patched(model: nn.Module) -> bool:
    return any(_ATTR in m.__dict__ for m in model.modules())


def patched_layers(model: nn.Module) -> dict[str, MoELayer]:
    """Qualified block name -> the smoe layer running it (for inspection and monitoring)."""
    return {name: m.__dict__[_ATTR].layer for name, m in model.named_modules()
            if _ATTR in m.__dict__}
