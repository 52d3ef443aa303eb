"""Hybrid dense + SMoE serving: which of two models answers a request.

A cheap dense model and a larger (or better) SMoE model are served side by side; each request
goes to one of them. The policies are plain data in, a :class:`Decision` out, so they are
tested without a server:

* ``length``: prompts of more than ``length_threshold`` tokens go to the SMoE model (long
  contexts are where a model's quality matters most and where a per-token cost is amortised).
* ``domain``: a small byte-level classifier (:mod:`smoe.serve.domain`) labels the prompt;
  the domains in ``smoe_domains`` go to the SMoE model (e.g. code, where experts specialise).
* ``cascade``: the dense model answers first; when its answer's mean token log-probability
  (under the dense model itself) is below ``cascade_threshold``, the model was unsure and the
  request escalates to the SMoE model, whose answer is returned instead. This is the
  confidence-based cascade of FrugalGPT (Chen et al. 2023, arXiv 2305.05176) with the
  generator's own likelihood as the scorer. The score is one extra forward of the dense model
  over prompt + answer (the engine returns token ids, not log-probabilities); an escalation
  also pays the dense answer. A streamed cascade request gets its first chunk only once the
  dense answer is scored (a kept answer arrives as one chunk).

A request that names one of the two models (``model`` field) goes to it (policy ``explicit``);
one that names :data:`ROUTED_MODEL` (``auto``, listed in ``/v1/models`` beside the two, since
the OpenAI clients require a model) or none is routed by the policy.
Every decision is counted by policy and target (:class:`HybridRouter.counter`, a
prometheus_client counter with bounded labels: 4 policies x 2 targets).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["TARGETS", "POLICIES", "ROUTED_MODEL", "Decision", "HybridConfig", "HybridRouter",
           "mean_token_logprob"]

#: The two models of a hybrid server.
TARGETS = ("dense", "smoe")
#: Routing policies (``explicit``: the request named a model).
POLICIES = ("length", "domain", "cascade")
#: The model id that asks a hybrid server to route the request by its policy.
ROUTED_MODEL = "auto"


@dataclass(frozen=True)
class Decision:
    """Which model answers (``target``: ``dense`` or ``smoe``), by which ``policy``, why (a
    short human-readable ``reason``) and the number it was decided on (prompt tokens, domain
    probability, mean log-probability; None when there is none). ``final`` is False only for a
    cascade's first step (the dense model answers, then :meth:`HybridRouter.escalate`)."""

    target: str
    policy: str
    reason: str
    score: float | None = None
    final: bool = True

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target={self.target!r} must be one of {TARGETS}")

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "policy": self.policy, "reason": self.reason,
                "score": self.score}


@dataclass(frozen=True)
class HybridConfig:
    """``smoe serve --route`` settings. policy: ``length``, ``domain`` or ``cascade``.
    length_threshold: prompts of more tokens go to the SMoE model. smoe_domains: the domains
    the SMoE model answers under ``domain``; domain_min_prob: below this probability of its
    best domain a prompt is "unsure" and goes to the SMoE model too. cascade_threshold: mean
    log-probability (nats per token, <= 0) under which a dense answer escalates."""

    policy: str
    length_threshold: int = 128
    domain_classifier: str | None = None
    smoe_domains: tuple[str, ...] = ("code",)
    domain_min_prob: float = 0.5
    cascade_threshold: float = -1.5

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy={self.policy!r} must be one of {', '.join(POLICIES)}")
        t = self.length_threshold
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"length_threshold={t!r} must be an integer >= 0")
        object.__setattr__(self, "smoe_domains", tuple(self.smoe_domains))
        if self.policy == "domain" and not self.domain_classifier:
            raise ValueError("policy='domain' needs domain_classifier (--domain-classifier "
                             "FILE, from `smoe route-classifier train --out FILE`)")
        if not 0.0 <= self.domain_min_prob <= 1.0:
            raise ValueError(f"domain_min_prob={self.domain_min_prob!r} must be in [0, 1]")
        if not (math.isfinite(self.cascade_threshold) and self.cascade_threshold <= 0):
            raise ValueError(f"cascade_threshold={self.cascade_threshold!r} must be a "
                             "log-probability <= 0 (nats per token)")


@torch.no_grad()
def mean_token_logprob(model: torch.nn.Module, prompt_ids: Sequence[int],
                       output_ids: Sequence[int]) -> float:
    """Mean log-probability (nats) of ``output_ids`` following ``prompt_ids`` under ``model``
    (one forward over both, no cache: the scorer of a cascade). 0.0 for an empty output (no
    evidence of doubt). Only the last ``max_seq_len`` tokens are read."""
    if not output_ids:
        return 0.0
    ids = [int(t) for t in (*prompt_ids, *output_ids)]
    limit = model.config.max_seq_len
    ids = ids[-limit:]
    n = min(len(output_ids), len(ids) - 1)
    device = model.embed.weight.device
    ids_1T = torch.tensor([ids], dtype=torch.long, device=device)
    logits_TV = model(ids_1T).logits[0].float()
    logp_TV = torch.log_softmax(logits_TV[-n - 1:-1], dim=-1)
    return float(logp_TV.gather(1, ids_1T[0, -n:, None]).mean())


@dataclass
class HybridRouter:
    """Decides per request (see the module docstring). ``classifier``: a
    :class:`~smoe.serve.domain.DomainClassifier` (needed by ``domain``; loaded from
    ``config.domain_classifier`` by :meth:`from_config`)."""

    config: HybridConfig
    classifier: Any = None
    counts: dict[tuple[str, str], int] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: HybridConfig) -> HybridRouter:
        clf = None
        if config.domain_classifier:
            from smoe.serve.domain import DomainClassifier

            clf = DomainClassifier.load(config.domain_classifier)
            unknown = [d for d in config.smoe_domains if d not in clf.domains]
            if unknown:
                raise ValueError(f"smoe_domains {unknown} are not among the classifier's "
                                 f"domains {list(clf.domains)}")
        if config.policy == "domain" and clf is None:
            raise ValueError("policy='domain' needs a domain classifier")
        return cls(config, clf)

    def decide(self, text: str | None, prompt_ids: Sequence[int]) -> Decision:
        """The decision for a prompt (``text`` None: a prompt given as token ids; ``domain``
        then cannot read it and sends it to the SMoE model, saying so)."""
        c = self.config
        if c.policy == "length":
            n = len(prompt_ids)
            big = n > c.length_threshold
            return Decision("smoe" if big else "dense", "length",
                            f"{n} prompt tokens {'>' if big else '<='} {c.length_threshold}",
                            float(n))
        if c.policy == "domain":
            if text is None:
                return Decision("smoe", "domain", "prompt given as token ids: no text to "
                                "classify", None)
            domain, p = self.classifier.predict(text)
            if p < c.domain_min_prob:
                return Decision("smoe", "domain", f"unsure ({domain} at p={p:.2f} < "
                                f"{c.domain_min_prob})", p)
            target = "smoe" if domain in c.smoe_domains else "dense"
            return Decision(target, "domain", f"{domain} (p={p:.2f})", p)
        return Decision("dense", "cascade", "the dense model answers first", None, final=False)

    def escalate(self, mean_logprob: float) -> Decision:
        """A cascade's second step, from the dense answer's mean token log-probability."""
        t = self.config.cascade_threshold
        if mean_logprob < t:
            return Decision("smoe", "cascade", f"dense answer unsure (mean logprob "
                            f"{mean_logprob:.3f} < {t})", mean_logprob)
        return Decision("dense", "cascade", f"dense answer kept (mean logprob "
                        f"{mean_logprob:.3f} >= {t})", mean_logprob)

    def record(self, decision: Decision) -> None:
        """Count a final decision (the server also increments its Prometheus counter)."""
        key = (decision.policy, decision.target)
        self.counts[key] = self.counts.get(key, 0) + 1


class HybridServing:
    """The second model of a hybrid server: its own engine and engine thread (built like the
    first by :func:`smoe.serve.server.build_state`), the router, and the decision counter in
    its own Prometheus registry (``smoe_hybrid_decisions_total{policy,target}``, appended to
    ``/metrics``)."""

    def __init__(self, dense_state: Any, router: HybridRouter) -> None:
        from prometheus_client import CollectorRegistry, Counter

        self.dense = dense_state
        self.router = router
        self.registry = CollectorRegistry()
        self.decisions = Counter("smoe_hybrid_decisions", "Hybrid routing decisions by "
                                 "policy and target model", ["policy", "target"],
                                 registry=self.registry)
        self.escalations = Counter("smoe_hybrid_cascade_escalations", "Cascade requests the "
                                   "dense model answered and the SMoE model answered again",
                                   registry=self.registry)
        for p in (*POLICIES, "explicit"):  # every series exists from the start (at 0)
            for t in TARGETS:
                self.decisions.labels(p, t)

    @classmethod
    def build(cls, dense: Any, config: Any, router: HybridRouter,
              smoe_name: str | None = None) -> HybridServing:
        """The dense :class:`~smoe.serve.loading.ServedModel` with its own engine and engine
        thread (:func:`~smoe.serve.server.build_state` with the same ``config``)."""
        from smoe.serve.server import build_state

        if smoe_name is not None and dense.name == smoe_name:
            raise ValueError(f"both models are named {smoe_name!r}: give --served-model-name "
                             "or --dense-model-name")
        if dense.name == ROUTED_MODEL:
            raise ValueError(f"{ROUTED_MODEL!r} is the routed model id: name the dense model "
                             "otherwise (--dense-model-name)")
        return cls(build_state(dense, config), router)

    def record(self, decision: Decision) -> None:
        self.router.record(decision)
        self.decisions.labels(decision.policy, decision.target).inc()
        if decision.policy == "cascade" and decision.target == "smoe":
            self.escalations.inc()

    def score(self, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> float:
        return mean_token_logprob(self.dense.served.model, prompt_ids, output_ids)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
