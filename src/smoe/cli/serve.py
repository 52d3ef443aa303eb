"""`smoe serve MODEL`: the OpenAI-compatible server (parses flags, then calls smoe.serve)."""

from __future__ import annotations

import argparse

from smoe.cli.options import add_offload_options

__all__ = ["register_serve"]


def register_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a run or a local Hugging Face folder over an "
                                     "OpenAI-compatible HTTP API, with continuous batching, "
                                     "/metrics and a live /dashboard")
    p.add_argument("model", metavar="MODEL", help="an smoe run folder (float or quantized by "
                                                  "`smoe quantize`) or a local HF folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="model id in /v1/models (default: the folder's name)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: none)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-prefill-tokens", type=int, default=512,
                   help="prompt tokens prefilled per engine step, packed in one forward "
                        "(more: lower time to first token under bursts, longer gaps "
                        "between the running streams' tokens; default 512)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting beyond --max-batch; more get 429 (default 64)")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="largest max_tokens a request may ask for (default 256)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt (default: the context minus one)")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds (504 after)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds a shutdown waits for running requests (default 30)")
    p.add_argument("--metrics-detail", choices=("expert", "summary"), default="expert",
                   help="per-expert series, or per-layer summaries only (many experts)")
    p.add_argument("--monitor-window-tokens", type=int, default=512)
    p.add_argument("--routing-reference", default=None,
                   help="routing reference for drift (from `smoe monitor --save-reference`)")
    p.add_argument("--force-dropless", action="store_true",
                   help="serve a capacity-factor model dropless (else it is refused)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    add_offload_options(p)
    from smoe.cli.hybrid import add_hybrid_arguments

    add_hybrid_arguments(p)

    def run(a: argparse.Namespace) -> int:
        import torch

        from smoe.serve import ServeConfig, build_state, create_app, load_served_model

        from smoe.cli.hybrid import hybrid_config

        route = hybrid_config(a)  # validated before anything is loaded
        if not 0 <= a.port < 65536:
            raise ValueError(f"--port {a.port} must be in [0, 65535]")
        if a.offload is not None and not 0 < a.offload <= 1:
            raise ValueError(f"--offload {a.offload} must be a fraction in (0, 1]")
        config = ServeConfig(max_batch=a.max_batch, max_queue=a.max_queue,
                             max_prefill_tokens=a.max_prefill_tokens,
                             max_tokens=a.max_tokens, max_prompt_tokens=a.max_prompt_tokens,
                             api_key=a.api_key, request_timeout=a.request_timeout,
                             drain_timeout=a.drain_timeout, metrics_detail=a.metrics_detail,
                             monitor_window_tokens=a.monitor_window_tokens,
                             routing_reference=a.routing_reference,
                             force_dropless=a.force_dropless)
        if a.threads:
            torch.set_num_threads(a.threads)
        device = a.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        import uvicorn

        served = load_served_model(a.model, device=device, name=a.served_model_name,
                                   offload=a.offload, offload_policy=a.offload_policy,
                                   offload_store=a.offload_store)
        try:
            state = build_state(served, config)
            if route is None:
                app = create_app(state)
            else:
                from smoe.cli.hybrid import build_hybrid

                app = create_app(state, build_hybrid(a, route, config, device, served.name))
            off = served.offloader
            extra = "" if off is None else (
                f"; experts offloaded ({a.offload_policy}, {off.capacity} of "
                f"{off.total_bytes // off.expert_bytes} in memory)")
            print(f"smoe serve: {served.name} on http://{a.host}:{a.port} "
                  f"(dashboard /dashboard, metrics /metrics){extra}", flush=True)
            uvicorn.run(app, host=a.host, port=a.port, log_level="warning",
                        timeout_graceful_shutdown=int(a.drain_timeout) + 1)
        finally:
            if served.offloader is not None:
                served.offloader.close()
        return 0

    p.set_defaults(handler=run)


REGISTER = (register_serve,)
