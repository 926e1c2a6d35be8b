"""Quality gates over real HTTP with a real worker on each ledger (SQLite, Postgres): a dry run recorded
`checked` and never served, refused rollback and cancel, and the gate metrics /metrics reads from the ledger."""
from __future__ import annotations

import re
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from service.ledger import repository as repo
from service.ledger.db import make_engine, migrate, session_factory
from service.ledger.models import Operation
from service.queue import LocalQueue
from tests.api.conftest import Api, ApiRunner, edit_body
from tests.workers.test_worker import _editor, parts  # noqa: F401 (the module's fixture)
from workers.worker import Worker

WAIT_S = 60.0  # a busy 2-core machine computes a tiny-model edit in seconds; leave room


@dataclass
class Stack:
    api: Api
    worker: Worker

    def submit(self, body: dict[str, Any]) -> str:
        reply = self.api.client.post("/edits", json=body)
        assert reply.status_code == 202, reply.text
        return str(reply.json()["id"])

    def settled(self, edit_id: str) -> dict[str, Any]:
        """The record once the worker has finished with the edit."""
        deadline = time.monotonic() + WAIT_S
        while (record := self.api.client.get(f"/edits/{edit_id}").json())["status"] in ("queued", "applying"):
            assert time.monotonic() < deadline, f"edit {edit_id} is still {record['status']}"
            time.sleep(0.1)
        return dict(record)


@pytest.fixture
def stack(parts, ledger_url: str) -> Iterator[Stack]:  # noqa: F811
    """The API over HTTP and a Worker (batch size 4, the shipped gates) running in a thread on one ledger."""
    migrate(ledger_url)
    engine = make_engine(ledger_url)
    queue = LocalQueue()
    worker = Worker(_editor(parts), session_factory(engine), queue, batch_size=4)
    worker.start()
    runner = ApiRunner(ledger_url)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), kwargs={"poll_s": 0.2}, daemon=True)
    thread.start()
    yield Stack(runner.start(queue=queue), worker)
    stop.set()
    thread.join(WAIT_S)
    runner.close()
    engine.dispose()


def gauge(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} is not in /metrics"
    return float(found.group(1))


def test_a_dry_run_over_http_is_checked_never_served_and_counted(stack: Stack) -> None:
    passed = stack.settled(stack.submit(edit_body()))
    rejected = stack.settled(stack.submit(edit_body(gates={"min_efficacy": 1.0})))
    assert (passed["status"], rejected["status"]) == ("applied", "rejected"), (passed["error"], rejected["error"])
    editor = stack.worker.editor
    digest, version = editor.weights_digest(), editor.version

    dry_id = stack.submit(edit_body(dry_run=True))
    dry = stack.settled(dry_id)
    assert dry["status"] == "checked" and dry["request"]["dry_run"] is True, dry["error"]
    assert dry["model_version"] is None and dry["factors"] == [] and dry["history"][-1]["event"] == "checked"
    assert dry["metrics_before"]["prompt"] and dry["metrics_after"]["gates"] and dry["settings"]
    assert (editor.weights_digest(), editor.version) == (digest, version) == (digest, passed["seq"])
    listed = stack.api.client.get("/edits", params={"status": "checked"}).json()["items"]
    assert [e["id"] for e in listed] == [dry_id]

    root = stack.api.as_("root")
    refused = root.post(f"/edits/{dry_id}/rollback", json={"reason": "try"})
    assert refused.status_code == 409 and "dry run" in refused.json()["error"]["message"]
    assert root.delete(f"/edits/{dry_id}").status_code == 409

    text = stack.api.as_(None).get("/metrics").text
    for outcome in ("passed", "rejected", "checked"):
        assert gauge(text, f'knowpatch_gate_evaluations{{outcome="{outcome}"}}') == 1
    assert gauge(text, 'knowpatch_gate_rejections{gate="efficacy"}') == 1
    assert gauge(text, 'knowpatch_gate_rejections{gate="probe"}') == 0
    assert gauge(text, 'knowpatch_edits{status="checked"}') == 1
    seconds = [r["metrics_after"]["gates_s"] for r in (passed, rejected, dry)]
    assert gauge(text, "knowpatch_gate_seconds_last") == pytest.approx(seconds[-1])  # the dry run came last
    assert gauge(text, "knowpatch_gate_seconds_median") == pytest.approx(statistics.median(seconds))
    assert gauge(text, "knowpatch_ledger_head_seq") == passed["seq"]  # neither made a chain link


def _finish(api: Api, status: str, gates: dict[str, Any] | None) -> None:
    """Queue an edit and record it as the worker would, with `gates` as its gate results (None: a
    record from before the gates, without the key)."""
    body = edit_body()
    with api.ledger.begin() as session:
        [edit], _ = repo.create_edits(session, [body], subjects=[body["subject"]], requested_by="test",
                                      method="alphaedit", idempotency_key=None)
        [op] = repo.mark_applying(session, [session.get(Operation, edit.seq)], uuid.uuid4().hex)
        after = {"prompt": {"target_new": 0.5}} | ({} if gates is None else {"gates": gates, "gates_s": 0.25})
        if status == "rejected":
            repo.record_rejected(session, op, error="rejected", metrics_before=None, metrics_after=after)
        else:
            repo.record_checked(session, op, verdict="dry run", metrics_before=None, metrics_after=after)


def test_rejections_are_counted_by_the_gate_that_failed(any_ledger_api: Api) -> None:
    api = any_ledger_api
    probe = {"value": False, "threshold": " Paris", "held_before": True, "passed": False}
    failed = {"value": 0.1, "threshold": 0.9, "passed": False}
    _finish(api, "rejected", {"probe:The capital of France is": probe})
    _finish(api, "rejected", {"probe:The capital of France is": probe, "generalisation": failed})
    _finish(api, "checked", {})  # no gate measured: not an evaluation
    _finish(api, "checked", None)  # a record without gates
    text = api.as_(None).get("/metrics").text
    assert gauge(text, 'knowpatch_gate_rejections{gate="probe"}') == 1
    assert gauge(text, 'knowpatch_gate_rejections{gate="generalisation"}') == 1  # a threshold gate names it first
    assert gauge(text, 'knowpatch_gate_evaluations{outcome="rejected"}') == 2
    assert gauge(text, 'knowpatch_gate_evaluations{outcome="checked"}') == 0
    assert gauge(text, "knowpatch_gate_seconds_median") == 0.25
