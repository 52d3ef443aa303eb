"""Adapters for the MoE layers of other projects, for ``benchmarks/layer.py`` / ``smoe bench``.

Each ``build_*`` takes a :class:`smoe.bench.Shape` and returns a :class:`smoe.bench.Built`: a
forward ``x_TD -> y_TD`` (float32, T tokens of width d) and the parameters. A peer that is not
installed, or cannot take a shape (top-2 only, T not divisible by E, memory), raises or returns
a :class:`smoe.bench.Skip`, which the table shows as ``n/a (reason)``. Every adapter is
configured to do the same work as smoe's ``softmax_topk`` layer where the peer allows it:
K experts per token, no random dropping of the later choices, capacity ample for the average
load. The peers are benchmark-only (the ``bench`` extra; torchtitan itself with
``pip install --no-deps``, as its declared dependencies are for its trainer and would replace
packages here), never a dependency of smoe.

Installed from the peers' own sources (versions checked): torchtitan 0.3.0
(``torchtitan.models.common.moe``), fairscale 0.4.13 (``fairscale.nn.moe``), mixture-of-experts
0.2.3 (lucidrains), st-moe-pytorch 0.1.8.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import warnings

import torch
from torch import nn

from smoe.bench import Built, Candidate, Shape, Skip, SwiGLU, init_weights, with_shared

__all__ = ["candidates", "build_torchtitan", "build_fairscale", "build_lucidrains",
           "build_st_moe"]

#: one-hot dispatch tensors of (K, T, E, capacity) floats: above this, skipped for memory.
ONE_HOT_LIMIT_BYTES = 2 * 2**30


def _require(module: str, pip_name: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise Skip("not installed", f"{pip_name} is not installed (the bench extra)")


def _quiet_import(fn):
    """Run an import of a peer with its deprecation warnings silenced (beartype's PEP 585
    notices on st-moe's hints, torch.jit.script_method in older code): they are not ours."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return fn()


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


# --- torchtitan -----------------------------------------------------------------------------
def _import_torchtitan():
    """torchtitan 0.3.0 imports, at module level, CUDA-only expert-parallel kernels written in
    triton (``torchtitan.distributed.minimal_async_ep``), which the local (EP=1) dispatcher
    measured here never calls. Without triton, that one subpackage is replaced by a stub whose
    functions raise, so that the rest imports on CPU."""
    _require("torchtitan", "torchtitan")
    name = "torchtitan.distributed.minimal_async_ep"
    if importlib.util.find_spec("triton") is None and name not in sys.modules:
        stub = types.ModuleType(name)

        def _unavailable(*args, **kwargs):
            raise RuntimeError("minimal_async_ep needs triton and CUDA")

        stub.combine_op = stub.dispatch_op = stub.init_buffer = _unavailable
        stub.MinimalAsyncEPDispatchMetadata = type("MinimalAsyncEPDispatchMetadata", (), {})
        sys.modules[name] = stub

    def imp():
        from torchtitan.models.common import moe as tt_moe
        from torchtitan.models.common.feed_forward import FeedForward
        from torchtitan.models.common.linear import Linear
        from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher
        return tt_moe, FeedForward, Linear, LocalTokenDispatcher

    try:
        return _quiet_import(imp)
    except ImportError as exc:
        raise Skip("import failed", f"torchtitan: {exc}") from exc


def build_torchtitan(shape: Shape) -> Built:
    """torchtitan's MoE: TokenChoiceTopKRouter (softmax, route_norm) + LocalTokenDispatcher +
    GroupedExperts (``torch._grouped_mm``; it casts activations and weights to bfloat16 inside
    its forward, whatever the input dtype) + optional shared FeedForward."""
    tt_moe, FeedForward, Linear, LocalTokenDispatcher = _import_torchtitan()
    # Its router opens a float32 CPU autocast region, which torch disables with a warning.
    warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype")
    d, f, E, K = shape.d, shape.f, shape.E, shape.K
    shared = None
    if shape.shared:
        S = shape.shared
        shared = FeedForward.Config(w1=Linear.Config(in_features=d, out_features=S),
                                    w2=Linear.Config(in_features=S, out_features=d),
                                    w3=Linear.Config(in_features=d, out_features=S))
    cfg = tt_moe.MoE.Config(
        num_experts=E,
        load_balance_coeff=None,
        router=tt_moe.TokenChoiceTopKRouter.Config(
            num_experts=E, gate=Linear.Config(in_features=d, out_features=E), top_k=K,
            score_func="softmax", route_norm=True),
        routed_experts=tt_moe.RoutedExperts.Config(
            inner_experts=tt_moe.GroupedExperts.Config(dim=d, hidden_dim=f, num_experts=E),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=E, top_k=K)),
        shared_experts=shared,
    )
    moe = init_weights(cfg.build())

    def forward(x_TD: torch.Tensor) -> torch.Tensor:
        return moe(x_TD.view(1, -1, d)).view(-1, d)

    return Built(forward, _params(moe), moe, note="computes its experts in bfloat16")


# --- fairscale ------------------------------------------------------------------------------
def build_fairscale(shape: Shape) -> Built:
    """fairscale's MOELayer + Top2Gate (GShard): one-hot dispatch/combine einsums with capacity
    2T/E, an all-to-all over a process group (gloo, world size 1, in-process HashStore), one
    SwiGLU expert module per expert (fairscale brings no experts of its own)."""
    if shape.K != 2:
        raise Skip("top-2 only", "fairscale's Top2Gate routes every token to exactly 2 experts")
    _require("fairscale", "fairscale")
    import torch.distributed as dist

    fs_moe = _quiet_import(lambda: importlib.import_module("fairscale.nn.moe"))
    MOELayer, Top2Gate = fs_moe.MOELayer, fs_moe.Top2Gate

    created = False
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        created = True
    elif dist.get_world_size() != 1:
        raise Skip("process group busy", f"a process group of world size "
                                         f"{dist.get_world_size()} is already initialised")
    d, E = shape.d, shape.E
    experts = nn.ModuleList([SwiGLU(d, shape.f) for _ in range(E)])
    layer = init_weights(MOELayer(Top2Gate(d, E), experts))

    def fwd(x_TD: torch.Tensor) -> torch.Tensor:
        return layer(x_TD.view(-1, 1, d)).view(-1, d)

    module, forward = with_shared(shape, layer, fwd)

    def limit(T: int, backward: bool) -> Skip | None:
        if T % E:
            return Skip("T % E != 0", "fairscale's top2gating needs T divisible by E "
                                      "(capacity 2T/E)")
        return None

    def close() -> None:
        if created and dist.is_initialized():
            dist.destroy_process_group()

    return Built(forward, _params(module), module, limit=limit, close=close)


# --- lucidrains mixture-of-experts ------------------------------------------------------------
class _SwiGLUExperts(nn.Module):
    """SwiGLU experts in the stacked-einsum style of lucidrains' ``Experts`` (whose own experts
    are a non-gated GELU/ReLU FFN): w1 [E, d, 2f], w2 [E, f, d]; x [E, n, d] -> [E, n, d]."""

    def __init__(self, E: int, d: int, f: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(E, d, 2 * f))
        self.w2 = nn.Parameter(torch.empty(E, f, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = torch.einsum("...nd,...dh->...nh", x, self.w1).chunk(2, dim=-1)
        return torch.einsum("...nh,...hd->...nd", torch.nn.functional.silu(gate) * up, self.w2)


def _one_hot_limit(shape: Shape, capacity_factor: float, name: str):
    def limit(T: int, backward: bool) -> Skip | None:
        cap = max(min(T, int(T * capacity_factor / shape.E)), 4)
        need = shape.K * T * shape.E * cap * 4
        if need > ONE_HOT_LIMIT_BYTES:
            return Skip(f"mem {need / 2**30:.0f} GiB",
                        f"{name}'s one-hot dispatch tensors (K, T, E, capacity) take "
                        f"{need / 2**30:.1f} GiB each, over {ONE_HOT_LIMIT_BYTES / 2**30:.0f} GiB")
        return None
    return limit


def build_lucidrains(shape: Shape) -> Built:
    """lucidrains' ``mixture_of_experts.MoE`` (Top2Gating transcribed from tensor2tensor): the
    second expert always taken (``second_policy='all'``), capacity factor 2 in training and
    eval, SwiGLU experts (see :class:`_SwiGLUExperts`)."""
    if shape.K != 2:
        raise Skip("top-2 only", "mixture-of-experts' Top2Gating routes to at most 2 experts")
    _require("mixture_of_experts", "mixture-of-experts")
    MoE = _quiet_import(lambda: importlib.import_module("mixture_of_experts")).MoE

    d = shape.d
    moe = MoE(dim=d, num_experts=shape.E, second_policy_train="all", second_policy_eval="all",
              capacity_factor_train=2.0, capacity_factor_eval=2.0,
              experts=_SwiGLUExperts(shape.E, d, shape.f))
    moe = init_weights(moe)

    def fwd(x_TD: torch.Tensor) -> torch.Tensor:
        return moe(x_TD.view(1, -1, d))[0].view(-1, d)

    module, forward = with_shared(shape, moe, fwd)
    return Built(forward, _params(module), module, limit=_one_hot_limit(shape, 2.0, "lucidrains"),
                 note="SwiGLU experts in its einsum style (its own are non-gated); "
                      "second expert always taken, capacity factor 2")


# --- st-moe-pytorch -------------------------------------------------------------------------
def build_st_moe(shape: Shape) -> Built:
    """st-moe-pytorch's ``MoE`` (ST-MoE, top-n gating): its own GEGLU experts (with biases and a
    multiplicative bias) of width f, every one of the K choices routed (threshold ~0), capacity
    factor K, one expert module per expert run in a Python loop."""
    _require("st_moe_pytorch", "st-moe-pytorch")
    if shape.K < 2:
        raise Skip("top-n >= 2", "st-moe-pytorch's TopNGating needs top_n >= 2")
    try:
        MoE = _quiet_import(lambda: importlib.import_module("st_moe_pytorch")).MoE
    except ImportError as exc:
        raise Skip("import failed", f"st_moe_pytorch: {exc}") from exc
    d, f, K = shape.d, shape.f, shape.K
    mult = f * 1.5 / d  # its Expert's width is int(d * mult * 2 / 3)
    if int(d * mult * 2 / 3) != f:
        raise Skip("width", f"cannot express expert width {f} as int({d} * mult * 2/3)")
    moe = _quiet_import(lambda: MoE(
        dim=d, num_experts=shape.E, expert_hidden_mult=mult, gating_top_n=K,
        threshold_train=1e-9, threshold_eval=1e-9, capacity_factor_train=float(K),
        capacity_factor_eval=float(K), is_distributed=False))
    moe = init_weights(moe)

    def fwd(x_TD: torch.Tensor) -> torch.Tensor:
        return moe(x_TD.view(1, -1, d)).outputs.view(-1, d)

    module, forward = with_shared(shape, moe, fwd)
    return Built(forward, _params(module), module, limit=_one_hot_limit(shape, float(K), "st-moe"),
                 note="its own GEGLU experts (with biases); all K choices routed "
                      "(threshold 1e-9), capacity factor K")


def candidates() -> list[Candidate]:
    return [
        Candidate("torchtitan", "torchtitan MoE (bf16 experts inside)", build_torchtitan),
        Candidate("fairscale", "fairscale MOELayer + Top2Gate", build_fairscale,
                  tokens_exponent=2.0),
        Candidate("lucidrains", "lucidrains mixture-of-experts", build_lucidrains,
                  tokens_exponent=2.0),
        Candidate("st-moe", "st-moe-pytorch", build_st_moe, tokens_exponent=2.0),
    ]
