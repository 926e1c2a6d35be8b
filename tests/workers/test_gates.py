"""Quality gates in the worker, on a real ledger (SQLite) and a real tiny editor: an edit that fails a
gate is rejected with its measurements and changes nothing; its batch-mates and the next edit apply."""
from __future__ import annotations

from pathlib import Path

import pytest

from service.engine.gates import Gates, Probe
from service.ledger import repository as repo
from service.ledger.db import make_engine, migrate, session_factory
from service.queue.local import LocalQueue
from tests.workers.test_worker import SUBJECTS, _editor, parts  # noqa: F401 (the module's fixture)
from workers.worker import Worker


@pytest.fixture
def sessions(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    migrate(url)
    engine = make_engine(url)
    yield session_factory(engine)
    engine.dispose()


def submit(sessions, subject: str, gates: dict | None, target_new: str = "Rome", target_true: str = "Paris") -> str:
    request = {"subject": subject, "prompt": f"{subject} is located in the city of", "target_new": target_new,
               "target_true": target_true, "rephrase_prompts": [], "locality_prompts": []}
    if gates is not None:
        request["gates"] = gates
    with sessions() as session:
        [edit], _ = repo.create_edits(session, [request], subjects=[subject], requested_by="test",
                                      method="alphaedit", idempotency_key=None)
        session.commit()
        return edit.id


def drain(worker: Worker) -> None:
    while worker.process_next():
        pass


def test_a_failed_gate_rejects_the_edit_and_changes_nothing_then_the_next_applies(parts, sessions):  # noqa: F811
    editor = _editor(parts)
    worker = Worker(editor, sessions, LocalQueue(), batch_size=1)
    digest = editor.weights_digest()
    bad = submit(sessions, SUBJECTS[0], {"min_efficacy": 1.01})
    drain(worker)
    assert editor.weights_digest() == digest and editor.version == 0 and len(editor.store) == 0
    with sessions() as session:
        edit = repo.get_edit(session, bad)
        assert edit.status == "rejected" and "efficacy" in (edit.error or "")
        gate = edit.metrics_after["gates"]["efficacy"]
        assert gate["threshold"] == 1.01 and gate["passed"] is False and 0 <= gate["value"] <= 1
        assert edit.metrics_after["gates_s"] >= 0 and edit.metrics_before["prompt"]
        assert repo.edit_factors(session, bad) == [] and repo.head(session)[0] == 0  # no chain link
        assert [e.event for e in repo.edit_events(session, bad)][-1] == "rejected"
        assert repo.status_counts(session)["rejected"] == 1

    probe = {"prompt": "The capital of France is", "expected": " Paris"}  # not known to the tiny model
    good = submit(sessions, SUBJECTS[1], {"min_efficacy": 0.0, "probes": [probe]})
    drain(worker)
    with sessions() as session:
        edit = repo.get_edit(session, good)
        assert edit.status == "applied", edit.error
        gates = edit.metrics_after["gates"]
        assert gates["efficacy"]["passed"] is True
        assert gates["probe:The capital of France is"] == {
            "value": False, "threshold": " Paris", "held_before": False, "passed": True}
        assert repo.head_digest(session) == editor.weights_digest() != digest
        repo.verify_chain(session)


def test_a_rejected_edit_does_not_take_its_batch_mates_down(parts, sessions):  # noqa: F811
    editor = _editor(parts)
    worker = Worker(editor, sessions, LocalQueue(), batch_size=2)
    bad = submit(sessions, SUBJECTS[0], {"min_efficacy": 1.01})
    good = submit(sessions, SUBJECTS[1], None)
    drain(worker)
    with sessions() as session:
        assert repo.get_edit(session, bad).status == "rejected"
        applied = repo.get_edit(session, good)
        assert applied.status == "applied" and applied.batch_id.endswith("-1")  # computed alone
        assert [e.edit_id for e in repo.active_edits(session)] == [good]
        assert repo.head_digest(session) == editor.weights_digest()


def test_a_server_probe_naming_the_subject_is_skipped(parts, sessions):  # noqa: F811
    editor = _editor(parts)
    subject = SUBJECTS[2]
    prompt = f"{subject} is located in the city of"
    server = Gates(probes=(Probe(prompt, " Paris", server=True),))
    worker = Worker(editor, sessions, LocalQueue(), batch_size=1, gates=server)
    edit_id = submit(sessions, subject, None)
    drain(worker)
    with sessions() as session:
        edit = repo.get_edit(session, edit_id)
    assert edit.status == "applied" and edit.metrics_after["gates"] == {}
