"""``smoe serve``: an OpenAI-compatible HTTP server with continuous batching, Prometheus metrics
and a live routing dashboard (needs the ``serve`` extra: fastapi, uvicorn, prometheus-client).

    from smoe.serve import ServeConfig, load_served_model, build_state, create_app
    state = build_state(load_served_model("runs/demo"), ServeConfig(max_batch=8))
    app = create_app(state)          # run with uvicorn

Hybrid dense + SMoE serving (:mod:`smoe.serve.hybrid`): ``create_app(state,
HybridServing.build(dense_served, config, HybridRouter.from_config(HybridConfig(...))))``.

Importing this package imports none of the extras; :func:`create_app` does.
"""

from smoe.serve.loading import ServedModel, load_served_model
from smoe.serve.server import ServeConfig, ServerState, build_state


def create_app(state, hybrid=None):  # noqa: D103 - documented in smoe.serve.app
    from smoe.serve.app import create_app as _create

    return _create(state, hybrid)


__all__ = ["ServeConfig", "ServerState", "ServedModel", "build_state", "load_served_model",
           "create_app"]
