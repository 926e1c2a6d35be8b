"""Generation routes on a real model: 503 without a backend; with the tiny model's Editor served in
process (workers.inference.LocalBackend, the embedded deployment) and by the worker's internal server
through api.backend_http.HttpBackend (the split deployment), the TGI, score and OpenAI shapes and
streams, which must agree with each other and with the model."""
from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest
import torch

from api.backend_http import HttpBackend
from service.engine.editor import Editor
from service.inference import GenerateParams
from tests.api.conftest import INTERNAL_TOKEN, VERSION_WAIT_S, Api, ApiRunner, local_port
from workers.generation import generate_text
from workers.inference import LocalBackend

PROMPT = "The Eiffel Tower is located in the city of"
MAX_NEW_TOKENS_LIMIT = 64
TOO_LONG = " x" * 2100  # 2100 tokens: past the tiny Llama's 2048 positions, within the 8000-character limit
# The tiny model's greedy next token after this prompt is the end-of-sequence token (checked below).
EOS_PROMPT = "weight"
GENERATION_ROUTES = [
    ("POST", "/generate", {"inputs": "hi"}), ("POST", "/generate_stream", {"inputs": "hi"}),
    ("POST", "/score", {"prompt": "hi", "candidates": ["a"]}), ("POST", "/v1/completions", {"prompt": "hi"}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}), ("GET", "/v1/models", None),
]


@pytest.fixture(scope="module", params=["local", "http"])
def api(request: pytest.FixtureRequest, module_runner: ApiRunner, local_backend: LocalBackend) -> Api:
    """The API over the in-process backend, or over HttpBackend and the worker's internal server."""
    if request.param == "local":
        return module_runner.start(backend=local_backend, max_new_tokens_limit=MAX_NEW_TOKENS_LIMIT)
    backend = HttpBackend(request.getfixturevalue("worker_url"), timeout=10, token=INTERNAL_TOKEN)
    return module_runner.start(backend=backend, lifespan_hooks=[backend.lifespan],
                               max_new_tokens_limit=MAX_NEW_TOKENS_LIMIT)


@pytest.fixture(scope="module")
def api_without_backend(module_runner: ApiRunner) -> Api:
    return module_runner.start()


def sse_data(reply: httpx.Response) -> list[Any]:
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/event-stream")
    lines = [line[len("data: "):] for line in reply.text.splitlines() if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


def generate(api: Api, inputs: str = PROMPT, **parameters: Any) -> dict[str, Any]:
    reply = api.client.post("/generate", json={"inputs": inputs, "parameters": parameters})
    assert reply.status_code == 200, reply.text
    assert reply.headers["X-Model-Version"] == str(reply.json()["model_version"])
    return reply.json()


def completion(api: Api, prompt: str, **fields: Any) -> dict[str, Any]:
    reply = api.client.post("/v1/completions", json={"prompt": prompt, **fields})
    assert reply.status_code == 200, reply.text
    return reply.json()


@pytest.mark.parametrize(("method", "path", "body"), GENERATION_ROUTES)
def test_without_a_backend_generation_is_503(api_without_backend: Api, method: str, path: str, body: object) -> None:
    reply = api_without_backend.client.request(method, path, json=body)
    assert reply.status_code == 503
    assert reply.json()["error"]["type"] == "Unavailable"
    assert "no inference backend configured" in reply.json()["error"]["message"]


def test_greedy_generation_is_the_models_and_deterministic(api: Api, editor: Editor) -> None:
    body = generate(api, max_new_tokens=8)
    text, reason, tokens, prompt_tokens = generate_text(editor.model, editor.tokenizer,
                                                        GenerateParams(PROMPT, max_new_tokens=8))
    assert body == {"generated_text": text, "details": {"finish_reason": "length", "generated_tokens": 8},
                    "model_version": 0}
    assert reason == "length" and tokens == 8 and text.strip()
    assert generate(api, max_new_tokens=8) == body
    assert generate(api, max_new_tokens=4)["generated_text"] == generate_text(
        editor.model, editor.tokenizer, GenerateParams(PROMPT, max_new_tokens=4))[0]


def test_streams_carry_the_same_answer(api: Api) -> None:
    expected = generate(api, max_new_tokens=12)
    for path, extra in (("/generate_stream", {}), ("/generate", {"stream": True})):
        events = sse_data(api.client.post(path, json={"inputs": PROMPT, "parameters": {"max_new_tokens": 12},
                                                      **extra}))
        assert all(set(e) == {"token"} for e in events[:-1]) and len(events) >= 2
        assert "".join(e["token"]["text"] for e in events[:-1]) == expected["generated_text"]
        assert events[-1] == expected


def test_openai_completions_match_generate(api: Api, editor: Editor) -> None:
    expected = generate(api, max_new_tokens=8)
    body = completion(api, PROMPT, max_tokens=8, temperature=0, user="ignored")
    assert body["object"] == "text_completion" and body["model"] == "tiny-llama" and body["model_version"] == 0
    assert body["choices"] == [{"index": 0, "text": expected["generated_text"], "logprobs": None,
                                "finish_reason": "length"}]
    prompt_tokens = len(editor.tokenizer(PROMPT)["input_ids"])
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 8, "total_tokens": prompt_tokens + 8}
    assert body["id"].startswith("cmpl-")

    events = sse_data(api.client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                                               "stream": True}))
    assert events[-1] == "[DONE]" and all(e["object"] == "text_completion" for e in events[:-1])
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == expected["generated_text"]
    assert events[-2]["choices"][0]["finish_reason"] == "length" and events[-2]["model_version"] == 0
    assert events[-2]["usage"] == body["usage"]


def test_seeded_sampling_is_reproducible(api: Api) -> None:
    sampling = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.5, "seed": 11}
    first = generate(api, **sampling)
    assert generate(api, **sampling) == first
    streamed = sse_data(api.client.post("/generate_stream", json={"inputs": PROMPT, "parameters": sampling}))
    assert streamed[-1] == first
    # The seed matters: other seeds give other answers (and greedy decoding is another one again).
    answers = {generate(api, **{**sampling, "seed": seed})["generated_text"] for seed in (1, 2, 3, 11)}
    assert len(answers) > 1 and first["generated_text"] in answers
    # /v1/completions samples the same way for the same temperature and seed.
    body = completion(api, PROMPT, max_tokens=8, temperature=1.5, seed=11)
    assert body["choices"][0]["text"] == first["generated_text"]


def test_a_tiny_temperature_samples_the_greedy_answer(api: Api) -> None:
    """1e-40 overflows float32 logits / temperature to inf; sampling must still work (was a 500)."""
    greedy = generate(api, max_new_tokens=6)
    assert generate(api, max_new_tokens=6, do_sample=True, temperature=1e-40, seed=3) == greedy


@pytest.mark.parametrize("temperature", [1e-300, 5e-324])
def test_an_underflowing_temperature_samples_the_greedy_answer(api: Api, temperature: float) -> None:
    """Below float32's range (1e-300 rounds to 0 there) the scaled logits were 0/0 = NaN: a 500 on
    every sampling route, which also closed the connection."""
    greedy = generate(api, max_new_tokens=6)
    sampling = {"max_new_tokens": 6, "do_sample": True, "temperature": temperature, "seed": 3}
    first = api.client.post("/generate", json={"inputs": PROMPT, "parameters": sampling})
    assert first.status_code == 200 and first.json() == greedy, first.text
    streamed = sse_data(api.client.post("/generate_stream", json={"inputs": PROMPT, "parameters": sampling}))
    assert streamed[-1] == greedy
    body = completion(api, PROMPT, max_tokens=6, temperature=temperature, seed=3)
    assert body["choices"][0]["text"] == greedy["generated_text"]
    assert local_port(api.client.get("/v1/models")) == local_port(first)


def test_default_max_new_tokens_is_clamped_to_a_lower_limit(module_runner: ApiRunner,
                                                           local_backend: LocalBackend) -> None:
    """The defaults (32 for /generate, 16 for /v1/completions) were refused when the limit is lower."""
    api = module_runner.start(backend=local_backend, max_new_tokens_limit=4)
    body = generate(api)
    assert body["details"] == {"finish_reason": "length", "generated_tokens": 4}
    assert sse_data(api.client.post("/generate_stream", json={"inputs": PROMPT}))[-1] == body
    assert completion(api, PROMPT, temperature=0)["usage"]["completion_tokens"] == 4
    reply = api.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 4, reply.text
    # An explicit value above the limit is still refused.
    reply = api.client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 5}})
    assert reply.status_code == 422 and "at most 4 (KNOWPATCH_MAX_NEW_TOKENS_LIMIT)" in reply.text


def test_stop_sequences(api: Api) -> None:
    events = sse_data(api.client.post("/generate_stream", json={"inputs": PROMPT,
                                                                "parameters": {"max_new_tokens": 16}}))
    tokens = [e["token"]["text"] for e in events[:-1]]
    full = "".join(tokens)
    # A token whose text first occurs where it is generated: the answer must end just before it.
    k = next(k for k in range(1, len(tokens)) if tokens[k].strip() and full.find(tokens[k]) == len("".join(tokens[:k])))
    body = generate(api, max_new_tokens=16, stop=[tokens[k], "never generated \u2603"])
    assert body["generated_text"] == "".join(tokens[:k])
    assert body["details"]["finish_reason"] == "stop" and body["details"]["generated_tokens"] < 16
    choice = completion(api, PROMPT, max_tokens=16, temperature=0, stop=tokens[k])["choices"][0]
    assert choice == {"index": 0, "text": "".join(tokens[:k]), "logprobs": None, "finish_reason": "stop"}


def test_end_of_sequence(api: Api, editor: Editor) -> None:
    ids = editor.tokenizer(EOS_PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert int(editor.model(input_ids=ids).logits[0, -1].argmax()) == editor.tokenizer.eos_token_id, \
            "the tiny model's random weights changed: pick another EOS_PROMPT"
    assert generate(api, EOS_PROMPT, max_new_tokens=8) == {
        "generated_text": "", "details": {"finish_reason": "eos", "generated_tokens": 0}, "model_version": 0}
    body = completion(api, EOS_PROMPT, max_tokens=8, temperature=0)
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == 0


def _logprob(editor: Editor, prompt: str, candidate: str) -> tuple[float, int]:
    """log P(candidate | prompt) from one plain forward pass."""
    prompt_ids = editor.tokenizer(prompt)["input_ids"]
    target = editor.tokenizer(" " + candidate.strip(), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = editor.model(input_ids=torch.tensor([prompt_ids + target])).logits[0].double()
    logprobs = torch.log_softmax(logits[len(prompt_ids) - 1:-1], dim=-1)
    return float(logprobs[torch.arange(len(target)), torch.tensor(target)].sum()), len(target)


def test_score(api: Api, editor: Editor) -> None:
    # the last is a passage (perplexity over HTTP), longer than a short answer field would allow
    candidates = [" Paris", "Rome", " the capital of Italy", " the city of light by the river" * 40]
    reply = api.client.post("/score", json={"prompt": PROMPT, "candidates": candidates})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert reply.headers["X-Model-Version"] == "0" and body["model_version"] == 0
    assert [s["candidate"] for s in body["scores"]] == candidates
    for score in body["scores"]:
        total, tokens = _logprob(editor, PROMPT, score["candidate"])
        assert score["tokens"] == tokens and score["total_logprob"] == pytest.approx(total, abs=1e-3)
        assert score["total_logprob"] < 0 and score["mean_logprob"] == pytest.approx(score["total_logprob"] / tokens)
    assert body["best"] == max(body["scores"], key=lambda s: s["total_logprob"])["candidate"]
    assert api.client.post("/score", json={"prompt": PROMPT, "candidates": candidates}).json() == body


def test_openai_chat_uses_the_chat_template(api: Api, editor: Editor) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is the Eiffel Tower?"}]
    prompt = editor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>") and prompt.endswith("<|im_start|>assistant\n")
    expected = completion(api, prompt, max_tokens=8, temperature=0)

    reply = api.client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "temperature": 0})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny-llama" and body["model_version"] == 0
    assert body["choices"] == [{"index": 0, "finish_reason": "length",
                                "message": {"role": "assistant", "content": expected["choices"][0]["text"]}}]
    assert body["usage"] == expected["usage"] and body["id"].startswith("chatcmpl-")

    events = sse_data(api.client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8,
                                                                    "temperature": 0, "stream": True}))
    assert events[-1] == "[DONE]" and all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == body["choices"][0][
        "message"]["content"]
    assert events[-2]["usage"] == body["usage"] and events[-2]["model_version"] == 0
    assert api.client.get("/v1/models").json()["data"][0]["id"] == "tiny-llama"


@pytest.mark.parametrize(("path", "body", "message"), [
    ("/generate", {"inputs": ""}, "inputs: String should have at least 1 character"),
    ("/generate", {"inputs": "   "}, "inputs: Value error, must not be empty"),
    ("/generate", {"inputs": "\u200b\u2060"}, "inputs: Value error, must not be empty"),
    ("/generate", {"inputs": "x" * 8001}, "inputs: String should have at most 8000 characters"),
    ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 65}}, "at most 64 (KNOWPATCH_MAX_NEW_TOKENS_LIMIT)"),
    ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 0}}, "parameters.max_new_tokens"),
    ("/generate", {"inputs": "x", "parameters": {"top_p": 0}}, "parameters.top_p"),
    ("/generate", {"inputs": "x", "parameters": {"temperature": -1}}, "parameters.temperature"),
    ("/generate", {"inputs": "x", "parameters": {"top_k": -1}}, "parameters.top_k"),
    ("/generate", {"inputs": "x", "parameters": {"beam": 2}}, "parameters.beam: Extra inputs"),
    ("/generate_stream", {"inputs": "x", "parameters": {"max_new_tokens": 65}}, "at most 64"),
    ("/score", {"prompt": "x", "candidates": []}, "candidates: List should have at least 1 item"),
    ("/score", {"prompt": "x", "candidates": ["a", ""]}, "candidates[1]"),
    ("/score", {"prompt": "x", "candidates": ["a"] * 33}, "candidates: List should have at most 32"),
    ("/score", {"prompt": "x", "candidates": ["a" * 8001]}, "candidates[0]: String should have at most 8000"),
    ("/v1/completions", {"prompt": "x", "n": 2}, "n: Input should be 1"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 100}, "max_tokens is 100"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": []}, "messages: List should have at least 1 item"),
    # Refused by the model's backend (through the worker for HttpBackend), not by the request schema:
    ("/generate", {"inputs": TOO_LONG, "parameters": {"max_new_tokens": 1}},
     "prompt (2100 tokens) + max_new_tokens exceeds the model's 2048 positions"),
    ("/generate_stream", {"inputs": TOO_LONG}, "exceeds the model's 2048 positions"),
    ("/v1/completions", {"prompt": TOO_LONG, "max_tokens": 1}, "exceeds the model's 2048 positions"),
    ("/score", {"prompt": TOO_LONG, "candidates": [" Rome"]}, "(2100 tokens) exceeds the model's 2048 positions"),
    ("/generate", {"inputs": "x", "parameters": {"do_sample": True, "seed": 2**64}}, "seed 18446744073709551616 is "
                                                                                       "outside the 64-bit range"),
    ("/v1/completions", {"prompt": "x", "seed": -2**63 - 1}, "is outside the 64-bit range"),
])
def test_bad_generation_input_is_422(api: Api, path: str, body: object, message: str) -> None:
    reply = api.client.post(path, json=body)
    assert reply.status_code == 422, reply.text
    assert reply.json()["error"]["type"] == "InvalidRequest"
    assert message in reply.json()["error"]["message"]


@pytest.mark.parametrize(("path", "body", "message"), [
    ("/generate", {"inputs": "x", "parameters": {"stop": ["ok", "\ud800"]}},
     "parameters.stop[1]: Value error, contains a lone surrogate (U+D800)"),
    ("/v1/completions", {"prompt": "x", "stop": "\udfff"}, "stop: Value error, contains a lone surrogate (U+DFFF)"),
    ("/generate", {"inputs": "x\ud800"}, "inputs: Input should be a valid string"),
])
def test_text_without_utf8_encoding_is_422(api: Api, path: str, body: object, message: str) -> None:
    """A lone surrogate (sent as a JSON escape) cannot be forwarded to the worker: it was a 500 there."""
    reply = api.client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert reply.status_code == 422, reply.text
    assert reply.json()["error"]["type"] == "InvalidRequest" and message in reply.json()["error"]["message"]


def test_min_model_version_not_live_is_503_after_the_wait(api: Api) -> None:
    for path, body in (("/generate", {"inputs": "x", "min_model_version": 1}),
                       ("/generate_stream", {"inputs": "x", "min_model_version": 1}),
                       ("/score", {"prompt": "x", "candidates": ["a"], "min_model_version": 1}),
                       ("/v1/completions", {"prompt": "x", "min_model_version": 1})):
        started = time.monotonic()
        reply = api.client.post(path, json=body)
        assert time.monotonic() - started >= VERSION_WAIT_S, path
        assert reply.status_code == 503 and reply.json()["error"]["type"] == "Unavailable", path
        assert reply.json()["error"]["message"].startswith(
            f"model version 1 is not live after {VERSION_WAIT_S:g} s (current version 0)"), path
    assert api.client.post("/generate", json={"inputs": "x", "min_model_version": 0}).json()["model_version"] == 0


def test_min_model_version_going_live_while_waiting_is_served(module_runner: ApiRunner, editor: Editor) -> None:
    api = module_runner.start(backend=LocalBackend(editor, version_wait_s=30))
    digest = editor.weights_digest()
    live = threading.Timer(0.3, editor.load, ([], 1))  # as the worker does once it has applied ledger seq 1
    live.start()
    try:
        started = time.monotonic()
        reply = api.client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2},
                                                   "min_model_version": 1})
        assert reply.status_code == 200, reply.text
        assert reply.json()["model_version"] == 1 and reply.headers["X-Model-Version"] == "1"
        assert 0.3 <= time.monotonic() - started < 10
    finally:
        live.join()
        editor.load([], 0)
    assert editor.version == 0 and editor.weights_digest() == digest


def test_unreachable_worker_is_503(module_runner: ApiRunner) -> None:
    api = module_runner.start(backend=HttpBackend("http://127.0.0.1:9", timeout=2, token=INTERNAL_TOKEN))
    reply = api.client.post("/generate", json={"inputs": "x"})
    assert reply.status_code == 503
    assert "worker at http://127.0.0.1:9 is not reachable" in reply.json()["error"]["message"]
    assert api.client.get("/ready").status_code == 503


def test_metrics_count_generation(api: Api) -> None:
    generate(api, inputs="x", max_new_tokens=3)
    text = api.client.get("/metrics").text
    assert 'knowpatch_generate_seconds_count{endpoint="generate"}' in text
    assert 'knowpatch_generated_tokens_total{endpoint="generate"}' in text
