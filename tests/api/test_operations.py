"""/health, /ready, /info, /metrics and the OpenAPI document."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from api.app import create_app
from service.config import Settings
from service.engine.editor import Editor
from service.ledger.db import make_engine, migrate, session_factory
from service.queue import LocalQueue
from tests.api.conftest import Api, ApiFactory, ApiRunner, edit_body, serve
from tests.api.test_edits import apply_all
from workers.inference import LocalBackend


@pytest.fixture(scope="module")
def api(module_runner: ApiRunner) -> Api:
    return module_runner.start()


def test_health_needs_nothing(api: Api) -> None:
    reply = api.as_(None).get("/health")
    assert reply.status_code == 200 and reply.json() == {"status": "ok"}


def test_ready_names_what_is_missing(api: Api) -> None:
    reply = api.as_(None).get("/ready")
    assert reply.status_code == 503
    assert reply.json()["checks"] == {"ledger": "ok", "queue": "ok", "backend": "no inference backend configured"}
    assert reply.json()["message"] == "not ready: backend: no inference backend configured"


def test_ready_with_a_backend(module_runner: ApiRunner, local_backend: LocalBackend, editor: Editor) -> None:
    ready = module_runner.start(backend=local_backend).as_(None).get("/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"ready": True, "checks": {"ledger": "ok", "queue": "ok", "backend": "ok"},
                            "message": "ready"}
    replaying = LocalBackend(editor, not_ready=lambda: "the worker is replaying the ledger")  # Worker.not_ready
    loading = module_runner.start(backend=replaying).as_(None).get("/ready")
    assert loading.status_code == 503 and loading.json()["checks"]["backend"] == "the worker is replaying the ledger"


def test_info(module_runner: ApiRunner, local_backend: LocalBackend, editor: Editor) -> None:
    api = module_runner.start(backend=local_backend)
    info = api.as_(None).get("/info").json()
    assert info["model"] == "tiny-llama" and info["model_version"] == 0 and info["method"] == "alphaedit"
    assert info["details"]["layers"] == [1, 2, 3] and info["details"]["active_edits"] == 0
    assert info["details"]["fingerprint"] == editor.loaded.fingerprint
    assert info["details"]["device"] == "cpu" and info["details"]["dtype"] == "float32"
    assert info["auth_enabled"] is True and info["problems"] == []
    assert set(info["ledger_head"]) == {"seq", "hash"} and info["queue_depth"] == 0


def test_metrics_read_the_ledger(make_api: ApiFactory) -> None:
    api = make_api()
    for _ in range(2):
        api.client.post("/edits", json=edit_body())
    apply_all(api)
    api.client.post("/edits", json=edit_body())
    reply = api.as_(None).get("/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    text = reply.text
    for line in ('knowpatch_edits{status="applied"} 2.0', 'knowpatch_edits{status="queued"} 1.0',
                 "knowpatch_queue_depth 1.0", "knowpatch_ledger_head_seq 2.0", "knowpatch_ledger_up 1.0",
                 "knowpatch_queue_messages 3.0", "knowpatch_edit_apply_seconds_median",
                 "knowpatch_edit_apply_seconds_last"):
        assert line in text, line


EXPECTED_ROUTES = {
    ("/edits", "post"), ("/edits", "get"), ("/edits/{edit_id}", "get"), ("/edits/{edit_id}", "delete"),
    ("/edits/{edit_id}/rollback", "post"), ("/generate", "post"), ("/generate_stream", "post"), ("/score", "post"),
    ("/v1/completions", "post"), ("/v1/chat/completions", "post"), ("/v1/models", "get"), ("/health", "get"),
    ("/ready", "get"), ("/info", "get"), ("/metrics", "get"), ("/admin/export", "get"),
}


def has_example(content: dict[str, Any], schemas: dict[str, Any]) -> bool:
    for media in content.values():
        schema = media.get("schema", {})
        refs = [schema.get("$ref")] + [alt.get("$ref") for alt in schema.get("anyOf", []) + schema.get("oneOf", [])]
        if "example" in media or "examples" in media or \
                any(ref and "examples" in schemas[ref.rsplit("/", 1)[-1]] for ref in refs):
            return True
    return False


def test_openapi_lists_every_route_with_examples(api: Api) -> None:
    spec = api.as_(None).get("/openapi.json").json()
    assert {(path, method) for path, ops in spec["paths"].items() for method in ops} == EXPECTED_ROUTES
    for path, method in EXPECTED_ROUTES:
        op = spec["paths"][path][method]
        success = op["responses"].get("200") or op["responses"].get("202")
        assert has_example(success.get("content", {}), spec["components"]["schemas"]), (path, method)
        if "requestBody" in op:
            assert has_example(op["requestBody"]["content"], spec["components"]["schemas"]), (path, method)
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_unexpected_errors_are_500_in_the_error_shape(make_api: ApiFactory) -> None:
    api = make_api()
    with api.ledger.begin() as session:  # a ledger broken under the API: its query fails unexpectedly
        session.execute(text("DROP TABLE edits"))
    reply = api.client.get("/edits")
    assert reply.status_code == 500
    assert reply.json() == {"error": {"type": "InternalError",
                                      "message": "internal error; the server log has the details"}}


def test_lifespan_hooks_run_around_serving(sqlite_url: str) -> None:
    calls: list[str] = []

    @asynccontextmanager
    async def hook(app: FastAPI) -> AsyncIterator[None]:
        calls.append(f"start {app.title}")
        yield
        calls.append("stop")

    migrate(sqlite_url)
    engine = make_engine(sqlite_url)
    app = create_app(Settings(), session_factory=session_factory(engine), queue=LocalQueue(), backend=None,
                     lifespan_hooks=[hook])
    with serve(app) as url:
        assert calls == ["start knowpatch"] and httpx.get(url + "/health").status_code == 200
    assert calls == ["start knowpatch", "stop"]
    engine.dispose()


def test_the_api_does_not_import_torch_or_the_engine() -> None:
    code = ("import sys, api.app, api.backend_http; "
            "engine = sorted(m for m in sys.modules if m.startswith('service.engine.')); "
            "print('torch' in sys.modules, engine)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False ['service.engine.gates', 'service.engine.types', 'service.engine.validation']"
