"""Bearer API keys and scopes, over HTTP; and the key setting's formats."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from api.auth import auth_enabled, load_api_keys
from service.config import Settings
from service.errors import InvalidRequest
from tests.api.conftest import Api, ApiFactory, ApiRunner, edit_body

ROUTES = [  # (method, path, scope needed)
    ("POST", "/edits", "edits:write"), ("GET", "/edits", "edits:write"),
    ("GET", "/edits/00000000-0000-0000-0000-000000000000", "edits:write"),
    ("DELETE", "/edits/00000000-0000-0000-0000-000000000000", "edits:write"),
    ("POST", "/edits/00000000-0000-0000-0000-000000000000/rollback", "edits:admin"),
    ("POST", "/generate", "generate"), ("POST", "/generate_stream", "generate"), ("POST", "/score", "generate"),
    ("POST", "/v1/completions", "generate"), ("POST", "/v1/chat/completions", "generate"),
    ("GET", "/v1/models", "generate"),
]


@pytest.fixture(scope="module")
def api(module_runner: ApiRunner) -> Api:
    return module_runner.start()


@pytest.mark.parametrize(("method", "path", "scope"), ROUTES)
def test_missing_or_unknown_key_is_401(api: Api, method: str, path: str, scope: str) -> None:
    before = api.counts()
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": "Basic YWxpY2U6eA=="}):
        reply = api.as_(None).request(method, path, headers=headers, json={})
        assert reply.status_code == 401, (headers, reply.text)
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
        assert reply.json()["error"]["type"] == "Unauthorized"
    assert api.counts() == before


@pytest.mark.parametrize(("method", "path", "scope"), ROUTES)
def test_key_without_the_scope_is_403_naming_it(api: Api, method: str, path: str, scope: str) -> None:
    before = api.counts()
    name = {"edits:write": "gen", "edits:admin": "alice", "generate": "root"}[scope]
    client = api.as_(name)
    reply = client.request(method, path, json=edit_body())
    assert reply.status_code == 403, reply.text
    assert reply.json()["error"] == {"type": "Forbidden", "message": reply.json()["error"]["message"]}
    assert f"lacks the scope '{scope}'" in reply.json()["error"]["message"]
    assert api.counts() == before


def test_scopes_that_suffice(api: Api) -> None:
    root = api.as_("root")  # edits:admin implies edits:write
    assert root.post("/edits", json=edit_body()).status_code == 202
    gen = api.as_("gen")  # authorized; then no backend is configured
    reply = gen.post("/generate", json={"inputs": "hello"})
    assert reply.status_code == 503 and "no inference backend configured" in reply.json()["error"]["message"]


def test_requested_by_is_the_key_name(api: Api) -> None:
    edit_id = api.client.post("/edits", json=edit_body()).json()["id"]
    assert api.client.get(f"/edits/{edit_id}").json()["requested_by"] == "alice"


def test_without_keys_everyone_is_anonymous(make_api: ApiFactory) -> None:
    api = make_api(api_keys=None)
    reply = api.as_(None).post("/edits", json=edit_body())
    assert reply.status_code == 202
    assert api.as_(None).get(f"/edits/{reply.json()['id']}").json()["requested_by"] == "anonymous"
    assert api.as_(None).get("/info").json()["auth_enabled"] is False


def test_key_formats(tmp_path: Path) -> None:
    inline = load_api_keys(" a:k1:generate ; b:k2:edits:admin ;")
    assert [(k.name, sorted(k.scopes)) for k in inline] == [("a", ["generate"]), ("b", ["edits:admin", "edits:write"])]
    path = tmp_path / "keys.json"
    path.write_text(json.dumps([{"name": "svc", "key": "s3cret", "scopes": ["edits:write"]}]))
    assert [k.name for k in load_api_keys(str(path))] == ["svc"]
    assert auth_enabled(Settings(api_keys=str(path))) and not auth_enabled(Settings(api_keys=None))
    for bad, message in (("a:k1", "is not 'name:key:scope1,scope2'"), ("a:k1:fly", "use one or more of"),
                         ("a:k1:generate;a:k2:generate", "must be unique"), ("a::generate", "non-empty name and key"),
                         ("a:k:generate;b:k:generate", "share the same key"),
                         (str(tmp_path / "no.json"), "cannot read")):
        with pytest.raises(InvalidRequest, match=message):
            load_api_keys(bad)
