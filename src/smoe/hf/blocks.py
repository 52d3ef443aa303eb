"""Reading a transformers sparse MoE block through its :mod:`smoe.hf.families` row: sizes,
activation, the tensors to bind, and the :class:`~smoe.MoEConfig` fields of its router.

Used by :mod:`smoe.hf.patch`; the functions are private to the ``smoe.hf`` package.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from smoe.hf.families import AXK2, Block

__all__ = ["EXPERTS_IMPLEMENTATIONS", "experts_backend_for"]

def _owner(block: nn.Module, router: nn.Module, path: str) -> tuple[Any, str]:
    """(object, attribute name) that a family path points at; see :mod:`smoe.hf.families`."""
    obj: Any = router
    if path.startswith("block."):
        obj, path = block, path[len("block."):]
    *parents, name = path.split(".")
    for part in parents:
        obj = getattr(obj, part)
    return obj, name


def _read(block: nn.Module, router: nn.Module, path: str) -> Any:
    return getattr(*_owner(block, router, path))


def _activation(act: Any) -> str:
    """smoe's gated activation for a transformers activation module or function."""
    name = getattr(act, "__name__", None) or type(act).__name__
    if name in ("SiLUActivation", "SiLU", "silu"):
        return "swiglu"
    if name == "GELUActivation":
        return "geglu"
    if name == "GELUTanh" or (name == "GELU" and getattr(act, "approximate", "") == "tanh"):
        return "geglu_tanh"
    if name in ("GELU", "gelu"):
        return "geglu"
    raise ValueError(f"smoe.hf: the activation {name} has no smoe equivalent")


def _experts(block: nn.Module, spec: Block) -> dict[str, Any]:
    """Sizes, activation and (smoe name, source module, source name) tensor bindings."""
    src = getattr(block, spec.experts) if spec.experts else block
    out: dict[str, Any] = {"transposed": False, "interleaved": False, "split": False,
                           "alpha": None, "limit": None, "expert_bias": False}
    if spec.layout == "dbrx":
        mlp = src.mlp
        out.update(E=src.num_experts, F=src.ffn_hidden_size, D=src.hidden_size,
                   activation=_activation(mlp.activation_fn), split=True, transposed=True,
                   binds=[("gate_proj", mlp, "w1"), ("up_proj", mlp, "v1"),
                          ("down_proj", mlp, "w2")])
        return out
    if spec.layout == "jetmoe":
        w_in, w_down = src.input_linear.weight, src.output_linear.weight
        binds = [("gate_up_proj", src.input_linear, "weight"),
                 ("down_proj", src.output_linear, "weight")]
        act = src.activation
    else:
        w_in, w_down = src.gate_up_proj, src.down_proj
        binds = [("gate_up_proj", src, "gate_up_proj"), ("down_proj", src, "down_proj")]
        act = getattr(src, "act_fn", None)
    if spec.layout in ("gpt_oss", "llama4"):
        E, D, two_f = w_in.shape
        expected_down = (E, two_f // 2, D)
        out["transposed"] = True
    else:
        E, two_f, D = w_in.shape
        expected_down = (E, D, two_f // 2)
    if tuple(w_down.shape) != expected_down:
        raise ValueError(f"smoe.hf: {type(block).__name__} has down_proj {tuple(w_down.shape)}, "
                         f"expected {expected_down}")
    if spec.layout == "gpt_oss":
        out.update(activation="swiglu_oai", alpha=float(src.alpha), limit=float(src.limit),
                   interleaved=True)
    else:
        out["activation"] = _activation(act)
    bias_in = getattr(src, "gate_up_proj_bias", None)
    if bias_in is not None:
        binds += [("gate_up_proj_bias", src, "gate_up_proj_bias"),
                  ("down_proj_bias", src, "down_proj_bias")]
    out.update(E=E, F=two_f // 2, D=D, binds=binds, expert_bias=bias_in is not None)
    return out


def _routing(block: nn.Module, router: nn.Module, spec: Block) -> dict[str, Any]:
    """MoEConfig fields of the block's router, read from the loaded modules."""
    r = spec.routing
    name = type(block).__name__
    top_k = int(_read(block, router, r.top_k))
    norm = r.norm if isinstance(r.norm, bool) else _read(block, router, r.norm)
    scale = (float(r.scale) if isinstance(r.scale, (int, float))
             else float(_read(block, router, r.scale)))
    kw: dict[str, Any] = dict(top_k=top_k, routed_scaling_factor=scale,
                              router_bias=r.bias is not None)
    # Rules that are another rule with settings read from the module.
    rule = r.rule
    if rule == "cohere2":
        fn = router.expert_selection_fn
        if fn not in ("softmax", "sigmoid"):
            raise ValueError(f"smoe.hf: {name} expert_selection_fn={fn!r} is not supported")
        rule = "topk_softmax" if fn == "softmax" else "sigmoid"
    elif rule == "dbrx":  # norm is the p of a p-norm; the weights are positive, so p=1 is a sum
        if norm is not None and float(norm) != 1.0:
            raise ValueError(f"smoe.hf: {name} moe_normalize_expert_weights={norm} (a p-norm "
                             "with p != 1) has no smoe equivalent; only None or 1 are supported")
        norm, rule = norm is not None, "softmax_topk"
    elif rule == "deepseek_v2":
        method = router.topk_method
        if method == "group_limited_greedy":
            n_groups, topk_groups = int(router.num_group), int(router.topk_group)
            kept = topk_groups * (_read(block, router, r.weight).shape[0] // n_groups)
            # transformers zeroes the scores of the dropped groups and takes the top K: with
            # K above the kept groups' experts, the extra picks are dropped experts with weight
            # exactly 0, which add nothing. Routing to the kept experts only is the same sum.
            kw.update(n_groups=n_groups, topk_groups=topk_groups, group_score="max",
                      top_k=min(top_k, kept))
        elif method != "greedy":
            raise ValueError(f"smoe.hf: {name} topk_method={method!r} is not supported")
        rule = "softmax_topk"
    kw["norm_topk_prob"] = norm = bool(norm)

    if rule == "softmax_topk":
        # A renormalised top-1 weight is exactly 1: a softmax over the one chosen logit.
        kw["router"] = "topk_softmax" if norm and top_k == 1 else "softmax_topk"
        if r.groups:  # Mistral 4: softmax scores, dropped groups scored 0 (below every kept one)
            E = _read(block, router, r.weight).shape[0]
            groups = _groups(name, router, top_k, E)
            if groups["n_groups"] > 1 and kw["router"] == "topk_softmax":
                raise ValueError(f"smoe.hf: {name} renormalises a single expert (top_k=1) under "
                                 "group-limited routing, which smoe's routers do not combine; "
                                 "use top_k > 1 or n_group=1")
            kw.update(groups)
    elif rule == "topk_softmax":
        kw["router"] = "topk_softmax"
    elif rule in ("sigmoid", "llama4"):
        kw.update(router="sigmoid_bias", norm_topk_eps=r.norm_eps)
        if r.groups:
            E = _read(block, router, r.weight).shape[0]
            groups = _groups(name, router, top_k, E)
            if groups["n_groups"] > 1 and r is AXK2:
                _check_zero_mask(name, _read(block, router, r.correction_bias))
            kw.update(groups)
        if rule == "llama4":
            kw.update(norm_topk_prob=False, weights_on_input=True)
    elif rule == "sparsemixer":
        # transformers' sparsemixer is always top-2, whatever num_experts_per_tok says.
        kw.update(router="sparsemixer", top_k=2,
                  sparsemixer_jitter_eps=float(router.router_jitter_noise))
    return kw


#: transformers experts implementation -> smoe experts backend. ``batched_mm`` (gather each
#: (token, expert) pair's weights, one batched GEMM) has no smoe twin; ``auto`` is the nearest:
#: one grouped GEMM per projection where dtype and sizes allow, the per-expert loop otherwise.
EXPERTS_IMPLEMENTATIONS = {"eager": "loop", "grouped_mm": "grouped_mm", "batched_mm": "auto"}


def experts_backend_for(implementation: str | None) -> str:
    """The smoe experts backend that honours a transformers ``experts_implementation``."""
    if implementation is None:
        return "auto"
    if implementation not in EXPERTS_IMPLEMENTATIONS:
        raise ValueError(f"smoe.hf: experts_implementation={implementation!r} has no smoe "
                         f"equivalent on a patched model; use one of "
                         f"{', '.join(EXPERTS_IMPLEMENTATIONS)}, or smoe.hf.unpatch(model) first")
    return EXPERTS_IMPLEMENTATIONS[implementation]


def _check_zero_mask(name: str, bias: Any) -> None:
    """A.X-K2 gives the experts of dropped groups a choice score of 0, not -inf. Sigmoid scores
    are positive, so with a non-negative selection bias every kept expert outscores 0 and the
    choice is smoe's; a negative bias can push a kept expert below a dropped one. Checked when
    patching: a bias moved negative afterwards (balancing updates) is not re-checked."""
    if bias is not None and bool((bias < 0).any()):
        raise ValueError(f"smoe.hf: {name} scores the experts of dropped groups 0 (not -inf) and "
                         "its e_score_correction_bias has negative entries, so a dropped "
                         "expert can outrank a kept one; smoe's group limit drops them always. "
                         "Use n_group=1 or a non-negative bias")


def _groups(name: str, router: nn.Module, top_k: int, E: int) -> dict[str, int]:
    """Group-limited routing of a DeepSeek-V3-style router, as smoe settings.

    transformers gives the experts of the dropped groups a score of -inf and takes the top K.
    When K exceeds the kept groups' experts, the remaining picks are experts of dropped groups,
    chosen by ``torch.topk``'s order among equal -inf scores and weighted by their real sigmoid
    scores. With K = E every expert is picked whatever the groups, so the group limit is moot
    and dropped; between the two, which dropped experts are picked is an artefact of the
    kernel's tie order, not a routing rule, and is refused.
    """
    if router.num_group is None:  # A.X-K2: no group limit
        return dict(n_groups=1, topk_groups=1)
    n_groups, topk_groups = int(router.num_group), int(router.topk_group)
    if n_groups <= 1:
        return dict(n_groups=1, topk_groups=1)
    kept = topk_groups * (E // n_groups)
    if top_k <= kept:
        return dict(n_groups=n_groups, topk_groups=topk_groups)
    if top_k == E:
        return dict(n_groups=1, topk_groups=1)
    raise ValueError(f"smoe.hf: {name} routes top_k={top_k} experts but its {topk_groups} kept "
                     f"group(s) of {E // n_groups} hold only {kept}: transformers fills the "
                     f"other {top_k - kept} slots with experts of dropped groups in torch.topk's "
                     "tie order among -inf scores, which smoe does not reproduce; use top_k <= "
                     f"{kept}, top_k = {E}, or more kept groups (topk_group)")
