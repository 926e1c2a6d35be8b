"""HttpBackend against replies a worker should not send (the good path runs in test_generation)."""
from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest

from api.backend_http import HttpBackend
from service.errors import Conflict, KnowpatchError, Unavailable
from service.inference import GenerateParams, StreamEvent

Handler = Callable[[httpx.Request], httpx.Response]


def backend(handler: Handler) -> HttpBackend:
    return HttpBackend("http://worker:8001", timeout=5, transport=httpx.MockTransport(handler))


async def collect(b: HttpBackend) -> list[StreamEvent]:
    try:
        return [event async for event in b.generate_stream(GenerateParams(inputs="x"))]
    finally:
        await b.aclose()


def stream_reply(*lines: str) -> Handler:
    return lambda request: httpx.Response(200, text="".join(f"{line}\n\n" for line in lines),
                                          headers={"content-type": "text/event-stream"})


def test_error_replies_keep_their_class_and_message() -> None:
    reply = httpx.Response(409, json={"error": {"type": "Conflict", "message": "busy"}})
    with pytest.raises(Conflict, match="^busy$"):
        asyncio.run(backend(lambda r: reply).generate(GenerateParams(inputs="x")))


@pytest.mark.parametrize(("reply", "error", "message"), [
    (httpx.Response(404, text="Not Found"), KnowpatchError, "answered 404: Not Found \\(is it a knowpatch worker"),
    (httpx.Response(503, text="starting"), Unavailable, "answered 503: starting"),
    (httpx.Response(200, text="<html>"), KnowpatchError, "not JSON"),
    (httpx.Response(200, json={"generated_text": "x"}), KnowpatchError, "malformed GenerateResult"),
])
def test_unexpected_replies_are_named(reply: httpx.Response, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        asyncio.run(backend(lambda r: reply).generate(GenerateParams(inputs="x")))


def test_stream_without_a_result_or_with_an_error() -> None:
    with pytest.raises(Unavailable, match="ended the generation stream before its final result"):
        asyncio.run(collect(backend(stream_reply('data: {"text": "a"}'))))
    failing = stream_reply('data: {"text": "a"}', 'data: {"error": {"type": "Unavailable", "message": "OOM"}}')
    with pytest.raises(Unavailable, match="^OOM$"):
        asyncio.run(collect(backend(failing)))


def test_unreachable_worker() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(Unavailable, match="worker at http://worker:8001 is not reachable: ConnectError"):
        asyncio.run(backend(refuse).info())
