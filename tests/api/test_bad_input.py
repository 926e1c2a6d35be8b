"""Bad input gets a 4xx naming the problem, in the one error shape, and changes nothing."""
from __future__ import annotations

from typing import Any

import pytest

from tests.api.conftest import Api, ApiRunner, edit_body


@pytest.fixture(scope="module")
def api(module_runner: ApiRunner) -> Api:
    return module_runner.start()


def one(**overrides: Any) -> dict[str, Any]:
    return {**edit_body("Eiffel Tower"), **overrides}


BAD_EDITS = [
    pytest.param(one(subject="Big Ben"), "prompt must contain the subject 'Big Ben'", id="subject-not-in-prompt"),
    pytest.param(one(subject=""), "subject must be a non-empty string", id="empty-subject"),
    pytest.param(one(target_new="   "), "target_new must be a non-empty string", id="blank-target"),
    pytest.param(one(prompt="Eiffel Tower " + "x" * 1000), "the limit is 1000", id="oversized-prompt"),
    pytest.param(one(target_new="Paris"), "target_new must differ from target_true", id="same-targets"),
    pytest.param(one(rephrase_prompts=[""]), "rephrase_prompts[0] must be a non-empty string", id="empty-rephrase"),
    pytest.param(one(rephrase_prompts=["p"] * 17), "has 17 prompts; the limit is 16", id="too-many-rephrases"),
    pytest.param({k: v for k, v in one().items() if k != "target_new"}, "target_new: this field is required",
                 id="missing-field"),
    pytest.param(one(target_new=5), "target_new: Input should be a valid string", id="wrong-type"),
    pytest.param(one(colour="red"), "colour: Extra inputs are not permitted", id="unknown-field"),
    pytest.param(one(method="rome"), "method: Input should be 'alphaedit' or 'memit'", id="unknown-method"),
    pytest.param(one(metadata={"x": "y" * 5000}), "metadata is larger than 4096", id="huge-metadata"),
    pytest.param({"edits": []}, "edits: List should have at least 1 item", id="empty-list"),
    pytest.param({"edits": [one()] * 257}, "edits: List should have at most 256 items", id="list-too-long"),
    pytest.param({"edits": [one(), one(subject="Big Ben")]}, "edits[1]: prompt must contain the subject",
                 id="one-bad-in-list"),
    pytest.param({"edits": [one(subject="Big Ben")]}, "edits[0]: prompt must contain the subject",
                 id="bad-in-list-of-one"),
    pytest.param({"edits": [one(), {"subject": "x"}]}, "edits[1].prompt: this field is required",
                 id="missing-field-in-list"),
    pytest.param({"edits": [one(method="memit"), one()]}, "must share a method", id="mixed-methods"),
    pytest.param([one()], "Input should be a valid dictionary", id="top-level-array"),
]


@pytest.mark.parametrize(("body", "message"), BAD_EDITS)
def test_bad_edit_is_422_and_writes_nothing(api: Api, body: Any, message: str) -> None:
    before, depth = api.counts(), api.queue.depth()
    reply = api.client.post("/edits", json=body)
    assert reply.status_code == 422, reply.text
    assert reply.json()["error"]["type"] == "InvalidRequest"
    assert message in reply.json()["error"]["message"]
    assert api.counts() == before and api.queue.depth() == depth


@pytest.mark.parametrize("raw", [b"{not json", b"", b'{"subject": "a",}'])
def test_malformed_json_is_400(api: Api, raw: bytes) -> None:
    before = api.counts()
    reply = api.client.post("/edits", content=raw, headers={"Content-Type": "application/json"})
    assert reply.status_code in (400, 422), reply.text
    if raw:
        assert reply.status_code == 400 and "request body is not valid JSON" in reply.json()["error"]["message"]
    else:
        assert "the request body is missing" in reply.json()["error"]["message"]
    assert api.counts() == before


def test_bad_idempotency_key_and_rollback_body(api: Api) -> None:
    before = api.counts()
    reply = api.client.post("/edits", json=one(), headers={"Idempotency-Key": "k" * 256})
    assert reply.status_code == 422 and "idempotency-key" in reply.json()["error"]["message"]
    assert api.counts() == before


def test_unknown_route_and_method(api: Api) -> None:
    reply = api.client.get("/nope")
    assert reply.status_code == 404
    assert reply.json() == {"error": {"type": "NotFound",
                                      "message": "no route GET /nope; the routes are listed at GET /docs"}}
    reply = api.client.put("/edits")
    assert reply.status_code == 405 and reply.json()["error"]["type"] == "MethodNotAllowed"
