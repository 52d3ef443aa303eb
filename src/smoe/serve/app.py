"""HTTP only: the FastAPI app of ``smoe serve`` (OpenAI-compatible endpoints, health, metrics,
dashboard). Request/response shapes live in :mod:`smoe.serve.openai`, the model and engine in
:mod:`smoe.serve.server`.

Statuses: 400 for a request smoe cannot serve (OpenAI-style error body naming the field),
malformed JSON 400, wrong types 422, 401 without the API key, 404 for an unknown model, 429
with Retry-After when the queue is full, 503 while draining, 504 after the request timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from smoe.inference.engine import SamplingParams
from smoe.serve import openai as oa
from smoe.serve.hybrid import ROUTED_MODEL
from smoe.serve.server import ServerState
from smoe.serve.worker import Draining, QueueFull

__all__ = ["create_app"]


def _error(status: int, message: str, **kw: Any) -> JSONResponse:
    headers = kw.pop("headers", None)
    return JSONResponse(oa.error_body(message, **kw), status_code=status, headers=headers)


class _AuthAndCount:
    """The API key on ``/v1/`` and the request counter by endpoint and status, as plain ASGI:
    Starlette's ``@app.middleware("http")`` (BaseHTTPMiddleware) would pass every chunk of a
    streamed answer through one more memory stream and task switch."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        requests, key = self.state.metrics.requests, self.state.config.api_key
        if key is not None:
            sent = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if sent != f"Bearer {key}":
                requests.labels(path, "401").inc()
                await _error(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                             type="authentication_error", code="invalid_api_key")(
                    scope, receive, send)
                return

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


def create_app(state: ServerState, hybrid: Any = None) -> FastAPI:
    """The app serving ``state``'s model; with ``hybrid`` (a
    :class:`smoe.serve.hybrid.HybridServing`) ``state`` is the SMoE model and ``hybrid.dense``
    the dense one, and each request goes to one of them (:func:`_hybrid_route`)."""
    cfg, served = state.config, state.served
    workers = [state.worker] + ([hybrid.dense.worker] if hybrid is not None else [])

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        for w in workers:
            w.start()
        try:
            yield
        finally:  # uvicorn has stopped accepting connections; finish what is running
            await asyncio.gather(*(w.drain(cfg.drain_timeout) for w in workers))
            for w in workers:
                w.stop()

    app = FastAPI(title="smoe serve", lifespan=lifespan)
    app.state.smoe = state

    @app.exception_handler(oa.APIError)
    async def _api_error(request: Request, exc: oa.APIError):
        return _error(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code,
                      headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON: {first.get('msg', '')}",
                          code="invalid_json")
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        return _error(422, f"{param or 'body'}: {first.get('msg', 'invalid value')}",
                      param=param, code="invalid_type")

    app.add_middleware(_AuthAndCount, state=state)

    # -- plain endpoints -------------------------------------------------------------------
    @app.get("/health")
    async def health():
        for w in workers:
            if w.error is not None:
                return _error(503, f"the engine stopped: {w.error}", type="server_error")
        body = {"status": "draining" if state.worker.draining else "ok",
                "running": state.engine.num_running, "waiting": state.engine.num_waiting}
        if hybrid is not None:  # per model, the SMoE one first
            body["models"] = {st.served.name: {"running": st.engine.num_running,
                                               "waiting": st.engine.num_waiting}
                              for st in (state, hybrid.dense)}
        return body

    @app.get("/v1/models")
    async def models():
        names = [served.name] + ([hybrid.dense.served.name, ROUTED_MODEL]
                                 if hybrid is not None else [])
        return {"object": "list", "data": [{"id": n, "object": "model",
                                            "created": int(state.started),
                                            "owned_by": "smoe"} for n in names]}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        body = state.metrics.exposition()
        if hybrid is not None:
            body += hybrid.exposition()
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/dashboard", response_class=HTMLResponse)
    async def dashboard():
        page = resources.files("smoe.serve").joinpath("static/dashboard.html")
        return HTMLResponse(page.read_text(encoding="utf-8"))

    @app.get("/dashboard/data")
    async def dashboard_data():
        return _dashboard_data(state)

    # -- generation ------------------------------------------------------------------------
    def _check_model(name: str | None) -> None:
        known = [served.name] + ([hybrid.dense.served.name, ROUTED_MODEL]
                                 if hybrid is not None else [])
        if name is not None and name not in known:
            raise oa.APIError(404, f"model {name!r} does not exist; this server serves "
                              f"{' and '.join(map(repr, known))}", param="model",
                              code="model_not_found")

    def _params(req: oa._Common, prompt_len: int, st: ServerState = state) -> SamplingParams:
        served = st.served
        if prompt_len == 0:
            raise oa.APIError(400, "the prompt is empty", param="prompt")
        if prompt_len > st.max_prompt_tokens:
            raise oa.APIError(400, f"the prompt is {prompt_len} tokens; this server accepts at "
                              f"most {st.max_prompt_tokens}", param="prompt",
                              code="context_length_exceeded")
        room = st.context - prompt_len
        if req.max_tokens is not None:
            if req.max_tokens > cfg.max_tokens:
                raise oa.APIError(400, f"max_tokens={req.max_tokens} is above this server's "
                                  f"limit of {cfg.max_tokens}", param="max_tokens")
            if req.max_tokens > room:
                raise oa.APIError(400, f"prompt ({prompt_len} tokens) + max_tokens "
                                  f"({req.max_tokens}) exceeds the context of {st.context}",
                                  param="max_tokens", code="context_length_exceeded")
            n = req.max_tokens
        else:
            n = min(cfg.max_tokens, room)
        stops = (served.eos_id,) if served.eos_id is not None else ()
        return SamplingParams(max_tokens=n, temperature=req.temperature, top_p=req.top_p,
                              seed=req.seed, stop_token_ids=stops)

    def _submit(ids: list[int], params: SamplingParams, st: ServerState = state):
        try:
            return st.worker.submit(ids, params)
        except QueueFull as exc:
            raise oa.APIError(429, str(exc), type="rate_limit_error", code="queue_full",
                              headers={"Retry-After": str(cfg.retry_after_s)}) from None
        except Draining as exc:
            raise oa.APIError(503, str(exc), type="server_error", code="draining",
                              headers={"Retry-After": str(cfg.retry_after_s)}) from None
        except ValueError as exc:
            raise oa.APIError(400, str(exc)) from None

    async def _tokens(request: Request, sub, st: ServerState = state):
        """The request's events, with latencies recorded; aborts on disconnect or timeout."""
        deadline = sub.start + cfg.request_timeout
        last = None
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise oa.APIError(504, f"the request took longer than "
                                      f"{cfg.request_timeout:g} s", type="timeout",
                                      code="timeout")
                try:  # a token already there costs no wait_for (which makes a task)
                    ev = sub.events.get_nowait()
                except asyncio.QueueEmpty:
                    try:
                        ev = await asyncio.wait_for(sub.events.get(), min(remaining, 1.0))
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            return
                        continue
                now = time.monotonic()
                if ev.token_id is not None:
                    state.metrics.observe("ttft" if last is None else "itl",
                                          now - (sub.start if last is None else last))
                    state.metrics.gen_tokens.inc()
                    last = now
                if ev.finish_reason == "error":
                    raise oa.APIError(500, "the engine failed", type="server_error")
                yield ev
                if ev.finished:
                    state.metrics.observe("e2e", now - sub.start)
                    return
        finally:
            st.worker.abort(sub.request_id)  # a no-op once finished

    async def _run(request: Request, req: oa._Common, ids: list[int], chat: bool,
                   text: str | None = None):
        _check_model(req.model)
        req.check_supported()
        stops = req.stop_strings()
        st = state
        if hybrid is not None:
            st, ids, answer = await _hybrid_route(hybrid, state, req, ids, text, stops,
                                                  _params, _submit, _tokens, request)
            if answer is not None:  # a cascade kept the dense model's answer
                return _hybrid_answer(answer, req, chat)
        served = st.served
        params = _params(req, len(ids), st)
        sub = _submit(ids, params, st)
        state.metrics.prompt_tokens.inc(len(ids))
        rid = oa.new_id("chatcmpl" if chat else "cmpl")
        tracker = oa.TextTracker(served.decode, stops, params.stop_token_ids)
        if req.stream:
            return StreamingResponse(_stream(request, sub, rid, tracker, req, chat, st),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text, finish, n = [], "length", 0
        events = _tokens(request, sub, st)
        try:
            async for ev in events:
                n += ev.token_id is not None
                text.append(tracker.add(ev.token_id, ev.finished))
                if ev.finished:
                    finish = "stop" if ev.finish_reason == "stop" else "length"
                if tracker.stopped:
                    finish = "stop"
                    break
        finally:
            await events.aclose()  # frees the slot at once when a stop string ended it
        if request is not None and await request.is_disconnected():
            return Response(status_code=499)
        usage = oa.usage_body(len(ids), n)
        body = (oa.chat_body if chat else oa.completion_body)(rid, served.name, "".join(text),
                                                              finish, usage)
        return JSONResponse(body)

    async def _stream(request, sub, rid, tracker, req, chat, st: ServerState = state):
        served = st.served
        def sse(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        n = 0
        finish = None
        events = _tokens(request, sub, st)
        try:
            if chat:
                yield sse(oa.chat_chunk(rid, served.name, {"role": "assistant", "content": ""},
                                        None))
            async for ev in events:
                n += ev.token_id is not None
                delta = tracker.add(ev.token_id, ev.finished)
                if ev.finished or tracker.stopped:
                    finish = "stop" if (ev.finish_reason == "stop" or tracker.stopped) \
                        else "length"
                if delta or finish:
                    if chat:
                        yield sse(oa.chat_chunk(rid, served.name,
                                                {"content": delta} if delta else {}, finish))
                    else:
                        yield sse(oa.completion_chunk(rid, served.name, delta, finish))
                if finish:
                    break
        except oa.APIError as exc:
            yield sse(oa.error_body(exc.message, type=exc.type, code=exc.code))
        finally:
            await events.aclose()
        if req.include_usage:
            usage = oa.usage_body(sub.prompt_tokens, n)
            chunk = oa.chat_chunk if chat else oa.completion_chunk
            yield sse(chunk(rid, served.name, {} if chat else "", None, usage, choices=False))
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(request: Request, req: oa.CompletionRequest):
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0] if len(prompt) == 1 else prompt
        if isinstance(prompt, str):
            ids = served.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        req.check_supported()
        return await _run(request, req, ids, chat=False,
                          text=prompt if isinstance(prompt, str) else None)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, req: oa.ChatRequest):
        if served.chat_prompt is None:
            raise oa.APIError(400, f"model {served.name!r} has no chat template: use "
                              "/v1/completions with a plain prompt", param="messages",
                              code="no_chat_template")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        prompt_text = served.chat_prompt(messages)
        return await _run(request, req, served.encode(prompt_text), chat=True, text=prompt_text)

    return app


def _dashboard_data(state: ServerState) -> dict[str, Any]:
    """What the dashboard polls: the recent L x E load, imbalance and drift per window,
    alerts, latency percentiles, queue depth, batch size, throughput."""
    m = state.monitor
    data: dict[str, Any] = {
        "model": state.served.name, "time": time.time(),
        "running": state.engine.num_running, "waiting": state.engine.num_waiting,
        "tokens_per_second": state.worker.tokens_per_second(),
        "generated_tokens": state.worker.generated_tokens,
        "latency": state.metrics.percentiles(), "layers": [], "experts": 0, "heat": [],
        "windows": [], "alerts": []}
    if m is None:
        return data
    from smoe.monitor import stats

    open_LE = m.window_counts().cpu()
    recent = open_LE if int(open_LE.sum()) or not m.windows else m.windows[-1].counts_LE
    data.update(layers=list(m.layer_names), experts=m.num_experts,
                heat=stats.shares(recent).tolist(), counts=recent.tolist(),
                total_tokens=m.total_tokens)
    data["windows"] = [{"index": w.index, "time": w.closed_at, "tokens": w.tokens,
                        "imbalance": sum(w.summary.imbalance) / len(w.summary.imbalance),
                        "drift": sum(w.drift_L) / len(w.drift_L)}
                       for w in list(m.windows)[-120:]]
    data["alerts"] = [a.as_dict() for a in m.alerts[-50:]]
    return data


# -- hybrid dense + SMoE routing (smoe serve --dense-model ... --route ...) ----------------------
async def _hybrid_route(hybrid: Any, state: ServerState, req: oa._Common, ids: list[int],
                        text: str | None, stops: list[str], params_fn, submit_fn, tokens_fn,
                        request: Request):
    """Which model answers: ``(its state, the prompt ids for it, a kept answer or None)``. A
    request naming a model goes to it; otherwise the policy decides. A cascade runs the dense
    model here, scores its answer and either keeps it (returned as a dict) or escalates."""
    from smoe.serve.hybrid import Decision

    dense = hybrid.dense

    def ids_for(st: ServerState) -> list[int]:  # each model reads text with its own tokenizer
        return st.served.encode(text) if text is not None and st is dense else ids

    if req.model is not None and req.model != ROUTED_MODEL:
        target = "dense" if req.model == dense.served.name else "smoe"
        decision = Decision(target, "explicit", f"the request named {req.model!r}")
    else:
        decision = hybrid.router.decide(text, ids)
    if decision.final:
        hybrid.record(decision)
        st = dense if decision.target == "dense" else state
        return st, ids_for(st), None
    d_ids = ids_for(dense)
    params = params_fn(req, len(d_ids), dense)
    sub = submit_fn(d_ids, params, dense)
    state.metrics.prompt_tokens.inc(len(d_ids))
    tracker = oa.TextTracker(dense.served.decode, stops, params.stop_token_ids)
    out_ids: list[int] = []
    parts: list[str] = []
    finish, n = "length", 0
    events = tokens_fn(request, sub, dense)
    try:
        async for ev in events:
            n += ev.token_id is not None
            if ev.token_id is not None and ev.token_id not in params.stop_token_ids:
                out_ids.append(ev.token_id)
            parts.append(tracker.add(ev.token_id, ev.finished))
            if ev.finished:
                finish = "stop" if ev.finish_reason == "stop" else "length"
            if tracker.stopped:
                finish = "stop"
                break
    finally:
        await events.aclose()
    score = await asyncio.to_thread(hybrid.score, d_ids, out_ids)
    decision = hybrid.router.escalate(score)
    hybrid.record(decision)
    if decision.target == "dense":
        return dense, d_ids, {"model": dense.served.name, "text": "".join(parts),
                              "finish": finish, "usage": oa.usage_body(len(d_ids), n)}
    return state, ids, None


def _hybrid_answer(answer: dict[str, Any], req: oa._Common, chat: bool) -> Response:
    """A cascade's kept dense answer, as a body or (``stream``) as one content chunk."""
    rid = oa.new_id("chatcmpl" if chat else "cmpl")
    model, text, finish, usage = answer["model"], answer["text"], answer["finish"], \
        answer["usage"]
    if not req.stream:
        return JSONResponse((oa.chat_body if chat else oa.completion_body)(rid, model, text,
                                                                           finish, usage))

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    def chunks():
        if chat:
            yield sse(oa.chat_chunk(rid, model, {"role": "assistant", "content": ""}, None))
            yield sse(oa.chat_chunk(rid, model, {"content": text} if text else {}, finish))
        else:
            yield sse(oa.completion_chunk(rid, model, text, finish))
        if req.include_usage:
            chunk = oa.chat_chunk if chat else oa.completion_chunk
            yield sse(chunk(rid, model, {} if chat else "", None, usage, choices=False))
        yield "data: [DONE]\n\n"

    return StreamingResponse(chunks(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
