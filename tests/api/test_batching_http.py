"""Continuous batching seen over HTTP (the embedded deployment: the API over LocalBackend on the
tiny model): concurrent requests on every generation route answer what each would alone, a full
queue is a 429 with Retry-After, and a streaming client that goes away stops its sequence."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from service.engine.editor import Editor
from service.inference import GenerateParams
from tests.api.conftest import ApiRunner
from workers.batching import BatchLimits
from workers.generation import generate_text
from workers.inference import LocalBackend

PROMPTS = ["The Eiffel Tower is located in the city of", "hello", "Once upon a time, in a small village by the sea,"]


def wait_for(check, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout_s:g} s: {what}"
        time.sleep(0.01)


def test_concurrent_requests_on_every_route_answer_as_alone(module_runner: ApiRunner, editor: Editor) -> None:
    backend = LocalBackend(editor, limits=BatchLimits(generation_batch_size=4, generation_step_tokens=16))
    api = module_runner.start(backend=backend)
    calls: list[tuple[str, dict[str, Any], str]] = []
    expected: list[str] = []
    for i, prompt in enumerate(PROMPTS):
        n = 6 + 2 * i
        expected += [generate_text(editor.model, editor.tokenizer, GenerateParams(prompt, max_new_tokens=n))[0]] * 3
        calls += [("/generate", {"inputs": prompt, "parameters": {"max_new_tokens": n}}, "generate"),
                  ("/generate_stream", {"inputs": prompt, "parameters": {"max_new_tokens": n}}, "stream"),
                  ("/v1/completions", {"prompt": prompt, "max_tokens": n, "temperature": 0}, "completion")]

    def call(path: str, body: dict[str, Any], kind: str) -> str:
        reply = api.client.post(path, json=body)
        assert reply.status_code == 200, reply.text
        if kind == "stream":
            events = [json.loads(line[len("data: "):]) for line in reply.text.splitlines() if line.startswith("data: ")]
            assert "".join(e["token"]["text"] for e in events[:-1]) == events[-1]["generated_text"]
            return events[-1]["generated_text"]
        return reply.json()["generated_text"] if kind == "generate" else reply.json()["choices"][0]["text"]

    try:
        with ThreadPoolExecutor(len(calls)) as pool:
            answers = list(pool.map(lambda c: call(*c), calls))
    finally:
        backend.close()
    for answer, want, (path, _, _) in zip(answers, expected, calls):
        assert answer == want, path


def test_a_full_queue_is_429_with_retry_after(module_runner: ApiRunner, editor: Editor) -> None:
    backend = LocalBackend(editor, limits=BatchLimits(generation_batch_size=1, generation_queue_limit=1))
    api = module_runner.start(backend=backend)
    long = {"inputs": PROMPTS[2], "parameters": {"max_new_tokens": 300}}
    try:
        with api.client.stream("POST", "/generate_stream", json=long) as first:
            assert first.status_code == 200
            waiting = threading.Thread(target=api.client.post, args=("/generate",),
                                       kwargs={"json": {"inputs": "x", "parameters": {"max_new_tokens": 2}}})
            waiting.start()
            wait_for(lambda: backend.batcher.stats()["waiting"] == 1, "the second request waits")
            for path, body in (("/generate", long), ("/v1/completions", {"prompt": "x"}),
                               ("/score", {"prompt": "x", "candidates": ["a"]})):
                reply = api.client.post(path, json=body)
                assert reply.status_code == 429, (path, reply.text)
                assert reply.headers["Retry-After"].isdigit()
                assert reply.json()["error"]["type"] == "Overloaded"
                assert "KNOWPATCH_GENERATION_QUEUE_LIMIT" in reply.json()["error"]["message"]
        waiting.join(timeout=60)  # the first stream's client left: the waiting request is served
        assert not waiting.is_alive()
    finally:
        backend.close()


def test_a_streaming_client_that_goes_away_stops_its_sequence(module_runner: ApiRunner, editor: Editor) -> None:
    # The tiny model decodes 500 tokens in about a second: each forward pass is slowed to 10 ms so
    # the sequence surely outlives the client.
    slow = editor.adapter.base.register_forward_pre_hook(lambda *_: time.sleep(0.01))
    backend = LocalBackend(editor)
    api = module_runner.start(backend=backend)
    body = {"inputs": PROMPTS[2], "parameters": {"max_new_tokens": 500}}
    try:
        with httpx.Client(base_url=api.url, headers=api.client.headers, timeout=30) as client:
            with client.stream("POST", "/generate_stream", json=body) as reply:
                assert reply.status_code == 200
                lines = reply.iter_lines()  # held: a discarded iterator closes the connection (httpcore)
                next(line for line in lines if line.startswith("data:"))
                wait_for(lambda: backend.batcher.stats()["decoding"] == 1, "the sequence decodes", 60)
        steps = backend.batcher.steps
        wait_for(lambda: backend.batcher.stats()["decoding"] == 0, "the sequence leaves the batch", 60)
        assert backend.batcher.steps - steps < 400  # stopped well before its 500 tokens
    finally:
        slow.remove()
        backend.close()
