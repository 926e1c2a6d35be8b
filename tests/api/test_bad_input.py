"""Bad input gets a 4xx naming the problem, in the one error shape, and changes nothing."""
from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.api.conftest import Api, ApiRunner, edit_body, local_port


@pytest.fixture(scope="module")
def api(module_runner: ApiRunner) -> Api:
    return module_runner.start()


def one(**overrides: Any) -> dict[str, Any]:
    return {**edit_body("Eiffel Tower"), **overrides}


BAD_EDITS = [
    pytest.param(one(subject="Big Ben"), "prompt must contain the subject 'Big Ben'", id="subject-not-in-prompt"),
    pytest.param(one(subject=""), "subject must be a non-empty string", id="empty-subject"),
    pytest.param(one(subject="\u200b\u200b", prompt="\u200b\u200b is located in the city of"),
                 "subject must be a non-empty string", id="zero-width-subject"),
    pytest.param(one(target_new="\ufeff "), "target_new must be a non-empty string", id="invisible-target"),
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


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("PUT", "/edits", "GET, POST"),  # two routes share the path: GET lists, POST submits
    ("POST", "/edits/some-id", "GET, DELETE"),
    ("GET", "/edits/some-id/rollback", "POST"),
    ("DELETE", "/openapi.json", "GET, HEAD"),
])
def test_405_allows_every_method_of_the_path(api: Api, method: str, path: str, allowed: str) -> None:
    reply = api.client.request(method, path)
    assert reply.status_code == 405, reply.text
    assert reply.headers["Allow"] == allowed
    assert reply.json()["error"]["message"] == f"{method} is not allowed on {path}; use {allowed}"


def send_json(client: httpx.Client, path: str, body: Any) -> httpx.Response:
    """POST `body` as ASCII JSON: lone surrogates travel as \\ud800 escapes (httpx's json= cannot encode them)."""
    return client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})


UNSTORABLE_EDITS = [
    (one(subject="Zorb\ud800", prompt="Zorb\ud800 is located in the city of"), "subject contains a lone surrogate"),
    (one(prompt="Eiffel Tower\udfff is located in"), "prompt contains a lone surrogate"),
    (one(metadata={"note": "Zorb\ud800"}), "metadata.note contains a lone surrogate"),
    (one(metadata={"tags": ["a", {"Zorb\ud800": 1}]}), "a key of metadata.tags[1] contains a lone surrogate"),
    (one(subject="Zorb\u0000", prompt="Zorb\u0000 is located in the city of"), "subject contains a NUL character"),
    (one(rephrase_prompts=["Eiffel Tower\u0000 stands in"]), "rephrase_prompts[0] contains a NUL character"),
    (one(metadata={"note": "a\u0000b"}), "metadata.note contains a NUL character"),
    ({"edits": [one(), one(subject="Zorb\ud800", prompt="Zorb\ud800 is in")]}, "edits[1]: subject contains a lone"),
]


def test_text_no_ledger_can_store_is_422_on_both_ledgers(any_ledger_api: Api) -> None:
    """Lone surrogates (no UTF-8 encoding) and NUL (refused by Postgres text) were 500s that also
    closed the connection; both ledgers now refuse them alike, and the connection stays open."""
    api = any_ledger_api
    port = local_port(api.client.get("/edits"))
    before = api.counts()
    for body, message in UNSTORABLE_EDITS:
        reply = send_json(api.client, "/edits", body)
        assert reply.status_code == 422, (message, reply.text)
        assert reply.json()["error"]["type"] == "InvalidRequest" and message in reply.json()["error"]["message"]
        assert local_port(reply) == port, f"the connection was closed after: {message}"
    assert api.counts() == before
    reply = api.client.post("/edits", json=one(subject="Zorb", prompt="Zorb is located in the city of"))
    assert reply.status_code == 202 and local_port(reply) == port
    # A rollback reason is stored as text too.
    reply = api.as_("root").post(f"/edits/{reply.json()['id']}/rollback", json={"reason": "KB-1\u0000"})
    assert reply.status_code == 422 and "reason: Value error, contains a NUL character" in reply.text, reply.text


def test_bad_list_filters_are_4xx_on_both_ledgers(any_ledger_api: Api) -> None:
    api = any_ledger_api
    assert api.client.post("/edits", json=one()).status_code == 202
    port = local_port(api.client.get("/edits"))
    for params, message in (
        ({"cursor": "c2VxOjk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5"}, "cursor 'c2VxOjk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5' "
                                                             "is not valid"),  # seq:99999999999999999999999
        ({"cursor": "c2VxOjIxNDc0ODM2NDg"}, "is not valid"),  # seq:2147483648, past Postgres' INTEGER seq
        ({"cursor": "c2VxOi0x"}, "is not valid"),  # seq:-1
        ({"cursor": "c2VxOiAx"}, "is not valid"),  # "seq: 1"
        ({"subject": "Eiffel\x00Tower"}, "subject contains a NUL character"),
    ):
        reply = api.client.get("/edits", params=params)
        assert reply.status_code == 422, (params, reply.text)
        assert reply.json()["error"]["type"] == "InvalidRequest" and message in reply.json()["error"]["message"]
        assert local_port(reply) == port, f"the connection was closed after {params}"
    # The largest cursor that fits a seq still works (seq:2147483647, 2^31 - 1): the edit is below it.
    assert len(api.client.get("/edits", params={"cursor": "c2VxOjIxNDc0ODM2NDc"}).json()["items"]) == 1
    assert len(api.client.get("/edits").json()["items"]) == 1


def test_openapi_states_the_input_rules(api: Api) -> None:
    """Not blank, length limits and the cursor's form are in the schema, not only in the 422s."""
    spec = api.as_(None).get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    edit = schemas["EditIn"]["properties"]
    for name, limit in (("subject", 200), ("prompt", 1000), ("target_new", 200), ("target_true", 200)):
        assert (edit[name]["minLength"], edit[name]["maxLength"], edit[name]["pattern"]) == (1, limit, "\\S"), name
    assert edit["rephrase_prompts"]["maxItems"] == 16 and edit["rephrase_prompts"]["items"]["maxLength"] == 1000
    assert "4096" in edit["metadata"]["description"]
    assert schemas["RollbackIn"]["properties"]["reason"]["pattern"] == "\\S"
    assert schemas["GenerateIn"]["properties"]["inputs"]["pattern"] == "\\S"
    query = {p["name"]: p["schema"]["anyOf"][0] for p in spec["paths"]["/edits"]["get"]["parameters"]
             if p["name"] in ("cursor", "subject")}
    assert query["cursor"]["pattern"] == "^[A-Za-z0-9_-]+={0,2}$" and query["cursor"]["maxLength"] == 64
    assert query["subject"]["maxLength"] == 200
