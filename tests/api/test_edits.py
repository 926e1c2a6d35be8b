"""The /edits routes over real HTTP on real ledgers: submit, inspect, list, cancel, roll back."""
from __future__ import annotations

import uuid
from typing import get_args

import numpy as np
import redis

from api.schemas.edits import EditStatus
from service.ledger import repository as repo
from service.ledger.codec import StoredFactor
from service.ledger.models import EDIT_STATUSES
from service.queue import LocalQueue, OperationQueue, RedisStreamQueue
from tests.api.conftest import Api, ApiFactory, edit_body


def queued_seqs(queue: OperationQueue) -> list[int]:
    return sorted(queue.pending_seqs())


def random_factors(rng: np.random.Generator) -> list[StoredFactor]:
    def vector(n: int) -> np.ndarray:
        return rng.standard_normal(n, dtype=np.float32)

    return [StoredFactor(layer=layer, r=vector(4), a=vector(6), k=vector(6)) for layer in (4, 5)]


def apply_all(api: Api) -> None:
    """Do what the worker does for every queued edit: claim, then record as applied."""
    rng = np.random.default_rng(0)
    with api.ledger.begin() as s:
        ops = repo.mark_applying(s, repo.next_operations(s, 256), batch_id=uuid.uuid4().hex)
    with api.ledger.begin() as s:
        for op in ops:
            repo.record_applied(s, s.merge(op), factors=random_factors(rng),
                                metrics_before={"prompt": {"target_new": 0.1}},
                                metrics_after={"prompt": {"target_new": 0.9}}, update_norms={4: 1.0, 5: 2.0},
                                layers=[4, 5], weights_digest="d", model_version=ops[-1].seq)


def test_submit_one_edit_records_it_queued_and_enqueues_it(any_ledger_api: Api) -> None:
    api = any_ledger_api
    body = edit_body("Eiffel Tower", rephrase_prompts=["Where is the Eiffel Tower? In"], metadata={"ticket": "KB-1"})
    reply = api.client.post("/edits", json=body)
    assert reply.status_code == 202, reply.text
    accepted = reply.json()
    assert reply.headers["Location"] == f"/edits/{accepted['id']}"
    assert accepted["status"] == "queued" and accepted["queue_position"] == 0 and accepted["created_at"]

    record = api.client.get(f"/edits/{accepted['id']}").json()
    assert record["status"] == "queued" and record["requested_by"] == "alice" and record["method"] == "alphaedit"
    assert record["request"]["metadata"] == {"ticket": "KB-1"}
    assert record["request"]["rephrase_prompts"] == ["Where is the Eiffel Tower? In"]
    assert record["queue_position"] == 0 and record["factors"] == [] and record["applied_at"] is None
    assert [(h["event"], h["actor"], h["seq"]) for h in record["history"]] == [("queued", "alice", record["seq"])]
    assert queued_seqs(api.queue) == [record["seq"]]


def test_submit_a_list_keeps_its_order(any_ledger_api: Api) -> None:
    api = any_ledger_api
    reply = api.client.post("/edits", json={"edits": [edit_body(), edit_body(), edit_body(method="alphaedit")]})
    assert reply.status_code == 202, reply.text
    edits = reply.json()["edits"]
    assert [e["queue_position"] for e in edits] == [0, 1, 2]
    assert reply.headers["Location"] == f"/edits/{edits[0]['id']}"
    seqs = [api.client.get(f"/edits/{e['id']}").json()["seq"] for e in edits]
    assert seqs == sorted(seqs) and queued_seqs(api.queue) == seqs


def test_idempotency_key_replays_and_refuses_a_different_body(any_ledger_api: Api) -> None:
    api = any_ledger_api
    body, key = {"edits": [edit_body(), edit_body()]}, {"Idempotency-Key": "req-1"}
    first = api.client.post("/edits", json=body, headers=key)
    before = api.counts()
    again = api.client.post("/edits", json=body, headers=key)
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert [e["id"] for e in again.json()["edits"]] == [e["id"] for e in first.json()["edits"]]
    assert api.counts() == before and api.queue.depth() == 2

    other = api.client.post("/edits", json=edit_body(), headers=key)
    assert other.status_code == 409 and "different request" in other.json()["error"]["message"]
    assert api.counts() == before
    root = api.as_("root")  # keys are per requester: another one may reuse the name
    assert root.post("/edits", json=body, headers=key).status_code == 202


def test_the_queue_is_bounded_in_all_and_per_key(make_api: ApiFactory, ledger_url: str) -> None:
    api = make_api(ledger_url, max_queued=4, max_queued_per_key=3)
    assert api.client.post("/edits", json={"edits": [edit_body(), edit_body()]}).status_code == 202
    before = api.counts()
    refused = api.client.post("/edits", json={"edits": [edit_body(), edit_body()]})  # alice: 2 + 2 > 3
    assert refused.status_code == 429 and refused.headers["Retry-After"].isdigit()
    assert refused.json()["error"]["type"] == "Overloaded" and "KNOWPATCH_MAX_QUEUED_PER_KEY" in refused.text
    assert api.counts() == before and api.queue.depth() == 2  # nothing written, nothing published
    root = api.as_("root")
    assert root.post("/edits", json={"edits": [edit_body(), edit_body()]}).status_code == 202  # 4 in all
    full = root.post("/edits", json=edit_body())
    assert full.status_code == 429 and "KNOWPATCH_MAX_QUEUED)" in full.text
    first = api.client.get("/edits", params={"limit": 1}).json()["items"][0]["id"]
    assert root.delete(f"/edits/{first}").status_code == 200  # a cancelled edit frees its place
    assert root.post("/edits", json=edit_body()).status_code == 202


def test_list_filters_and_pages_with_a_cursor(api: Api) -> None:
    ids = [api.client.post("/edits", json=edit_body("Colosseum" if i % 2 else None)).json()["id"] for i in range(5)]
    api.client.delete(f"/edits/{ids[0]}")

    page = api.client.get("/edits", params={"limit": 2}).json()
    seen = [e["id"] for e in page["items"]]
    while page["next_cursor"]:
        page = api.client.get("/edits", params={"limit": 2, "cursor": page["next_cursor"]}).json()
        seen += [e["id"] for e in page["items"]]
    assert seen == ids[::-1]  # newest first, each once

    colosseum = api.client.get("/edits", params={"subject": "Colosseum"}).json()
    assert {e["id"] for e in colosseum["items"]} == {ids[1], ids[3]} and colosseum["next_cursor"] is None
    cancelled = api.client.get("/edits", params={"status": "cancelled"}).json()["items"]
    assert [e["id"] for e in cancelled] == [ids[0]]

    for params, field in (({"status": "done"}, "status"), ({"limit": 0}, "limit"), ({"limit": 201}, "limit"),
                          ({"cursor": "%%%"}, "cursor")):
        reply = api.client.get("/edits", params=params)
        assert reply.status_code == 422 and field in reply.json()["error"]["message"], reply.text


def test_cancel_only_while_queued(api: Api) -> None:
    edit_id = api.client.post("/edits", json=edit_body()).json()["id"]
    reply = api.client.delete(f"/edits/{edit_id}")
    assert reply.status_code == 200
    record = reply.json()
    assert record["status"] == "cancelled" and [h["event"] for h in record["history"]] == ["queued", "cancelled"]
    before = api.counts()
    again = api.client.delete(f"/edits/{edit_id}")
    assert again.status_code == 409 and "only queued edits can be cancelled" in again.json()["error"]["message"]
    assert api.counts() == before


def test_rollback_is_refused_while_queued_and_queued_once_applied(any_ledger_api: Api) -> None:
    api = any_ledger_api
    edit_id = api.client.post("/edits", json=edit_body()).json()["id"]
    before = api.counts()
    root = api.as_("root")
    refused = root.post(f"/edits/{edit_id}/rollback", json={"reason": "wrong"})
    assert refused.status_code == 409 and refused.json()["error"]["type"] == "Conflict"
    assert "has not been applied yet; cancel it instead" in refused.json()["error"]["message"]
    assert api.counts() == before

    apply_all(api)
    record = api.client.get(f"/edits/{edit_id}").json()
    assert record["status"] == "applied" and record["layers"] == [4, 5] and record["model_version"] == record["seq"]
    assert record["update_norms"] == {"4": 1.0, "5": 2.0} and record["metrics_after"]["prompt"]["target_new"] == 0.9
    assert [f["layer"] for f in record["factors"]] == [4, 5]
    assert record["factors"][0]["shapes"] == {"r": [4], "a": [6], "k": [6]}
    assert len(record["factors"][0]["checksum"]) == 64
    assert [h["event"] for h in record["history"]] == ["queued", "applying", "applied"]

    assert root.post(f"/edits/{edit_id}/rollback", json={"reason": "  "}).status_code == 422
    assert root.post(f"/edits/{edit_id}/rollback", json={}).status_code == 422
    reply = root.post(f"/edits/{edit_id}/rollback", json={"reason": "KB-1 was wrong"})
    assert reply.status_code == 202, reply.text
    assert reply.json() == {"id": edit_id, "status": "queued", "edit_status": "applied",
                            "rollback_seq": reply.json()["rollback_seq"], "queue_position": 0}
    assert root.post(f"/edits/{edit_id}/rollback", json={"reason": "again"}).status_code == 409
    assert reply.json()["rollback_seq"] in api.queue.pending_seqs()
    history = api.client.get(f"/edits/{edit_id}").json()["history"]
    assert (history[-1]["event"], history[-1]["actor"], history[-1]["reason"]) == \
        ("rollback_requested", "root", "KB-1 was wrong")
    assert api.client.delete(f"/edits/{edit_id}").status_code == 409  # applied: roll back, not cancel


def test_unknown_edit_is_404(api: Api) -> None:
    for edit_id in (str(uuid.uuid4()), "not-a-uuid"):
        assert api.client.get(f"/edits/{edit_id}").status_code == 404
        assert api.client.delete(f"/edits/{edit_id}").status_code == 404
        reply = api.as_("root").post(f"/edits/{edit_id}/rollback", json={"reason": "x"})
        assert reply.status_code == 404 and reply.json()["error"]["type"] == "NotFound"
    assert api.counts()["edits"] == 0


def test_publish_failure_still_accepts_the_durable_edit(make_api: ApiFactory) -> None:
    queue = LocalQueue()
    api = make_api(queue=queue)
    queue.close()  # publish now raises Unavailable
    reply = api.client.post("/edits", json=edit_body())
    assert reply.status_code == 202
    assert api.client.get(f"/edits/{reply.json()['id']}").json()["status"] == "queued"


def test_redis_stream_queue_receives_the_seqs(make_api: ApiFactory, redis_url: str) -> None:
    stream = f"knowpatch-test:{uuid.uuid4().hex}"
    queue = RedisStreamQueue(redis_url, stream, f"g-{uuid.uuid4().hex[:8]}", "api-test")
    try:
        api = make_api(queue=queue)
        edits = api.client.post("/edits", json={"edits": [edit_body(), edit_body()]}).json()["edits"]
        seqs = [api.client.get(f"/edits/{e['id']}").json()["seq"] for e in edits]
        assert sorted(queue.pending_seqs()) == seqs
        assert api.client.get("/ready").json()["checks"]["queue"] == "ok"
    finally:
        queue.close()
        client = redis.Redis.from_url(redis_url)
        client.delete(stream)
        client.close()


def test_requester_is_the_key_name(api: Api) -> None:
    root = api.as_("root")
    edit_id = root.post("/edits", json=edit_body()).json()["id"]  # edits:admin implies edits:write
    cancelled = root.delete(f"/edits/{edit_id}").json()
    assert cancelled["requested_by"] == "root" and cancelled["history"][-1]["actor"] == "root"


def test_status_names_match_the_ledger() -> None:
    assert get_args(EditStatus) == EDIT_STATUSES


def test_an_edits_own_gates_are_stored_with_it_and_checked(api: Api) -> None:
    gates = {"min_efficacy": 0.5, "probes": [{"prompt": "The capital of France is", "expected": " Paris"}]}
    reply = api.client.post("/edits", json=edit_body("Eiffel Tower", gates=gates))
    assert reply.status_code == 202, reply.text
    record = api.client.get(f"/edits/{reply.json()['id']}").json()
    assert record["request"]["gates"] == {**gates, "min_generalisation": None, "max_locality_drop": None}
    assert api.client.post("/edits", json=edit_body("Big Ben", gates={"min_efficacy": 2})).status_code == 422
    assert api.client.post("/edits", json=edit_body("Big Ben", gates={"probes": [{"prompt": "x"}]})).status_code == 422
    assert api.client.get("/edits", params={"status": "rejected"}).json()["items"] == []
