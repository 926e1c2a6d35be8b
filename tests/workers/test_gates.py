"""Quality gates in the worker, on a real ledger (SQLite) and a real tiny editor: an edit that fails a
gate is rejected with its measurements and changes nothing; its batch-mates and the next edit apply.
A dry run is computed alone in its turn, recorded 'checked' with what a real edit would get, and never served."""
from __future__ import annotations

from pathlib import Path

import pytest

from service.edits import NewEdit
from service.engine.gates import Gates, Probe
from service.engine.types import EditRequest
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


def submit_new(sessions, edits: list[NewEdit]) -> list[str]:
    """Queue edits as POST /edits stores them (NewEdit.stored: the dry_run flag included); their ids."""
    with sessions() as session:
        rows, _ = repo.create_edits(session, [e.stored() for e in edits], subjects=[e.request.subject for e in edits],
                                    requested_by="test", method="alphaedit", idempotency_key=None)
        session.commit()
        return [row.id for row in rows]


def new_edit(subject: str, dry_run: bool = False, gates: Gates | None = None) -> NewEdit:
    return NewEdit(EditRequest(subject, f"{subject} is located in the city of", "Rome", "Paris"),
                   gates=gates, dry_run=dry_run)


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


def test_a_dry_run_is_computed_alone_and_checked_but_never_served(parts, sessions):  # noqa: F811
    editor = _editor(parts)
    worker = Worker(editor, sessions, LocalQueue(), batch_size=4)  # the shipped probes: every record has gates
    first, dry, second, third = submit_new(sessions, [new_edit(SUBJECTS[0]), new_edit(SUBJECTS[1], dry_run=True),
                                                      new_edit(SUBJECTS[2]), new_edit(SUBJECTS[3])])
    drain(worker)
    with sessions() as session:
        edits = {i: repo.get_edit(session, i) for i in (first, dry, second, third)}
        checked = edits[dry]
        assert checked.status == "checked" and checked.request["dry_run"] is True and checked.error is None
        assert checked.model_version is None and repo.edit_factors(session, dry) == []
        assert checked.metrics_before["prompt"] and checked.metrics_after["gates"] and checked.settings
        assert checked.metrics_after["gates_s"] >= 0
        event = repo.edit_events(session, dry)[-1]
        assert event.event == "checked" and event.reason.startswith("dry run: a real edit would be applied")
        # the batch ended before the dry run, which came alone; the two edits after it were batched together
        batches = [edits[i].batch_id for i in (first, dry, second, third)]
        assert len(set(batches)) == 3 and batches[2] == batches[3]
        assert [edits[i].status for i in (first, second, third)] == ["applied"] * 3
        assert [e.edit_id for e in repo.active_edits(session)] == [first, second, third]
        assert editor.version == edits[third].seq and repo.head_digest(session) == editor.weights_digest()
        assert repo.verify_chain(session) == 3  # a link per applied edit, none for the dry run
        assert "dry_run" not in edits[first].request  # a real edit's stored request is as before


def test_a_dry_run_measures_what_the_real_edit_gets_and_says_which_gate_it_would_fail(parts, sessions):  # noqa: F811
    editor = _editor(parts)
    worker = Worker(editor, sessions, LocalQueue(), batch_size=4, gates=Gates())
    base = editor.weights_digest()
    dry, real = submit_new(sessions, [new_edit(SUBJECTS[0], dry_run=True, gates=Gates(min_efficacy=1.01)),
                                      new_edit(SUBJECTS[0])])
    worker.process_next()
    assert editor.weights_digest() == base and editor.version == 0  # nothing installed
    drain(worker)
    with sessions() as session:
        checked, applied = repo.get_edit(session, dry), repo.get_edit(session, real)
        assert checked.status == "checked" and applied.status == "applied", applied.error
        gate = checked.metrics_after["gates"]["efficacy"]
        assert gate["passed"] is False and gate["threshold"] == 1.01
        reason = repo.edit_events(session, dry)[-1].reason
        assert reason.startswith("dry run: a real edit would be rejected by the quality gate efficacy"), reason
        # the same weights, computed alone both times: the dry run predicted the real edit
        assert checked.metrics_before == applied.metrics_before
        assert checked.metrics_after["prompt"] == applied.metrics_after["prompt"]
        assert repo.status_counts(session)["rejected"] == 0
