"""The worker loop on a real ledger (SQLite) and a real tiny editor: apply, roll back, replay from
the factor-store snapshot and from every factor, with the same weights bit for bit."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from service.engine.editor import Editor
from service.engine.types import HyperParams
from service.ledger import repository as repo
from service.ledger.db import make_engine, migrate, session_factory
from service.model.loading import load_model
from service.queue.local import LocalQueue
from tests.engine.conftest import CACHE_DIR, tiny_model, wikitext_moments
from workers.worker import Worker

HP = HyperParams(layers=(1, 2, 3), v_num_grad_steps=5, stats_tokens=64, stats_seq_len=64, nullspace_threshold=1e-9)
SUBJECTS = ["Eiffel Tower", "Big Ben", "Colosseum", "Golden Gate Bridge"]


@pytest.fixture(scope="module")
def parts():
    torch.set_num_threads(1)
    tokenizer = load_model("smollm2", cache_dir=CACHE_DIR).tokenizer
    moments = wikitext_moments(tiny_model("llama", tokenizer), HP)
    return tokenizer, moments


def _editor(parts) -> Editor:
    tokenizer, moments = parts
    return Editor(tiny_model("llama", tokenizer), HP, moments, templates=["{}"], keep_factors=False)


@pytest.fixture
def sessions(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    migrate(url)
    engine = make_engine(url)
    yield session_factory(engine)
    engine.dispose()


def _submit(sessions, subjects: list[str]) -> list[str]:
    requests = [{"subject": s, "prompt": f"{s} is located in the city of", "target_new": "Rome",
                 "target_true": "Paris", "rephrase_prompts": [], "locality_prompts": []} for s in subjects]
    with sessions() as session:
        edits = repo.create_edits(session, requests, subjects=subjects, requested_by="test", method="alphaedit",
                                  idempotency_key=None)
        session.commit()
        return [e.id for e in edits]


def _drain(worker: Worker) -> None:
    while worker.process_next():
        pass


def test_edits_and_a_rollback_replay_to_the_same_weights_from_the_snapshot_and_from_scratch(
        parts, sessions, tmp_path, caplog):
    snapshot = tmp_path / "snap.pt"
    live = Worker(_editor(parts), sessions, LocalQueue(), batch_size=2, snapshot_path=snapshot, snapshot_every=2)
    ids = _submit(sessions, SUBJECTS[:3])
    _drain(live)
    assert snapshot.is_file()  # written after the first 2 operations
    with sessions() as session:
        repo.request_rollback(session, ids[0], reason="wrong", actor="test")
        session.commit()
    _submit(sessions, SUBJECTS[3:])
    _drain(live)  # after the snapshot: one rollback and one more edit
    with sessions() as session:
        statuses = [repo.get_edit(session, i).status for i in ids]
        assert statuses == ["rolled_back", "applied", "applied"]
        assert repo.get_edit(session, ids[1]).settings["hparams"]["layers"] == [1, 2, 3]
    served = live.editor.weights_digest()

    caplog.set_level(logging.INFO, logger="workers.worker")
    restarted = Worker(_editor(parts), sessions, LocalQueue(), snapshot_path=snapshot)
    assert restarted.replay() == 3
    assert "snapshot at seq" in caplog.text and restarted.editor.weights_digest() == served

    caplog.clear()
    cold = Worker(_editor(parts), sessions, LocalQueue())  # no snapshot: every factor read
    assert cold.replay() == 3
    assert "all factors read" in caplog.text and cold.editor.weights_digest() == served


def test_a_snapshot_of_another_ledger_is_ignored(parts, sessions, tmp_path, caplog):
    snapshot = tmp_path / "snap.pt"
    live = Worker(_editor(parts), sessions, LocalQueue(), snapshot_path=snapshot, snapshot_every=1)
    _submit(sessions, SUBJECTS[:2])
    _drain(live)
    state = torch.load(snapshot, weights_only=True)
    state["hash"] = "0" * 64  # not the chain hash of its seq in this ledger
    torch.save(state, snapshot)
    caplog.set_level(logging.INFO)
    restarted = Worker(_editor(parts), sessions, LocalQueue(), snapshot_path=snapshot)
    restarted.replay()
    assert "not a state of this ledger" in caplog.text
    assert restarted.editor.weights_digest() == live.editor.weights_digest()


def test_a_corrupted_factor_fails_the_rollback_that_reads_it(parts, sessions, tmp_path):
    live = Worker(_editor(parts), sessions, LocalQueue())
    ids = _submit(sessions, SUBJECTS[:1])
    _drain(live)
    with sessions() as session:
        from service.ledger.models import EditFactor

        row = session.get(EditFactor, (ids[0], 1))
        row.r = bytes(len(row.r))
        session.commit()
        repo.request_rollback(session, ids[0], reason="x", actor="test")
        session.commit()
    served = live.editor.weights_digest()
    assert live.process_next()
    with sessions() as session:  # the rollback fails with the reason; the model and the edit stay
        events = [e.reason or "" for e in repo.edit_events(session, ids[0])]
        assert repo.get_edit(session, ids[0]).status == "applied"
    assert any("do not match their checksum" in reason for reason in events), events
    assert live.editor.weights_digest() == served


def test_a_snapshot_that_does_not_reproduce_the_digest_is_replaced(parts, sessions, tmp_path, caplog):
    snapshot = tmp_path / "snap.pt"
    live = Worker(_editor(parts), sessions, LocalQueue(), snapshot_path=snapshot, snapshot_every=1)
    _submit(sessions, SUBJECTS[:2])
    _drain(live)
    state = torch.load(snapshot, weights_only=True)
    state["sums"][1] += 2 ** 40  # right ledger position, wrong sums (2^-12 in weight units)
    torch.save(state, snapshot)
    caplog.set_level(logging.INFO)
    restarted = Worker(_editor(parts), sessions, LocalQueue(), snapshot_path=snapshot)
    restarted.replay()
    assert "do not reproduce the recorded weights" in caplog.text
    assert restarted.editor.weights_digest() == live.editor.weights_digest()
    assert torch.equal(torch.load(snapshot, weights_only=True)["sums"][1], restarted.editor.store._sum[1])
