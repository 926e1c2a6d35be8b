"""A ledger database that goes away under a running API (a real Postgres outage: connections refused
and cut): every route that needs it answers 503 with Retry-After, not 500; /ready and /metrics say
so; and the same process serves again once the database is back."""
from __future__ import annotations

from api.errors import RETRY_AFTER_S
from tests.api.conftest import ApiFactory, edit_body
from tests.conftest import postgres_down


def test_a_ledger_outage_is_a_503_with_retry_after_and_the_api_recovers(make_api: ApiFactory, pg_url: str) -> None:
    api = make_api(pg_url)
    accepted = api.client.post("/edits", json=edit_body())
    assert accepted.status_code == 202, accepted.text
    edit_id = accepted.json()["id"]
    needs_the_ledger = [
        ("alice", "POST", "/edits", edit_body()), ("alice", "GET", "/edits", None), ("alice", "GET", f"/edits/{edit_id}", None),
        ("alice", "DELETE", f"/edits/{edit_id}", None), ("root", "POST", f"/edits/{edit_id}/rollback", {"reason": "wrong"}),
    ]
    with postgres_down(pg_url):
        for who, method, path, body in needs_the_ledger:
            reply = api.as_(who).request(method, path, json=body)
            assert reply.status_code == 503, (method, path, reply.status_code, reply.text)
            assert reply.headers["Retry-After"] == str(RETRY_AFTER_S), (method, path)
            error = reply.json()["error"]
            assert error["type"] == "Unavailable" and "the ledger database" in error["message"], (method, path, error)
            assert "not currently accepting connections" in error["message"] or "terminating" in error["message"]
        ready = api.as_(None).get("/ready")
        assert ready.status_code == 503 and "the ledger database" in ready.json()["checks"]["ledger"], ready.text
        assert "knowpatch_ledger_up 0.0" in api.as_(None).get("/metrics").text

    # Back, with no restart: the pool's dead connections are replaced and nothing was half-written.
    again = api.client.post("/edits", json=edit_body())
    assert again.status_code == 202, again.text
    page = api.client.get("/edits").json()["items"]
    assert [item["id"] for item in page] == [again.json()["id"], edit_id]
    assert api.client.get(f"/edits/{edit_id}").json()["status"] == "queued"
    assert api.as_(None).get("/ready").json()["checks"]["ledger"] == "ok"
