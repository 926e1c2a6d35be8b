"""The ledger repository on real SQLite and real Postgres (ledger_url runs each test on both)."""
from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import timezone

import numpy as np
import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from service.errors import Conflict, InvalidRequest, LedgerCorrupt, NotFound
from service.ledger import repository as repo
from service.ledger.codec import StoredFactor, decode_array, encode_array
from service.ledger.db import make_engine, migrate, session_factory
from service.ledger.models import ZERO_HASH, EditFactor, Operation

LAYERS = (3, 4, 5)


@pytest.fixture
def db(ledger_url: str) -> Iterator[sessionmaker[Session]]:
    migrate(ledger_url)
    engine = make_engine(ledger_url)
    yield session_factory(engine)
    engine.dispose()


def request(subject: str, target: str = "Paris") -> dict:
    return {"subject": subject, "prompt": f"{subject} is located in", "target_new": target}


def create(db: sessionmaker[Session], *subjects: str, key: str | None = None, by: str = "alice") -> list[str]:
    with db.begin() as s:
        edits, _ = repo.create_edits(s, [request(x) for x in subjects], subjects=list(subjects), requested_by=by,
                                  method="alphaedit", idempotency_key=key)
        return [e.id for e in edits]


def factors_for(seed: int) -> list[StoredFactor]:
    rng = np.random.default_rng(seed)
    return [StoredFactor(layer=layer, r=rng.standard_normal(8, dtype=np.float32),
                         a=rng.standard_normal(12, dtype=np.float32), k=rng.standard_normal(12, dtype=np.float32))
            for layer in LAYERS]


def work_once(db: sessionmaker[Session], max_batch: int = 8) -> list[tuple[str, int]]:
    """What the worker does for one unit of work: claim, then record. Returns [(kind, seq)]."""
    batch_id = uuid.uuid4().hex
    with db.begin() as s:
        ops = repo.mark_applying(s, repo.next_operations(s, max_batch), batch_id)
        done = [(op.kind, op.seq) for op in ops]
    with db.begin() as s:
        for kind, seq in done:
            op = s.get(Operation, seq)
            version = done[-1][1]
            if kind == "apply":
                repo.record_applied(s, op, factors=factors_for(seq), metrics_before={"p": 0.1},
                                    metrics_after={"p": 0.9}, update_norms={layer: 1.5 for layer in LAYERS},
                                    layers=list(LAYERS), weights_digest=f"digest-{seq}", model_version=version)
            else:
                repo.record_rolled_back(s, op, weights_digest=f"digest-{seq}", model_version=version)
    return done


def rollback(db: sessionmaker[Session], edit_id: str, reason: str = "wrong fact") -> int:
    with db.begin() as s:
        return repo.request_rollback(s, edit_id, reason=reason, actor="bob").seq


def status(db: sessionmaker[Session], edit_id: str) -> str:
    with db() as s:
        return repo.get_edit(s, edit_id).status


# --------------------------------------------------------------------------- codec


@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "uint8", "bool"])
def test_codec_round_trip_is_exact(dtype: str) -> None:
    if dtype.startswith("float"):
        arr = np.array([[0.0, -0.0, 1e-42, np.inf], [-np.inf, np.nan, 1e30, -7.25]], dtype=dtype)
    else:
        arr = (np.arange(8).reshape(2, 4) * 37 % 5).astype(dtype)
    data, name, shape = encode_array(arr)
    back = decode_array(data, name, shape)
    assert back.dtype == arr.dtype and back.shape == arr.shape and back.flags.writeable
    assert back.tobytes() == arr.tobytes()  # bit for bit (also keeps -0.0 and subnormals)


def test_codec_stores_little_endian_and_c_order() -> None:
    big = np.arange(6, dtype=">f4").reshape(2, 3)
    data, name, shape = encode_array(np.asfortranarray(big))
    assert (name, shape) == ("float32", [2, 3])
    assert data == np.arange(6, dtype="<f4").tobytes()
    with pytest.raises(LedgerCorrupt):
        decode_array(data[:-1], name, shape)


def test_stored_factor_requires_1d_float32() -> None:
    with pytest.raises(ValueError, match="float32"):
        StoredFactor(layer=1, r=np.zeros(3), a=np.zeros(3, np.float32), k=np.zeros(3, np.float32))


# --------------------------------------------------------------------------- requests


def test_create_edits_in_order_with_events_and_positions(db: sessionmaker[Session]) -> None:
    ids = create(db, "Eiffel Tower", "Colosseum", "Big Ben")
    with db() as s:
        edits = [repo.get_edit(s, i) for i in ids]
        assert [e.status for e in edits] == ["queued"] * 3
        seqs = [e.seq for e in edits]
        assert seqs == sorted(seqs) and len(set(seqs)) == 3
        assert [repo.queue_position(s, e) for e in edits] == [0, 1, 2]
        assert edits[0].request == request("Eiffel Tower") and edits[0].requested_by == "alice"
        assert edits[0].created_at.tzinfo is not None and edits[0].created_at.utcoffset().total_seconds() == 0
        events = repo.edit_events(s, ids[0])
        assert [(e.event, e.seq, e.actor) for e in events] == [("queued", seqs[0], "alice")]
        assert repo.queued_operation_seqs(s) == seqs
        assert repo.queue_depth(s) == 3
        assert repo.status_counts(s)["queued"] == 3 and repo.status_counts(s)["applied"] == 0


def test_create_edits_rejects_bad_input(db: sessionmaker[Session]) -> None:
    with db() as s:
        with pytest.raises(InvalidRequest):
            repo.create_edits(s, [], subjects=[], requested_by="a", method="alphaedit", idempotency_key=None)
        with pytest.raises(InvalidRequest, match="subject"):
            repo.create_edits(s, [request("x")], subjects=[], requested_by="a", method="alphaedit",
                              idempotency_key=None)


def test_idempotency_key(db: sessionmaker[Session]) -> None:
    first = create(db, "A", "B", key="k1")
    assert create(db, "A", "B", key="k1") == first  # a retry: same edits, nothing new
    with db() as s:
        assert repo.queue_depth(s) == 2
    with pytest.raises(Conflict, match="k1"):
        create(db, "A", "C", key="k1")
    other = create(db, "A", "B", key="k1", by="carol")  # keys are per requester
    assert set(other).isdisjoint(first)


def test_concurrent_requests_with_one_key_create_once(db: sessionmaker[Session]) -> None:
    """The replay is decided under the ledger lock: the second request, waiting behind the first's
    open transaction, gets the first's edits and is told it is a replay (so it does not publish)."""
    first = db()
    first.begin()
    created, replayed = repo.create_edits(first, [request("A")], subjects=["A"], requested_by="a",
                                          method="alphaedit", idempotency_key="k")
    assert not replayed
    first_id = created[0].id
    result: list[tuple[list[str], bool]] = []

    def second() -> None:
        with db.begin() as s:
            edits, again = repo.create_edits(s, [request("A")], subjects=["A"], requested_by="a",
                                             method="alphaedit", idempotency_key="k")
            result.append(([e.id for e in edits], again))

    thread = threading.Thread(target=second)
    thread.start()
    thread.join(0.3)
    first.commit()
    first.close()
    thread.join(10)
    assert result == [([first_id], True)]
    with db() as s:
        assert repo.queue_depth(s) == 1


def test_get_edit_not_found(db: sessionmaker[Session]) -> None:
    with db() as s:
        missing = str(uuid.uuid4())
        with pytest.raises(NotFound, match=missing):
            repo.get_edit(s, missing)
        with pytest.raises(NotFound, match="not-a-uuid"):
            repo.get_edit(s, "not-a-uuid")
        with pytest.raises(NotFound):
            repo.edit_events(s, missing)


def test_list_edits_pagination_and_filters(db: sessionmaker[Session]) -> None:
    ids = create(db, "a", "b", "a", "b", "a", "b", "a")
    with db() as s:
        seen, cursor, pages = [], None, 0
        while True:
            page, cursor = repo.list_edits(s, limit=3, cursor=cursor)
            seen += [e.id for e in page]
            pages += 1
            if cursor is None:
                break
        assert pages == 3 and seen == ids[::-1]  # newest first, each once
        subject_a, next_cursor = repo.list_edits(s, subject="a")
        assert [e.id for e in subject_a] == [ids[6], ids[4], ids[2], ids[0]] and next_cursor is None
        page, cursor = repo.list_edits(s, subject="b", limit=2)
        assert [e.id for e in page] == [ids[5], ids[3]] and cursor is not None
        page, cursor = repo.list_edits(s, subject="b", limit=2, cursor=cursor)
        assert [e.id for e in page] == [ids[1]] and cursor is None
        exact, cursor = repo.list_edits(s, limit=7)
        assert len(exact) == 7 and cursor is None
    with db.begin() as s:
        repo.cancel_edit(s, ids[3], actor="alice")
    with db() as s:
        assert [e.id for e in repo.list_edits(s, status="cancelled")[0]] == [ids[3]]
        assert len(repo.list_edits(s, status="queued")[0]) == 6
        for bad in ("nonsense", "c2VxOng", ""):
            with pytest.raises(InvalidRequest, match="cursor"):
                repo.list_edits(s, cursor=bad)
        with pytest.raises(InvalidRequest, match="status"):
            repo.list_edits(s, status="done")
        with pytest.raises(InvalidRequest, match="limit"):
            repo.list_edits(s, limit=0)


def test_cancel_rules(db: sessionmaker[Session]) -> None:
    a, b, c = create(db, "A", "B", "C")
    with db.begin() as s:
        edit = repo.cancel_edit(s, b, actor="alice", reason="typo")
        assert edit.status == "cancelled"
    with db() as s:
        assert s.get(Operation, repo.get_edit(s, b).seq).status == "cancelled"
        assert [(e.event, e.reason) for e in repo.edit_events(s, b)][-1] == ("cancelled", "typo")
        assert repo.queue_position(s, repo.get_edit(s, c)) == 1  # the cancelled one no longer counts
    with pytest.raises(Conflict, match="cancelled"):
        with db.begin() as s:
            repo.cancel_edit(s, b, actor="alice")
    # The batch coalesces across the cancelled op (it is no longer in the queue).
    assert [kind for kind, _ in work_once(db)] == ["apply", "apply"]
    with pytest.raises(Conflict, match="applied.*roll it back"):
        with db.begin() as s:
            repo.cancel_edit(s, a, actor="alice")
    d = create(db, "D")[0]
    with db.begin() as s:
        repo.mark_applying(s, repo.next_operations(s, 8), "batch-x")
    with pytest.raises(Conflict, match="applying"):
        with db.begin() as s:
            repo.cancel_edit(s, d, actor="alice")


def test_mark_applying_skips_ops_cancelled_after_they_were_read(db: sessionmaker[Session]) -> None:
    a, b = create(db, "A", "B")
    with db() as s:
        ops = repo.next_operations(s, 8)
    with db.begin() as s:
        repo.cancel_edit(s, b, actor="alice")
    with db.begin() as s:
        claimed = repo.mark_applying(s, ops, "batch-1")
        assert [op.edit_id for op in claimed] == [a]
    assert status(db, b) == "cancelled" and status(db, a) == "applying"


def test_rollback_rules(db: sessionmaker[Session]) -> None:
    a, b = create(db, "A", "B")
    with pytest.raises(Conflict, match="queued.*cancel"):
        rollback(db, a)
    with db.begin() as s:
        ops = repo.mark_applying(s, repo.next_operations(s, 1), "batch-1")
    with pytest.raises(Conflict, match="applying"):
        rollback(db, a)
    with db.begin() as s:
        repo.record_failed(s, ops[0], error="update norm 1e9 is implausibly large")
    assert status(db, a) == "failed"
    with db() as s:
        assert repo.get_edit(s, a).error == "update norm 1e9 is implausibly large"
        assert repo.edit_events(s, a)[-1].event == "failed"
    with pytest.raises(Conflict, match="failed.*nothing to roll back"):
        rollback(db, a)

    work_once(db)
    assert status(db, b) == "applied"
    seq = rollback(db, b, reason="source retracted")
    with pytest.raises(Conflict, match="already has a rollback queued"):
        rollback(db, b)
    with db() as s:
        assert [e.event for e in repo.edit_events(s, b)][-1] == "rollback_requested"
        assert repo.queued_operation_seqs(s) == [seq]

    # A failed rollback leaves the edit applied, and a new rollback may be requested.
    with db.begin() as s:
        ops = repo.mark_applying(s, repo.next_operations(s, 8), "batch-2")
        assert [op.kind for op in ops] == ["rollback"]
        repo.record_failed(s, ops[0], error="worker out of memory")
    assert status(db, b) == "applied"
    rollback(db, b, reason="source retracted")
    assert work_once(db)[0][0] == "rollback"
    with db() as s:
        edit = repo.get_edit(s, b)
        assert (edit.status, edit.rollback_reason) == ("rolled_back", "source retracted")
        assert edit.rolled_back_at is not None and edit.rolled_back_at.tzinfo is not None
        last = repo.edit_events(s, b)[-1]
        assert (last.event, last.reason, last.actor) == ("rolled_back", "source retracted", "bob")
    with pytest.raises(Conflict, match="already been rolled back"):
        rollback(db, b)
    with pytest.raises(NotFound):
        rollback(db, str(uuid.uuid4()))


def test_next_operations_coalesces_and_a_rollback_breaks_the_batch(db: sessionmaker[Session]) -> None:
    e1, e2 = create(db, "E1", "E2")
    assert [kind for kind, _ in work_once(db)] == ["apply", "apply"]
    e3 = create(db, "E3")[0]
    rb = rollback(db, e1)
    e4, e5, e6 = create(db, "E4", "E5", "E6")
    with db() as s:
        seq = {e: repo.get_edit(s, e).seq for e in (e3, e4, e5, e6)}
        assert [op.seq for op in repo.next_operations(s, 8)] == [seq[e3]]  # stops before the rollback
    assert work_once(db) == [("apply", seq[e3])]
    with db() as s:
        assert [(op.kind, op.seq) for op in repo.next_operations(s, 8)] == [("rollback", rb)]  # alone
    assert work_once(db) == [("rollback", rb)]
    with db() as s:
        assert [op.seq for op in repo.next_operations(s, 2)] == [seq[e4], seq[e5]]  # max_batch
        with pytest.raises(InvalidRequest):
            repo.next_operations(s, 0)
    work_once(db, max_batch=2)
    work_once(db)
    with db() as s:
        assert repo.next_operations(s, 8) == []
        assert repo.queue_depth(s) == 0
        counts = repo.status_counts(s)
        assert (counts["applied"], counts["rolled_back"]) == (5, 1)
        assert repo.head(s)[0] == seq[e6]


def test_crashed_applying_ops_come_back_first(db: sessionmaker[Session]) -> None:
    a, b = create(db, "A", "B")
    with db.begin() as s:
        crashed = [op.seq for op in repo.mark_applying(s, repo.next_operations(s, 8), "batch-dead")]
    c = create(db, "C")[0]
    with db() as s:  # the worker restarted: the batch it claimed was never recorded
        ops = repo.next_operations(s, 8)
        assert [op.seq for op in ops][:2] == crashed and ops[0].status == "applying"
        assert [op.attempts for op in ops] == [1, 1, None]  # each claim counts (the worker gives up at a limit)
        assert repo.queued_operation_seqs(s) == crashed + [repo.get_edit(s, c).seq]
        assert repo.queue_position(s, repo.get_edit(s, c)) == 2
    work_once(db)
    with db() as s:
        assert [(e.status, e.batch_id != "batch-dead") for e in (repo.get_edit(s, i) for i in (a, b, c))] == [
            ("applied", True)] * 3
        assert [e.event for e in repo.edit_events(s, a)] == ["queued", "applying", "applying", "applied"]
        assert [s.get(Operation, seq).attempts for seq in crashed] == [2, 2]
        assert repo.edit_events(s, a)[2].reason.endswith(", attempt 2")


def test_record_requires_a_claimed_op_and_happens_once(db: sessionmaker[Session]) -> None:
    create(db, "A")
    with pytest.raises(Conflict, match="mark_applying"):
        with db.begin() as s:
            [op] = repo.next_operations(s, 8)
            repo.record_applied(s, op, factors=factors_for(1), metrics_before=None, metrics_after=None,
                                update_norms={}, layers=[], weights_digest="x", model_version=op.seq)
    [(_, seq)] = work_once(db)
    with pytest.raises(Conflict, match="already done"):
        with db.begin() as s:
            repo.record_applied(s, s.get(Operation, seq), factors=factors_for(1), metrics_before=None,
                                metrics_after=None, update_norms={}, layers=[], weights_digest="x",
                                model_version=seq)
    with pytest.raises(Conflict, match="already done"):
        with db.begin() as s:
            repo.record_failed(s, s.get(Operation, seq), error="late failure")


def test_hash_chain_verifies_and_detects_tampering(db: sessionmaker[Session]) -> None:
    with db() as s:
        assert repo.head(s) == (0, ZERO_HASH) and repo.head_digest(s) is None and repo.verify_chain(s) == 0
    a, b = create(db, "A", "B")
    work_once(db)
    rb = rollback(db, a)
    work_once(db)
    with db() as s:
        assert repo.verify_chain(s) == 3
        seq, hash_ = repo.head(s)
        assert seq == rb and len(hash_) == 64 and repo.head_digest(s) == f"digest-{rb}"
        ops = s.scalars(select(Operation).where(Operation.status == "done").order_by(Operation.seq)).all()
        assert ops[0].prev_hash == ZERO_HASH and ops[1].prev_hash == ops[0].hash and ops[2].prev_hash == ops[1].hash
        b_seq = repo.get_edit(s, b).seq

    # Flip one byte of one stored factor of edit b.
    with db.begin() as s:
        row = s.get(EditFactor, (b, LAYERS[1]))
        s.execute(update(EditFactor).where(EditFactor.edit_id == b, EditFactor.layer == LAYERS[1])
                  .values(a=bytes([row.a[0] ^ 1]) + row.a[1:]))
    with db() as s, pytest.raises(LedgerCorrupt, match=f"seq {b_seq}"):
        repo.verify_chain(s)


def test_hash_chain_detects_a_rewritten_operation(db: sessionmaker[Session]) -> None:
    create(db, "A", "B")
    [(_, first), (_, second)] = work_once(db)
    with db.begin() as s:
        s.execute(update(Operation).where(Operation.seq == first).values(weights_digest="forged"))
    with db() as s, pytest.raises(LedgerCorrupt, match=f"seq {first}"):
        repo.verify_chain(s)
    # Recomputing the forged op's hash still breaks the link to the next one.
    with db.begin() as s:
        op = s.get(Operation, first)
        s.execute(update(Operation).where(Operation.seq == first)
                  .values(hash=repo._link_hash(op.prev_hash, op, [(r.layer, r.checksum) for r in
                          s.scalars(select(EditFactor).where(EditFactor.edit_id == op.edit_id))])))
    with db() as s, pytest.raises(LedgerCorrupt, match=f"seq {second}"):
        repo.verify_chain(s)


def test_active_edits_order_and_content(db: sessionmaker[Session]) -> None:
    a, b = create(db, "A", "B")
    work_once(db)
    c = create(db, "C")[0]
    work_once(db)
    rollback(db, b)
    work_once(db)
    create(db, "D")  # queued: not active
    with db() as s:
        active = repo.active_edits(s)
        assert [x.edit_id for x in active] == [a, c]
        for x in active:
            edit = repo.get_edit(s, x.edit_id)
            assert x.seq == edit.seq and x.batch_id == edit.batch_id is not None
            assert [f.layer for f in x.factors] == list(LAYERS)
            for got, want in zip(x.factors, factors_for(x.seq)):
                for name in ("r", "a", "k"):
                    assert getattr(got, name).dtype == np.float32
                    assert getattr(got, name).tobytes() == getattr(want, name).tobytes()
        assert [f.layer for f in repo.edit_factors(s, b)] == list(LAYERS)  # kept for audit after rollback
        edit = repo.get_edit(s, a)
        assert edit.update_norms == {str(layer): 1.5 for layer in LAYERS} and edit.layers == list(LAYERS)
        assert edit.metrics_after == {"p": 0.9} and edit.model_version is not None
        assert edit.applied_at is not None and edit.applied_at.tzinfo == timezone.utc


def test_appends_are_serialized_until_commit(db: sessionmaker[Session]) -> None:
    """A second writer waits for the first to commit, so seqs become visible in seq order."""
    first = db()
    first.begin()
    repo.create_edits(first, [request("A")], subjects=["A"], requested_by="a", method="alphaedit",
                      idempotency_key=None)
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.extend(create(db, "B")))
    thread.start()
    thread.join(0.3)
    assert thread.is_alive(), "the second writer should wait for the first transaction"
    first.commit()
    first.close()
    thread.join(10)
    with db() as s:
        seqs = [e.seq for e in repo.list_edits(s)[0]]
        assert repo.get_edit(s, result[0]).seq == max(seqs)
