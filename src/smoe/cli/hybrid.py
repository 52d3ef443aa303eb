"""Hybrid dense + SMoE serving from the command line: ``smoe route-classifier train|predict``
(the domain classifier of ``--route domain``) and the ``smoe serve --dense-model ... --route
...`` flags (added to ``smoe serve``'s parser by :func:`add_hybrid_arguments`)."""

from __future__ import annotations

import argparse
import json

__all__ = ["register_route_classifier", "add_hybrid_arguments", "hybrid_config",
           "build_hybrid"]


def add_hybrid_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("hybrid dense + SMoE routing (MODEL is the SMoE model)")
    g.add_argument("--dense-model", default=None, metavar="DENSE_MODEL",
                   help="a second, dense model served beside MODEL; each request goes to one")
    g.add_argument("--dense-model-name", default=None,
                   help="its id in /v1/models (default: the folder's name)")
    g.add_argument("--route", default=None, choices=("length", "domain", "cascade"),
                   help="policy for requests that name no model: length (long prompts to "
                        "the SMoE model), domain (--domain-classifier), cascade (the dense "
                        "model answers; escalate when it is unsure)")
    g.add_argument("--route-length-threshold", type=int, default=128,
                   help="length: prompts of more tokens go to the SMoE model (default 128)")
    g.add_argument("--domain-classifier", default=None, metavar="FILE",
                   help="domain: a classifier from `smoe route-classifier train`")
    g.add_argument("--smoe-domains", default="code",
                   help="domain: comma-separated domains the SMoE model answers (default code)")
    g.add_argument("--route-min-prob", type=float, default=0.5,
                   help="domain: below this probability of its domain a prompt goes to the "
                        "SMoE model (default 0.5)")
    g.add_argument("--cascade-threshold", type=float, default=-1.5,
                   help="cascade: escalate when the dense answer's mean token log-probability "
                        "is below this (nats, default -1.5)")


def hybrid_config(a: argparse.Namespace):
    """The :class:`~smoe.serve.hybrid.HybridRouter` of the flags (config validated, domain
    classifier loaded: a bad flag fails before any model is loaded), or None without
    --dense-model (ValueError when only one of --dense-model/--route is given)."""
    if a.dense_model is None and a.route is None:
        return None
    if a.dense_model is None or a.route is None:
        raise ValueError("--dense-model and --route go together: give both (e.g. "
                         "--dense-model runs/dense --route length) or neither")
    from smoe.serve.hybrid import HybridConfig, HybridRouter

    domains = tuple(d.strip() for d in a.smoe_domains.split(",") if d.strip())
    return HybridRouter.from_config(HybridConfig(
        policy=a.route, length_threshold=a.route_length_threshold,
        domain_classifier=a.domain_classifier, smoe_domains=domains,
        domain_min_prob=a.route_min_prob, cascade_threshold=a.cascade_threshold))


def build_hybrid(a: argparse.Namespace, router, config, device: str, smoe_name: str):
    """Load the dense model (its own engine and engine thread) beside the SMoE one."""
    from smoe.serve import load_served_model
    from smoe.serve.hybrid import HybridServing

    dense = load_served_model(a.dense_model, device=device, name=a.dense_model_name)
    return HybridServing.build(dense, config, router, smoe_name)


def register_route_classifier(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("route-classifier", help="train or try the domain classifier of "
                                                "`smoe serve --route domain`")
    cmds = p.add_subparsers(dest="route_classifier_command", metavar="SUBCOMMAND",
                            required=True)
    t = cmds.add_parser("train", help="train on a corpus's train split, report held-out "
                                      "accuracy on its validation split, save (safetensors)")
    t.add_argument("--out", required=True, metavar="FILE", help="classifier file to write")
    t.add_argument("--data", action="append", default=[], metavar="PATH",
                   help="files or folders (domain by suffix, see `smoe train --data`); "
                        "default: the default prose/code corpus")
    t.add_argument("--samples", type=int, default=2000, help="train snippets per domain")
    t.add_argument("--val-samples", type=int, default=500, help="held-out snippets per domain")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--force", action="store_true", help="replace an existing --out")

    def train(a: argparse.Namespace) -> int:
        from pathlib import Path

        from smoe.serve.domain import train_domain_classifier

        out = Path(a.out)
        if out.exists() and not a.force:
            raise FileExistsError(f"--out {str(out)!r} exists: pass --force to replace it")
        corpus = None
        if a.data:
            from smoe.data.corpus import load_paths

            corpus = load_paths(a.data)
        clf, report = train_domain_classifier(corpus, samples_per_domain=a.samples,
                                              val_samples_per_domain=a.val_samples,
                                              seed=a.seed)
        clf.save(out)
        per = ", ".join(f"{d} {v:.3f}" for d, v in report["val_accuracy_by_domain"].items())
        print(f"held-out accuracy {report['val_accuracy']:.3f} ({per}) on "
              f"{report['val_samples']} validation snippets; wrote {out}")
        return 0

    t.set_defaults(handler=train)

    q = cmds.add_parser("predict", help="the domain of a text (or of stdin)")
    q.add_argument("classifier", metavar="FILE")
    q.add_argument("text", nargs="?", default=None, help="text (default: read stdin)")

    def predict(a: argparse.Namespace) -> int:
        import sys

        from smoe.serve.domain import DomainClassifier

        clf = DomainClassifier.load(a.classifier)
        text = a.text if a.text is not None else sys.stdin.read()
        p_C = clf.probabilities([text])[0].tolist()
        print(json.dumps({"domain": clf.domains[max(range(len(p_C)), key=p_C.__getitem__)],
                          "probabilities": dict(zip(clf.domains, p_C))}))
        return 0

    q.set_defaults(handler=predict)


REGISTER = (register_route_classifier,)
