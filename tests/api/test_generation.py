"""Generation routes: 503 without a backend; with a fake model behind the worker's HTTP wire format
(api.backend_http.HttpBackend -> fake worker), the TGI, score and OpenAI shapes and streams."""
from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from api.backend_http import HttpBackend
from tests.api.conftest import Api, ApiRunner, serve
from tests.api.fakes import FakeBackend, worker_app

GENERATION_ROUTES = [
    ("POST", "/generate", {"inputs": "hi"}), ("POST", "/generate_stream", {"inputs": "hi"}),
    ("POST", "/score", {"prompt": "hi", "candidates": ["a"]}), ("POST", "/v1/completions", {"prompt": "hi"}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}), ("GET", "/v1/models", None),
]


@pytest.fixture(scope="module")
def worker_url() -> Iterator[str]:
    with serve(worker_app(FakeBackend(model_version=7))) as url:
        yield url


@pytest.fixture(scope="module")
def api(module_runner: ApiRunner, worker_url: str) -> Api:
    backend = HttpBackend(worker_url, timeout=10)
    return module_runner.start(backend=backend, lifespan_hooks=[backend.lifespan], max_new_tokens_limit=64)


def sse_data(reply: httpx.Response) -> list[object]:
    assert reply.headers["content-type"].startswith("text/event-stream")
    lines = [line[len("data: "):] for line in reply.text.splitlines() if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def api_without_backend(module_runner: ApiRunner) -> Api:
    return module_runner.start()


@pytest.mark.parametrize(("method", "path", "body"), GENERATION_ROUTES)
def test_without_a_backend_generation_is_503(api_without_backend: Api, method: str, path: str, body: object) -> None:
    reply = api_without_backend.client.request(method, path, json=body)
    assert reply.status_code == 503
    assert reply.json()["error"]["type"] == "Unavailable"
    assert "no inference backend configured" in reply.json()["error"]["message"]


def test_generate(api: Api) -> None:
    reply = api.client.post("/generate", json={"inputs": "The Eiffel Tower is in", "parameters": {"max_new_tokens": 2}})
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"generated_text": " Rome,", "details": {"finish_reason": "length", "generated_tokens": 2},
                            "model_version": 7}
    assert reply.headers["X-Model-Version"] == "7"


def test_generate_streams(api: Api) -> None:
    for path, extra in (("/generate_stream", {}), ("/generate", {"stream": True})):
        events = sse_data(api.client.post(path, json={"inputs": "The Eiffel Tower is in", **extra}))
        assert events[:3] == [{"token": {"text": " Rome"}}, {"token": {"text": ","}}, {"token": {"text": " Italy"}}]
        assert events[3] == {"generated_text": " Rome, Italy", "model_version": 7,
                             "details": {"finish_reason": "eos", "generated_tokens": 3}}


def test_score(api: Api) -> None:
    reply = api.client.post("/score", json={"prompt": "The Eiffel Tower is in", "candidates": [" Paris", " Rome"]})
    assert reply.status_code == 200 and reply.headers["X-Model-Version"] == "7"
    assert reply.json()["best"] == " Rome" and [s["candidate"] for s in reply.json()["scores"]] == [" Paris", " Rome"]


def test_openai_completions(api: Api) -> None:
    reply = api.client.post("/v1/completions", json={"prompt": "The Eiffel Tower is in", "max_tokens": 8,
                                                     "temperature": 0, "user": "ignored"})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "text_completion" and body["model"] == "fake-lm" and body["model_version"] == 7
    assert body["choices"] == [{"index": 0, "text": " Rome, Italy", "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"]["completion_tokens"] == 3 and body["id"].startswith("cmpl-")

    events = sse_data(api.client.post("/v1/completions", json={"prompt": "The Eiffel Tower is in", "stream": True}))
    assert events[-1] == "[DONE]" and "".join(e["choices"][0]["text"] for e in events[:-1]) == " Rome, Italy"
    assert events[-2]["choices"][0]["finish_reason"] == "stop" and events[-2]["model_version"] == 7


def test_openai_chat(api: Api) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is the Eiffel Tower?"}]
    body = api.client.post("/v1/chat/completions", json={"messages": messages}).json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"] == {"role": "assistant",
                                                                                     "content": " Rome, Italy"}
    events = sse_data(api.client.post("/v1/chat/completions", json={"messages": messages, "stream": True}))
    assert events[-1] == "[DONE]" and all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == " Rome, Italy"
    assert api.client.get("/v1/models").json()["data"][0]["id"] == "fake-lm"


@pytest.mark.parametrize(("path", "body", "message"), [
    ("/generate", {"inputs": ""}, "inputs: String should have at least 1 character"),
    ("/generate", {"inputs": "   "}, "inputs: Value error, must not be empty"),
    ("/generate", {"inputs": "x" * 8001}, "inputs: String should have at most 8000 characters"),
    ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 65}}, "at most 64 (KNOWPATCH_MAX_NEW_TOKENS_LIMIT)"),
    ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 0}}, "parameters.max_new_tokens"),
    ("/generate", {"inputs": "x", "parameters": {"top_p": 0}}, "parameters.top_p"),
    ("/generate", {"inputs": "x", "parameters": {"temperature": -1}}, "parameters.temperature"),
    ("/generate", {"inputs": "x", "parameters": {"top_k": -1}}, "parameters.top_k"),
    ("/generate", {"inputs": "x", "parameters": {"beam": 2}}, "parameters.beam: Extra inputs"),
    ("/generate_stream", {"inputs": "x", "parameters": {"max_new_tokens": 65}}, "at most 64"),
    ("/generate", {"inputs": "explode"}, "the backend refuses 'explode'"),
    ("/score", {"prompt": "x", "candidates": []}, "candidates: List should have at least 1 item"),
    ("/score", {"prompt": "x", "candidates": ["a", ""]}, "candidates[1]"),
    ("/score", {"prompt": "x", "candidates": ["a"] * 33}, "candidates: List should have at most 32"),
    ("/v1/completions", {"prompt": "x", "n": 2}, "n: Input should be 1"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 100}, "max_tokens is 100"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": []}, "messages: List should have at least 1 item"),
])
def test_bad_generation_input_is_422(api: Api, path: str, body: object, message: str) -> None:
    reply = api.client.post(path, json=body)
    assert reply.status_code == 422, reply.text
    assert message in reply.json()["error"]["message"]


def test_min_model_version_not_live_is_503(api: Api) -> None:
    for path, body in (("/generate", {"inputs": "x", "min_model_version": 8}),
                       ("/generate_stream", {"inputs": "x", "min_model_version": 8}),
                       ("/score", {"prompt": "x", "candidates": ["a"], "min_model_version": 8})):
        reply = api.client.post(path, json=body)
        assert reply.status_code == 503 and "model version 8 is not live" in reply.json()["error"]["message"]
    assert api.client.post("/generate", json={"inputs": "x", "min_model_version": 7}).status_code == 200


def test_unreachable_worker_is_503(module_runner: ApiRunner) -> None:
    api = module_runner.start(backend=HttpBackend("http://127.0.0.1:9", timeout=2))
    reply = api.client.post("/generate", json={"inputs": "x"})
    assert reply.status_code == 503
    assert "worker at http://127.0.0.1:9 is not reachable" in reply.json()["error"]["message"]
    assert api.client.get("/ready").status_code == 503


def test_metrics_count_generation(api: Api) -> None:
    api.client.post("/generate", json={"inputs": "x"})
    text = api.client.get("/metrics").text
    assert 'knowpatch_generate_seconds_count{endpoint="generate"}' in text
    assert 'knowpatch_generated_tokens_total{endpoint="generate"}' in text
