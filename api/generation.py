"""Serving logic of the generation routes: parameters, timing, and server-sent event streams.

A stream's first event is awaited before the response starts, so a failure before any output
(bad parameters, min_model_version not reached) is an ordinary HTTP error; a failure after it is
sent as a final `data: {"error": ...}` event.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi.responses import StreamingResponse

from api.errors import error_body
from api.metrics import ApiMetrics
from api.schemas.generation import DEFAULT_MAX_NEW_TOKENS, GenerateIn, GenerateOut
from api.schemas.openai import Usage, chunk, finish_reason, new_id, now
from service.errors import InvalidRequest, KnowpatchError, Unavailable
from service.inference import GenerateParams, GenerateResult, InferenceBackend, StreamEvent

log = logging.getLogger(__name__)
Payload = dict[str, Any]
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def check_max_tokens(value: int, limit: int, name: str) -> int:
    if value > limit:
        raise InvalidRequest(f"{name} is {value}; this server allows at most {limit} "
                             "(KNOWPATCH_MAX_NEW_TOKENS_LIMIT)")
    return value


def tgi_params(body: GenerateIn, limit: int) -> GenerateParams:
    p = body.parameters
    if p.max_new_tokens is None:  # the default, clamped: a lower limit is no fault of the caller
        max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, limit)
    else:
        max_new_tokens = check_max_tokens(p.max_new_tokens, limit, "parameters.max_new_tokens")
    return GenerateParams(
        inputs=body.inputs, max_new_tokens=max_new_tokens,
        temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, do_sample=p.do_sample, seed=p.seed,
        stop=tuple(p.stop), min_model_version=body.min_model_version)


async def generate(backend: InferenceBackend, params: GenerateParams, metrics: ApiMetrics,
                   endpoint: str) -> GenerateResult:
    started = time.perf_counter()
    result = await backend.generate(params)
    metrics.observe_generation(endpoint, time.perf_counter() - started, result.generated_tokens)
    return result


class StreamFormat(Protocol):
    done_marker: bool  # OpenAI streams end with `data: [DONE]`

    def opening(self) -> list[Payload]: ...

    def token(self, text: str) -> list[Payload]: ...

    def final(self, result: GenerateResult) -> list[Payload]: ...


class TgiFormat:
    """/generate_stream: one event per token, then the whole answer."""

    done_marker = False

    def opening(self) -> list[Payload]:
        return []

    def token(self, text: str) -> list[Payload]:
        return [{"token": {"text": text}}]

    def final(self, result: GenerateResult) -> list[Payload]:
        return [GenerateOut.of(result).model_dump()]


@dataclass
class OpenAIFormat:
    """text_completion or chat.completion.chunk events; the last carries usage and model_version."""

    model: str
    chat: bool
    id: str = ""
    created: int = field(default_factory=now)
    done_marker = True  # a class attribute (no annotation), as StreamFormat asks

    def __post_init__(self) -> None:
        self.id = self.id or new_id("chatcmpl" if self.chat else "cmpl")

    def _chunk(self, delta: Payload | str, finish: str | None = None) -> Payload:
        return chunk(self.id, self.created, self.model, self.chat, delta, finish)

    def opening(self) -> list[Payload]:
        return [self._chunk({"role": "assistant", "content": ""})] if self.chat else []

    def token(self, text: str) -> list[Payload]:
        return [self._chunk({"content": text} if self.chat else text)]

    def final(self, result: GenerateResult) -> list[Payload]:
        last = self._chunk({} if self.chat else "", finish_reason(result))
        return [{**last, "usage": Usage.of(result).model_dump(), "model_version": result.model_version}]


def sse(payload: Payload | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def _first_then_rest(first: StreamEvent, rest: AsyncIterator[StreamEvent]) -> AsyncIterator[StreamEvent]:
    try:
        yield first
        async for event in rest:
            yield event
    finally:
        await _close(rest)


async def open_stream(backend: InferenceBackend, params: GenerateParams) -> AsyncIterator[StreamEvent]:
    """The backend's stream, with its first event already received (see the module docstring)."""
    events = aiter(backend.generate_stream(params))
    try:
        first = await anext(events)
    except StopAsyncIteration:
        raise Unavailable("the inference backend ended the stream without any output") from None
    return _first_then_rest(first, events)


async def _encode(events: AsyncIterator[StreamEvent], fmt: StreamFormat,
                  on_result: Callable[[GenerateResult], None]) -> AsyncIterator[str]:
    try:
        async for chunk_text in _encode_events(events, fmt, on_result):
            yield chunk_text
    finally:
        await _close(events)  # also when the client went away mid-stream


async def _close(events: AsyncIterator[StreamEvent]) -> None:
    close = getattr(events, "aclose", None)
    if close is not None:
        await close()


async def _encode_events(events: AsyncIterator[StreamEvent], fmt: StreamFormat,
                         on_result: Callable[[GenerateResult], None]) -> AsyncIterator[str]:
    for payload in fmt.opening():
        yield sse(payload)
    try:
        async for event in events:
            if event.result is not None:
                on_result(event.result)
                for payload in fmt.final(event.result):
                    yield sse(payload)
                break
            if event.text:
                for payload in fmt.token(event.text):
                    yield sse(payload)
        else:
            raise Unavailable("the inference backend ended the stream before its final result")
    except KnowpatchError as exc:
        log.warning("generation stream failed after it started: %s", exc.message)
        yield sse(error_body(type(exc).__name__, exc.message))
        return
    if fmt.done_marker:
        yield sse("[DONE]")


async def stream(backend: InferenceBackend, params: GenerateParams, fmt: StreamFormat, metrics: ApiMetrics,
                 endpoint: str) -> StreamingResponse:
    started = time.perf_counter()
    events = await open_stream(backend, params)

    def on_result(result: GenerateResult) -> None:
        metrics.observe_generation(endpoint, time.perf_counter() - started, result.generated_tokens)

    return StreamingResponse(_encode(events, fmt, on_result), media_type="text/event-stream", headers=SSE_HEADERS)
