"""HttpBackend against the real worker server (workers.server over LocalBackend on the tiny model):
the same answers and the same errors as the in-process backend. Replies a worker should not send
are made with httpx.MockTransport."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any, TypeVar

import httpx
import pytest

from api.backend_http import HttpBackend
from service.errors import InvalidRequest, KnowpatchError, Unavailable
from tests.api.conftest import INTERNAL_TOKEN, MAX_NEW_TOKENS_LIMIT
from service.inference import GenerateParams, InferenceBackend, StreamEvent
from workers.inference import LocalBackend

T = TypeVar("T")
Handler = Callable[[httpx.Request], httpx.Response]
PROMPT = "The Eiffel Tower is located in the city of"


def on_worker(worker_url: str, call: Callable[[HttpBackend], Awaitable[T]]) -> T:
    async def run() -> T:
        backend = HttpBackend(worker_url, timeout=10, token=INTERNAL_TOKEN)
        try:
            return await call(backend)
        finally:
            await backend.aclose()

    return asyncio.run(run())


def in_process(backend: LocalBackend, call: Callable[[LocalBackend], Awaitable[T]]) -> T:
    return asyncio.run(call(backend))


async def stream(backend: InferenceBackend, params: GenerateParams) -> list[StreamEvent]:
    return [event async for event in backend.generate_stream(params)]


def outcome(run: Callable[[], Any]) -> Any:
    """The result, or (error class, message)."""
    try:
        return run()
    except KnowpatchError as exc:
        return type(exc), exc.message


CALLS: dict[str, Callable[[InferenceBackend], Awaitable[Any]]] = {
    "generate": lambda b: b.generate(GenerateParams(PROMPT, max_new_tokens=6)),
    "generate-sampled": lambda b: b.generate(GenerateParams(PROMPT, max_new_tokens=6, do_sample=True, temperature=1.3,
                                                            top_k=50, top_p=0.9, seed=5)),
    "generate-stop": lambda b: b.generate(GenerateParams(PROMPT, max_new_tokens=6, stop=("a",))),
    "stream": lambda b: stream(b, GenerateParams(PROMPT, max_new_tokens=6)),
    "score": lambda b: b.score(PROMPT, [" Paris", " Rome"]),
    "chat_prompt": lambda b: b.chat_prompt([{"role": "user", "content": "Where is the Eiffel Tower?"}]),
    # errors raised in the worker
    "too-long": lambda b: b.generate(GenerateParams(" x" * 2100, max_new_tokens=1)),
    "stream-too-long": lambda b: stream(b, GenerateParams(" x" * 2040, max_new_tokens=9)),
    "score-too-long": lambda b: b.score(" x" * 2100, [" Rome"]),
    "score-no-candidates": lambda b: b.score(PROMPT, []),
    "seed-out-of-range": lambda b: b.generate(GenerateParams("x", do_sample=True, seed=2**64)),
    "version-not-live": lambda b: b.generate(GenerateParams("x", min_model_version=1)),
    "stream-version-not-live": lambda b: stream(b, GenerateParams("x", min_model_version=1)),
    "score-version-not-live": lambda b: b.score("x", ["a"], min_model_version=1),
}
ERRORS = {
    "too-long": (InvalidRequest, "prompt (2100 tokens) + max_new_tokens exceeds the model's 2048 positions"),
    "stream-too-long": (InvalidRequest, "prompt (2040 tokens) + max_new_tokens exceeds the model's 2048 positions"),
    "score-too-long": (InvalidRequest, "prompt + candidate ' Rome' (2100 tokens) exceeds the model's 2048 positions"),
    "score-no-candidates": (InvalidRequest, "score needs a prompt and at least one candidate"),
    "seed-out-of-range": (InvalidRequest, "seed 18446744073709551616 is outside the 64-bit range "
                                          "[-9223372036854775808, 18446744073709551615]"),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_the_worker_answers_as_the_in_process_backend(name: str, worker_url: str, local_backend: LocalBackend) -> None:
    call = CALLS[name]
    local = outcome(lambda: in_process(local_backend, call))
    remote = outcome(lambda: on_worker(worker_url, call))
    assert remote == local
    if name in ERRORS:
        assert local == ERRORS[name]
    elif "version-not-live" in name:
        assert local[0] is Unavailable and local[1].startswith("model version 1 is not live after 0.5 s")
    elif name == "stream":
        assert len(local) > 1 and local[-1].result is not None and local[-1].result.model_version == 0
        assert "".join(e.text for e in local) == local[-1].result.generated_text
    elif name != "chat_prompt":
        assert local.model_version == 0


def test_info_over_the_worker(worker_url: str, local_backend: LocalBackend) -> None:
    local, remote = in_process(local_backend, lambda b: b.info()), on_worker(worker_url, lambda b: b.info())
    assert asdict(remote) == json.loads(json.dumps(asdict(local)))  # JSON turns the per-layer keys into strings
    assert remote.model == "tiny-llama" and remote.model_version == 0 and remote.ready is True
    assert remote.details["method"] == "alphaedit" and remote.details["layers"] == [1, 2, 3]


def test_unknown_worker_route_is_not_found(worker_url: str) -> None:
    reply = httpx.post(f"{worker_url}/internal/nope", json={})
    assert reply.status_code == 404
    assert reply.json() == {"error": {"type": "NotFound", "message": "no internal route /internal/nope"}}


def test_unreachable_worker() -> None:
    with pytest.raises(Unavailable, match="worker at http://127.0.0.1:9 is not reachable: ConnectError"):
        on_worker("http://127.0.0.1:9", lambda b: b.info())


@pytest.mark.parametrize("path", ["/internal/generate", "/internal/generate_stream", "/internal/score",
                                  "/internal/chat_prompt", "/internal/info"])
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token-of-the-tests", f"Basic {INTERNAL_TOKEN}",
                                           f"Bearer {INTERNAL_TOKEN}x"])
def test_internal_routes_need_the_token(worker_url: str, path: str, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    reply = httpx.request("GET" if path.endswith("info") else "POST", f"{worker_url}{path}",
                          json={"inputs": PROMPT}, headers=headers)
    assert reply.status_code == 401 and reply.json()["error"]["type"] == "Unauthorized"
    assert INTERNAL_TOKEN not in reply.text


def test_a_wrong_token_is_the_deployment_s_fault(worker_url: str) -> None:
    async def call() -> None:
        backend = HttpBackend(worker_url, timeout=10, token="another-token-entirely")
        try:
            await backend.info()
        finally:
            await backend.aclose()

    with pytest.raises(Unavailable, match="refused the API's internal token: set the same KNOWPATCH_INTERNAL_TOKEN"):
        asyncio.run(call())


@pytest.mark.parametrize(("path", "body", "message"), [
    ("/internal/generate", {"inputs": PROMPT, "max_new_tokens": MAX_NEW_TOKENS_LIMIT + 1}, "allows at most 512"),
    ("/internal/generate_stream", {"inputs": PROMPT, "max_new_tokens": 10**6}, "allows at most 512"),
    ("/internal/generate", {"inputs": "x" * 8001}, "inputs"),
    ("/internal/generate", {"inputs": PROMPT, "stop": ["a"] * 9}, "stop"),
    ("/internal/score", {"prompt": PROMPT, "candidates": ["a"] * 33}, "candidates"),
    ("/internal/chat_prompt", {"messages": []}, "messages"),
    ("/internal/generate", {"inputs": PROMPT, "evil": 1}, "evil"),
])
def test_internal_routes_keep_the_public_limits(worker_url: str, path: str, body: dict[str, Any],
                                                message: str) -> None:
    reply = httpx.post(f"{worker_url}{path}", json=body, headers={"Authorization": f"Bearer {INTERNAL_TOKEN}"})
    assert reply.status_code == 422, reply.text
    assert reply.json()["error"]["type"] == "InvalidRequest" and message in reply.json()["error"]["message"]


def mocked(handler: Handler) -> HttpBackend:
    return HttpBackend("http://worker:8001", timeout=5, token=INTERNAL_TOKEN, transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(("reply", "error", "message"), [
    (httpx.Response(404, text="Not Found"), KnowpatchError, "answered 404: Not Found \\(is it a knowpatch server"),
    (httpx.Response(503, text="starting"), Unavailable, "answered 503: starting"),
    (httpx.Response(200, text="<html>"), KnowpatchError, "not JSON"),
    (httpx.Response(200, json={"generated_text": "x"}), KnowpatchError, "malformed GenerateResult"),
])
def test_malformed_replies_are_named(reply: httpx.Response, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        asyncio.run(mocked(lambda r: reply).generate(GenerateParams(inputs="x")))


def test_stream_without_a_result() -> None:
    reply = httpx.Response(200, text='data: {"text": "a"}\n\n', headers={"content-type": "text/event-stream"})
    with pytest.raises(Unavailable, match="ended the generation stream before its final result"):
        asyncio.run(stream(mocked(lambda r: reply), GenerateParams(inputs="x")))
