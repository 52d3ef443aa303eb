"""The OpenAI API's shapes: request validation, response and stream-chunk bodies, error bodies,
and the text side of generation (stop strings, incremental detokenization).

Only what smoe serves is accepted: a field smoe cannot honour (``n > 1``, ``logprobs``,
``echo``, penalties, tools) is refused with a 400 naming it rather than silently ignored.
Reference: the OpenAI API reference for ``/v1/completions`` and ``/v1/chat/completions``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["CompletionRequest", "ChatRequest", "ChatMessage", "APIError", "error_body",
           "TextTracker", "completion_body", "chat_body", "completion_chunk", "chat_chunk",
           "usage_body", "new_id"]


class APIError(Exception):
    """An error the client caused (or a limit it hit), with its HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type, self.code, self.headers = type, code, headers or {}


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}`` as the OpenAI API returns."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Any = None

    def check_supported(self) -> None:
        if self.n != 1:
            raise APIError(400, f"n={self.n} is not supported: smoe returns one choice per "
                           "request; send n separate requests", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported by smoe serve (only 0)",
                               param=name)
        if self.logprobs not in (None, False, 0):
            raise APIError(400, "logprobs is not supported by smoe serve", param="logprobs")
        extra = sorted((self.model_extra or {}).keys())
        unsupported = [k for k in extra if k in {"tools", "tool_choice", "functions",
                                                 "logit_bias", "best_of", "suffix",
                                                 "response_format", "top_logprobs"}]
        if unsupported:
            raise APIError(400, f"{unsupported[0]} is not supported by smoe serve",
                           param=unsupported[0])

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, "stop takes at most 4 sequences", param="stop")
        if any(s == "" for s in stops):
            raise APIError(400, "stop sequences must not be empty", param="stop")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str]
    echo: bool = False

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise APIError(400, "echo is not supported by smoe serve", param="echo")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise APIError(400, "a batch of prompts is not supported: send one prompt per "
                               "request", param="prompt")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = []
            for p in self.content:
                if p.get("type") != "text":
                    raise APIError(400, f"message content of type {p.get('type')!r} is not "
                                   "supported (text only)", param="messages")
                parts.append(str(p.get("text", "")))
            return "".join(parts)
        return self.content or ""


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class TextTracker:
    """Turns a request's token ids into text deltas: decodes the whole output each time (byte-
    level BPE pieces and multi-byte characters only read right once complete), holds back a
    trailing replacement character and any tail that could still become a stop string, and
    cuts the text at the first stop string."""

    def __init__(self, decode, stop: list[str], stop_token_ids: tuple[int, ...] = ()) -> None:
        self.decode, self.stop, self.stop_ids = decode, stop, set(stop_token_ids)
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False
        self._hold = max((len(s) for s in stop), default=1) - 1

    def add(self, token_id: int | None, finished: bool) -> str:
        """The new text this token makes safe to send (all that is left when ``finished``)."""
        if token_id is not None and token_id not in self.stop_ids:
            self.ids.append(token_id)
        text = self.decode(self.ids)
        for s in self.stop:
            i = text.find(s)
            if i != -1:
                text, self.stopped, finished = text[:i], True, True
        if finished:
            end = len(text)
        else:
            end = len(text) - self._hold
            while end > 0 and text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.sent:
            return ""
        delta, self.sent = text[self.sent:end], end
        return delta


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, text: str, finish: str, usage: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "text": text, "logprobs": None,
                                         "finish_reason": finish}], "usage": usage}


def completion_chunk(rid: str, model: str, text: str, finish: str | None,
                     usage: dict | None = None, choices: bool = True) -> dict:
    body: dict[str, Any] = {"id": rid, "object": "text_completion",
                            "created": int(time.time()), "model": model,
                            "choices": [{"index": 0, "text": text, "logprobs": None,
                                         "finish_reason": finish}] if choices else []}
    if usage is not None:
        body["usage"] = usage
    return body


def chat_body(rid: str, model: str, text: str, finish: str, usage: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "message": {"role": "assistant",
                                                                 "content": text},
                                         "logprobs": None, "finish_reason": finish}],
            "usage": usage}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None,
               usage: dict | None = None, choices: bool = True) -> dict:
    body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk",
                            "created": int(time.time()), "model": model,
                            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish}] if choices else []}
    if usage is not None:
        body["usage"] = usage
    return body
