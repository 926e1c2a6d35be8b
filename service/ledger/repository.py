"""The ledger's operations. Every function takes a Session and never commits: the caller owns the
transaction (the worker, for instance, records a whole batch and then commits once).

The global order is operations.seq. An edit is one 'apply' operation, and later maybe one
'rollback' operation. Done operations form a hash chain in seq order; the model version is the seq of
the last done operation.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from service.errors import Conflict, InvalidRequest, LedgerCorrupt, NotFound, Overloaded
from service.ledger.codec import StoredFactor, decode_array, factor_checksum
from service.ledger.models import (
    EDIT_STATUSES,
    ZERO_HASH,
    Edit,
    EditEvent,
    EditFactor,
    IdempotencyKey,
    Operation,
    utcnow,
)

# Operations not finished yet. 'applying' ones were taken by a worker that may have crashed: they
# were never done, so they count as waiting (and come back from next_operations).
PENDING = ("queued", "applying")
MAX_PAGE = 500
# operations.seq is an INTEGER column, 32 bits on Postgres: no seq is larger on any ledger.
MAX_SEQ = 2**31 - 1
# Arbitrary constant key of the Postgres advisory lock that serializes appends to the ledger.
_PG_LEDGER_LOCK = 0x6B6E6F77  # "know"


@dataclass
class ActiveEdit:
    """An applied, not rolled back edit, as the worker replays it."""

    edit_id: str
    seq: int
    batch_id: str  # edits applied in one batch share it; the worker replays batch by batch
    factors: list[StoredFactor] = field(default_factory=list)


# --------------------------------------------------------------------------- helpers


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _lock_ledger(session: Session) -> None:
    """Serialize appends (new ops, chain links) until this transaction ends.

    Postgres hands out seqs at INSERT time, but transactions commit in any order: without the lock
    a worker could see seq 6 committed, apply it, and only then see seq 5. Holding the lock until
    commit makes commit order = seq order. SQLite needs nothing: db.make_engine begins every
    transaction IMMEDIATE, which serializes writers already.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LEDGER_LOCK})


def _event(session: Session, edit_id: str, event: str, *, actor: str | None = None,
           reason: str | None = None, seq: int | None = None) -> None:
    session.add(EditEvent(edit_id=edit_id, event=event, actor=actor, reason=reason, seq=seq, at=utcnow()))


def _locked_op(session: Session, op: Operation | int) -> Operation:
    """Re-read an operation with a row lock, so status checks see the latest committed state."""
    seq = op if isinstance(op, int) else op.seq
    found = session.get(Operation, seq, with_for_update=True, populate_existing=True)
    if found is None:
        raise NotFound(f"operation {seq} does not exist in the ledger")
    return found


def _load_edit(session: Session, edit_id: str, *, lock: bool) -> Edit:
    try:
        uuid.UUID(edit_id)
    except (ValueError, TypeError, AttributeError):
        raise NotFound(f"edit {edit_id!r} does not exist (edit ids are UUIDs)") from None
    if lock:
        # Lock order everywhere: operation row, then edit row (avoids deadlocks on Postgres).
        edit = session.get(Edit, edit_id, with_for_update=True, populate_existing=True)
    else:
        edit = session.get(Edit, edit_id)
    if edit is None:
        raise NotFound(f"edit {edit_id} does not exist")
    return edit


def _locked_edit(session: Session, edit_id: str) -> Edit:
    return _load_edit(session, edit_id, lock=True)


def _require_pending(op: Operation, action: str, *, claimed: bool = False) -> None:
    """Conflict unless op is unfinished (and, with claimed, taken by mark_applying)."""
    if op.status not in PENDING:
        raise Conflict(
            f"cannot {action} operation {op.seq} ({op.kind} of edit {op.edit_id}): it is already {op.status}"
            + (" (a duplicate delivery; skip it)" if op.status == "done" else "")
        )
    if claimed and op.status != "applying":
        # The batch id recorded by mark_applying is part of the replay (C_p is summed batch by batch).
        raise Conflict(f"cannot {action} operation {op.seq}: it is still queued; claim it with mark_applying first")


def _request_hash(requests: list[dict[str, Any]], subjects: list[str], method: str) -> str:
    try:
        body = _canonical({"requests": requests, "subjects": subjects, "method": method})
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"the edit request is not plain JSON data: {exc}") from exc
    return hashlib.sha256(body.encode()).hexdigest()


def _stored(row: EditFactor) -> StoredFactor:
    return StoredFactor(
        layer=row.layer,
        r=decode_array(row.r, row.dtype, row.r_shape),
        a=decode_array(row.a, row.dtype, row.a_shape),
        k=decode_array(row.k, row.dtype, row.k_shape),
    )


def _link_hash(prev_hash: str, op: Operation, checksums: Sequence[tuple[int, str]]) -> str:
    """One link of the chain: sha256(prev_hash + canonical JSON of the op's content)."""
    content: dict[str, Any] = {
        "seq": op.seq, "kind": op.kind, "edit_id": op.edit_id, "weights_digest": op.weights_digest,
    }
    if op.kind == "apply":
        content["factors"] = [[layer, checksum] for layer, checksum in sorted(checksums)]
    return hashlib.sha256((prev_hash + _canonical(content)).encode()).hexdigest()


def _finish(session: Session, op: Operation, checksums: Sequence[tuple[int, str]], weights_digest: str) -> None:
    """Mark op done and chain it on the current head."""
    head_seq, head_hash = head(session)
    if op.seq <= head_seq:
        raise Conflict(
            f"operation {op.seq} cannot be recorded after operation {head_seq}: the ledger is applied in seq order"
        )
    op.status = "done"
    op.finished_at = utcnow()
    op.weights_digest = weights_digest
    op.prev_hash = head_hash
    op.hash = _link_hash(head_hash, op, checksums)


# --------------------------------------------------------------------------- requests (API side)


@dataclass(frozen=True)
class QueueBound:
    """Most unfinished operations the ledger takes, in all and per requester; None: no bound."""

    total: int | None = None
    per_requester: int | None = None


def _check_bound(session: Session, bound: QueueBound, requested_by: str, adding: int) -> None:
    """Overloaded (429) when `adding` edits would pass a bound; checked under the ledger lock."""
    if bound.total is not None:
        pending = queue_depth(session)
        if pending + adding > bound.total:
            raise Overloaded(f"the edit queue is full: {pending} operations wait and this server takes at most "
                             f"{bound.total} (KNOWPATCH_MAX_QUEUED); retry later; nothing was written")
    if bound.per_requester is not None:
        mine = select(func.count()).select_from(Operation).join(Edit, Edit.id == Operation.edit_id).where(
            Operation.status.in_(PENDING), Operation.kind == "apply", Edit.requested_by == requested_by)
        pending = int(session.scalar(mine) or 0)
        if pending + adding > bound.per_requester:
            raise Overloaded(f"{requested_by} has {pending} edits waiting and may have at most {bound.per_requester} "
                             "(KNOWPATCH_MAX_QUEUED_PER_KEY); retry once some are applied; nothing was written")


def create_edits(session: Session, requests: list[dict[str, Any]], *, subjects: list[str], requested_by: str,
                 method: str, idempotency_key: str | None,
                 bound: QueueBound | None = None) -> tuple[list[Edit], bool]:
    """Record edits as queued, one 'apply' op each, in list order. Honors an Idempotency-Key: returns
    the edits and whether they are an earlier request's (decided under the ledger lock, so two
    concurrent requests with one key cannot both create or both publish)."""
    if not requests:
        raise InvalidRequest("no edits given: send at least one edit")
    if len(subjects) != len(requests):
        raise InvalidRequest(f"{len(requests)} edits but {len(subjects)} subjects: give one subject per edit")
    request_hash = _request_hash(requests, subjects, method)
    _lock_ledger(session)  # also makes the idempotency check-then-insert atomic

    if idempotency_key is not None:
        earlier = session.get(IdempotencyKey, (requested_by, idempotency_key))
        if earlier is not None:
            if earlier.request_hash != request_hash:
                raise Conflict(
                    f"Idempotency-Key {idempotency_key!r} was already used by {requested_by} for a different "
                    f"request (edits {', '.join(earlier.edit_ids)}); send a new key for a new request"
                )
            edits = session.scalars(select(Edit).where(Edit.id.in_(earlier.edit_ids))).all()
            by_id = {e.id: e for e in edits}
            return [by_id[i] for i in earlier.edit_ids], True

    if bound is not None:
        _check_bound(session, bound, requested_by, len(requests))
    now = utcnow()
    created: list[Edit] = []
    for request, subject in zip(requests, subjects):
        edit = Edit(id=str(uuid.uuid4()), status="queued", subject=subject, request=request,
                    requested_by=requested_by, method=method, created_at=now, updated_at=now)
        op = Operation(kind="apply", edit_id=edit.id, status="queued", created_at=now)
        session.add(edit)
        session.flush()  # the edit row first (foreign key)
        session.add(op)
        session.flush()  # one op per flush: seqs follow list order
        edit.seq = op.seq
        _event(session, edit.id, "queued", actor=requested_by, seq=op.seq)
        created.append(edit)
    if idempotency_key is not None:
        session.add(IdempotencyKey(requested_by=requested_by, key=idempotency_key, request_hash=request_hash,
                                   edit_ids=[e.id for e in created], created_at=now))
    session.flush()
    return created, False


def get_edit(session: Session, edit_id: str) -> Edit:
    return _load_edit(session, edit_id, lock=False)


def edit_events(session: Session, edit_id: str) -> list[EditEvent]:
    get_edit(session, edit_id)
    return list(session.scalars(select(EditEvent).where(EditEvent.edit_id == edit_id).order_by(EditEvent.id)))


def edit_factors(session: Session, edit_id: str) -> list[StoredFactor]:
    get_edit(session, edit_id)
    rows = session.scalars(select(EditFactor).where(EditFactor.edit_id == edit_id).order_by(EditFactor.layer))
    return [_stored(r) for r in rows]


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, value = raw.partition(":")
        # Only what _encode_cursor writes: int() alone also takes " 1", "+1" or "1_0", and seqs past
        # MAX_SEQ, which overflow the query parameter on Postgres (and past 64 bits on SQLite too).
        if prefix != "seq" or not (value.isascii() and value.isdigit()) or int(value) > MAX_SEQ:
            raise ValueError(raw)
        return int(value)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidRequest(
            f"cursor {cursor!r} is not valid: pass the next_cursor of the previous page unchanged, or omit it"
        ) from None


def list_edits(session: Session, *, status: str | None = None, subject: str | None = None,
               cursor: str | None = None, limit: int = 50) -> tuple[list[Edit], str | None]:
    """A page of edits, newest first; next_cursor is None on the last page."""
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE}, got {limit}")
    if status is not None and status not in EDIT_STATUSES:
        raise InvalidRequest(f"unknown status {status!r}: use one of {', '.join(EDIT_STATUSES)}")
    query = select(Edit).order_by(Edit.seq.desc()).limit(limit + 1)
    if status is not None:
        query = query.where(Edit.status == status)
    if subject is not None:
        if "\x00" in subject:  # Postgres text cannot hold it (an error there, an empty page on SQLite)
            raise InvalidRequest("subject contains a NUL character (U+0000), which no edit's subject may contain")
        query = query.where(Edit.subject == subject)
    if cursor is not None:
        query = query.where(Edit.seq < _decode_cursor(cursor))
    edits = list(session.scalars(query))
    if len(edits) <= limit:
        return edits, None
    page = edits[:limit]
    return page, _encode_cursor(int(page[-1].seq or 0))


def queue_position(session: Session, edit: Edit) -> int | None:
    """How many unfinished operations are ahead of this edit's (0 = next); None unless queued."""
    if edit.status != "queued" or edit.seq is None:
        return None
    ahead = select(func.count()).select_from(Operation).where(Operation.status.in_(PENDING), Operation.seq < edit.seq)
    return int(session.scalar(ahead) or 0)


def operations_ahead(session: Session, seq: int) -> int:
    """Unfinished operations before `seq` (queue_position does this for an edit's own apply)."""
    ahead = select(func.count()).select_from(Operation).where(Operation.status.in_(PENDING), Operation.seq < seq)
    return int(session.scalar(ahead) or 0)


def recent_apply_seconds(session: Session, window: int) -> list[float]:
    """Seconds from each of the last `window` applied edits' last 'applying' event to its 'applied'
    event, newest first: the worker's time to compute and record the edit's batch, not its wait."""
    applied = list(session.scalars(
        select(EditEvent).where(EditEvent.event == "applied").order_by(EditEvent.id.desc()).limit(window)
    ))
    starts: dict[str, EditEvent] = {}
    claims = select(EditEvent).where(EditEvent.event == "applying",
                                     EditEvent.edit_id.in_([e.edit_id for e in applied])).order_by(EditEvent.id)
    for event in session.scalars(claims):
        starts[event.edit_id] = event  # the last claim wins (an earlier one may have crashed)
    return [(e.at - starts[e.edit_id].at).total_seconds() for e in applied if e.edit_id in starts]


def request_rollback(session: Session, edit_id: str, *, reason: str, actor: str) -> Operation:
    """Queue the rollback of an applied edit, ordered after everything already accepted."""
    _lock_ledger(session)
    edit = _locked_edit(session, edit_id)
    if edit.status != "applied":
        raise Conflict(_why_no_rollback(edit))
    pending = session.scalar(
        select(Operation).where(Operation.edit_id == edit.id, Operation.kind == "rollback",
                                Operation.status.in_(PENDING))
    )
    if pending is not None:
        raise Conflict(f"edit {edit.id} already has a rollback queued (operation {pending.seq}); wait for it")
    now = utcnow()
    op = Operation(kind="rollback", edit_id=edit.id, status="queued", created_at=now, actor=actor, reason=reason)
    session.add(op)
    session.flush()
    edit.updated_at = now
    _event(session, edit.id, "rollback_requested", actor=actor, reason=reason, seq=op.seq)
    session.flush()
    return op


def _why_no_rollback(edit: Edit) -> str:
    why = {
        "queued": "it has not been applied yet; cancel it instead (DELETE /edits/{id})",
        "applying": "it is being applied right now; request the rollback once it is applied",
        "failed": "it failed and never changed the model, so there is nothing to roll back",
        "rolled_back": "it has already been rolled back",
        "cancelled": "it was cancelled and never changed the model, so there is nothing to roll back",
        "checked": "it was a dry run and never changed the model, so there is nothing to roll back",
    }.get(edit.status, "only applied edits can be rolled back")
    return f"edit {edit.id} is {edit.status}: " + why.replace("{id}", edit.id)


def cancel_edit(session: Session, edit_id: str, *, actor: str, reason: str | None = None) -> Edit:
    """Cancel an edit that no worker has taken yet."""
    seq = get_edit(session, edit_id).seq
    op = _locked_op(session, seq) if seq is not None else None
    edit = _locked_edit(session, edit_id)
    if edit.status != "queued" or op is None or op.status != "queued":
        hint = "roll it back instead (POST /edits/{id}/rollback)" if edit.status in ("applying", "applied") else \
            "only queued edits can be cancelled"
        raise Conflict(f"edit {edit.id} is {edit.status}: " + hint.replace("{id}", edit.id))
    now = utcnow()
    op.status = "cancelled"
    op.finished_at = now
    edit.status = "cancelled"
    edit.updated_at = now
    _event(session, edit.id, "cancelled", actor=actor, reason=reason, seq=op.seq)
    session.flush()
    return edit


# --------------------------------------------------------------------------- work (worker side)


def next_operations(session: Session, max_batch: int) -> list[Operation]:
    """The next unit of work, in ledger order: the first unfinished op and, if it is an apply, the
    consecutive unfinished applies after it (up to max_batch). A rollback comes alone.

    'applying' ops (left by a crashed worker) count as unfinished; they always precede the queued
    ones in seq order, because ops are taken in order.
    """
    if max_batch < 1:
        raise InvalidRequest(f"max_batch must be at least 1, got {max_batch}")
    ops = list(session.scalars(
        select(Operation).where(Operation.status.in_(PENDING)).order_by(Operation.seq).limit(max_batch)
    ))
    if not ops or ops[0].kind == "rollback":
        return ops[:1]
    batch: list[Operation] = []
    for op in ops:
        if op.kind != "apply":
            break  # a rollback ends the batch: it must see the model as of the edits before it
        batch.append(op)
    return batch


def mark_applying(session: Session, ops: Iterable[Operation], batch_id: str) -> list[Operation]:
    """Claim ops for a batch and count the attempt on each. Returns the ops claimed: any cancelled
    (or finished) since they were read are left out, so the worker must process the returned list."""
    claimed: list[Operation] = []
    now = utcnow()
    for op in sorted(ops, key=lambda o: o.seq):
        op = _locked_op(session, op)
        if op.status not in PENDING:
            continue
        op.status = "applying"
        op.batch_id = batch_id
        op.attempts = (op.attempts or 0) + 1
        if op.kind == "apply":
            edit = _locked_edit(session, op.edit_id)
            edit.status = "applying"
            edit.batch_id = batch_id
            edit.updated_at = now
            again = f", attempt {op.attempts}" if op.attempts > 1 else ""
            _event(session, edit.id, "applying", seq=op.seq, reason=f"batch {batch_id}{again}")
        claimed.append(op)
    session.flush()
    return claimed


def record_applied(session: Session, op: Operation | int, *, factors: list[StoredFactor],
                   metrics_before: dict[str, Any] | None, metrics_after: dict[str, Any] | None,
                   update_norms: dict[Any, float], layers: list[int], weights_digest: str,
                   model_version: int, settings: dict[str, Any] | None = None) -> None:
    """The edit is live: store its factors, chain the op, mark the edit applied."""
    _lock_ledger(session)
    op = _locked_op(session, op)
    if op.kind != "apply":
        raise InvalidRequest(f"operation {op.seq} is a {op.kind}; record it with record_rolled_back")
    _require_pending(op, "record as applied", claimed=True)
    if not factors:
        raise InvalidRequest(f"operation {op.seq}: an applied edit needs its factors (none given)")
    if len({f.layer for f in factors}) != len(factors):
        raise InvalidRequest(f"operation {op.seq}: factors repeat a layer: {[f.layer for f in factors]}")
    if model_version < op.seq:
        raise InvalidRequest(f"operation {op.seq}: model_version {model_version} precedes the op's own seq")
    rows = [EditFactor(edit_id=op.edit_id, **f.encoded()) for f in factors]
    session.add_all(rows)
    _finish(session, op, [(r.layer, r.checksum) for r in rows], weights_digest)
    edit = _locked_edit(session, op.edit_id)
    now = utcnow()
    edit.status = "applied"
    edit.applied_at = now
    edit.updated_at = now
    edit.batch_id = op.batch_id
    edit.model_version = model_version
    edit.metrics_before = metrics_before
    edit.metrics_after = metrics_after
    edit.update_norms = {str(k): float(v) for k, v in update_norms.items()}  # JSON keys are strings anyway
    edit.layers = [int(layer) for layer in layers]
    edit.settings = settings
    edit.error = None
    _event(session, edit.id, "applied", seq=op.seq)
    session.flush()


def record_failed(session: Session, op: Operation | int, *, error: str) -> None:
    """The op failed and the model is unchanged. A failed rollback leaves its edit applied."""
    op = _locked_op(session, op)
    _require_pending(op, "record as failed")
    now = utcnow()
    op.status = "failed"
    op.finished_at = now
    edit = _locked_edit(session, op.edit_id)
    edit.updated_at = now
    if op.kind == "apply":
        edit.status = "failed"
        edit.error = error
        _event(session, edit.id, "failed", seq=op.seq, reason=error)
    else:
        _event(session, edit.id, "failed", seq=op.seq, reason=f"rollback failed, the edit stays applied: {error}")
    session.flush()


def record_rejected(session: Session, op: Operation | int, *, error: str, metrics_before: dict[str, Any] | None,
                    metrics_after: dict[str, Any] | None, settings: dict[str, Any] | None = None) -> None:
    """The edit was computed but failed a quality gate: never served, the model unchanged. Like a failure
    (the op is 'failed', no chain link, no factors), but the edit keeps the measurements that decided it."""
    _record_unserved(session, op, "rejected", reason=error, error=error, metrics_before=metrics_before,
                     metrics_after=metrics_after, settings=settings)


def record_checked(session: Session, op: Operation | int, *, verdict: str, metrics_before: dict[str, Any] | None,
                   metrics_after: dict[str, Any] | None, settings: dict[str, Any] | None = None) -> None:
    """A dry run was computed and measured: recorded like a rejection (the op is 'failed': finished with no
    chain link, no factors, no model version), whatever its gates said; `verdict` (what a real edit would
    have met) goes to the 'checked' event."""
    _record_unserved(session, op, "checked", reason=verdict, error=None, metrics_before=metrics_before,
                     metrics_after=metrics_after, settings=settings)


def _record_unserved(session: Session, op: Operation | int, status: str, *, reason: str, error: str | None,
                     metrics_before: dict[str, Any] | None, metrics_after: dict[str, Any] | None,
                     settings: dict[str, Any] | None) -> None:
    """Finish a computed apply that is never served: the edit keeps its measurements, the model is unchanged."""
    op = _locked_op(session, op)
    if op.kind != "apply":
        raise InvalidRequest(f"operation {op.seq} is a {op.kind}; only applies are gated")
    _require_pending(op, f"record as {status}", claimed=True)
    now = utcnow()
    op.status = "failed"
    op.finished_at = now
    edit = _locked_edit(session, op.edit_id)
    edit.status = status
    edit.updated_at = now
    edit.batch_id = op.batch_id
    edit.metrics_before = metrics_before
    edit.metrics_after = metrics_after
    edit.settings = settings
    edit.error = error
    _event(session, edit.id, status, seq=op.seq, reason=reason)
    session.flush()


def record_rolled_back(session: Session, op: Operation | int, *, weights_digest: str,
                       model_version: int) -> None:
    """The edit's factors are out of the model: chain the op, mark the edit rolled back."""
    _lock_ledger(session)
    op = _locked_op(session, op)
    if op.kind != "rollback":
        raise InvalidRequest(f"operation {op.seq} is an {op.kind}; record it with record_applied")
    _require_pending(op, "record as rolled back", claimed=True)
    edit = _locked_edit(session, op.edit_id)
    if edit.status != "applied":
        raise Conflict(f"edit {edit.id} is {edit.status}, not applied: its rollback (operation {op.seq}) cannot be recorded")
    if model_version < op.seq:
        raise InvalidRequest(f"operation {op.seq}: model_version {model_version} precedes the op's own seq")
    _finish(session, op, [], weights_digest)
    now = utcnow()
    edit.status = "rolled_back"
    edit.rolled_back_at = now
    edit.updated_at = now
    edit.rollback_reason = op.reason
    _event(session, edit.id, "rolled_back", actor=op.actor, reason=op.reason, seq=op.seq)
    session.flush()


# --------------------------------------------------------------------------- state and integrity


def _factors_by_edit(session: Session, edit_ids: Sequence[str] | None) -> dict[str, list[EditFactor]]:
    """All factor rows of the given edits (None: of applied edits) in one query, by layer."""
    query = select(EditFactor).order_by(EditFactor.edit_id, EditFactor.layer)
    if edit_ids is None:
        query = query.join(Edit, Edit.id == EditFactor.edit_id).where(Edit.status == "applied")
    else:
        query = query.where(EditFactor.edit_id.in_(edit_ids))
    grouped: dict[str, list[EditFactor]] = defaultdict(list)
    for row in session.scalars(query):
        grouped[row.edit_id].append(row)
    return grouped


def active_edits(session: Session) -> list[ActiveEdit]:
    """Applied, not rolled back edits in seq order, with their factors: what the weights are made of."""
    return _active_from(session, _factors_by_edit(session, None))


def _active_from(session: Session, factors: dict[str, list[EditFactor]]) -> list[ActiveEdit]:
    edits = session.execute(
        select(Edit.id, Edit.seq, Edit.batch_id).where(Edit.status == "applied").order_by(Edit.seq)
    ).all()
    active = []
    for e in edits:
        if e.batch_id is None or not factors.get(e.id):
            raise LedgerCorrupt(f"ledger corrupt at seq {e.seq}: applied edit {e.id} has no batch id or no factors")
        active.append(ActiveEdit(edit_id=e.id, seq=int(e.seq), batch_id=e.batch_id,
                                 factors=[_stored(r) for r in factors[e.id]]))
    return active


def verified_active_edits(session: Session) -> tuple[int, list[ActiveEdit]]:
    """verify_chain and active_edits with one read of the factor rows (a replay's whole input):
    (operations verified, active edits)."""
    session.flush()
    ops = list(session.scalars(select(Operation).where(Operation.status == "done").order_by(Operation.seq)))
    factors = _factors_by_edit(session, [op.edit_id for op in ops if op.kind == "apply"])
    _verify_links(ops, factors)
    return len(ops), _active_from(session, factors)


def _last_done(session: Session) -> Operation | None:
    return session.scalar(select(Operation).where(Operation.status == "done").order_by(Operation.seq.desc()).limit(1))


def head(session: Session) -> tuple[int, str]:
    """(seq of the last done op, its hash), or (0, the zero hash) on an empty ledger."""
    session.flush()
    last = _last_done(session)
    if last is None:
        return 0, ZERO_HASH
    if last.hash is None:
        raise LedgerCorrupt(f"operation {last.seq} is done but has no hash")
    return last.seq, last.hash


def head_digest(session: Session) -> str | None:
    """The weights digest after the last done op (None on an empty ledger)."""
    last = _last_done(session)
    return None if last is None else last.weights_digest


def verify_links(session: Session) -> int:
    """Every link of the chain over the recorded factor checksums, without reading the factor bytes
    (a restart from a snapshot; the bytes are checked against their checksums when they are read)."""
    session.flush()
    ops = list(session.scalars(select(Operation).where(Operation.status == "done").order_by(Operation.seq)))
    checksums: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for edit_id, layer, checksum in session.execute(select(EditFactor.edit_id, EditFactor.layer, EditFactor.checksum)):
        checksums[edit_id].append((layer, checksum))
    prev = ZERO_HASH
    for op in ops:
        if op.prev_hash != prev:
            raise LedgerCorrupt(f"ledger corrupt at seq {op.seq}: its prev_hash does not match the previous link")
        if op.hash != _link_hash(prev, op, checksums.get(op.edit_id, []) if op.kind == "apply" else []):
            raise LedgerCorrupt(f"ledger corrupt at seq {op.seq}: its hash does not match its content")
        prev = op.hash
    return len(ops)


def done_after(session: Session, seq: int) -> list[tuple[int, str, str, str | None]]:
    """(seq, kind, edit id, batch id) of the done operations after `seq`, in order."""
    rows = session.execute(
        select(Operation.seq, Operation.kind, Operation.edit_id, Operation.batch_id)
        .where(Operation.status == "done", Operation.seq > seq).order_by(Operation.seq))
    return [(int(r.seq), r.kind, r.edit_id, r.batch_id) for r in rows]


def op_hash(session: Session, seq: int) -> str | None:
    """The chain hash of the done operation at `seq` (None if there is none)."""
    return session.scalar(select(Operation.hash).where(Operation.seq == seq, Operation.status == "done"))


def verified_factors(session: Session, edit_id: str) -> list[StoredFactor]:
    """An edit's factors, each checked against its recorded checksum."""
    rows = list(session.scalars(select(EditFactor).where(EditFactor.edit_id == edit_id).order_by(EditFactor.layer)))
    for row in rows:
        if factor_checksum(row.dtype, row.r_shape, row.a_shape, row.k_shape, row.r, row.a, row.k) != row.checksum:
            raise LedgerCorrupt(f"ledger corrupt: the stored factors of edit {edit_id} at layer {row.layer} "
                                "do not match their checksum")
    return [_stored(r) for r in rows]


def verify_chain(session: Session) -> int:
    """Recompute every factor checksum and every link; raise LedgerCorrupt at the first bad seq."""
    session.flush()
    ops = list(session.scalars(select(Operation).where(Operation.status == "done").order_by(Operation.seq)))
    _verify_links(ops, _factors_by_edit(session, [op.edit_id for op in ops if op.kind == "apply"]))
    return len(ops)


def _verify_links(ops: Sequence[Operation], factors: dict[str, list[EditFactor]]) -> None:
    prev = ZERO_HASH
    for op in ops:
        checksums: list[tuple[int, str]] = []
        if op.kind == "apply":
            for row in factors.get(op.edit_id, []):
                actual = factor_checksum(row.dtype, row.r_shape, row.a_shape, row.k_shape, row.r, row.a, row.k)
                if actual != row.checksum:
                    raise LedgerCorrupt(
                        f"ledger corrupt at seq {op.seq}: the stored factors of edit {op.edit_id} at layer "
                        f"{row.layer} do not match their checksum"
                    )
                checksums.append((row.layer, actual))
        if op.prev_hash != prev:
            raise LedgerCorrupt(f"ledger corrupt at seq {op.seq}: its prev_hash does not match the previous link")
        if op.hash != _link_hash(prev, op, checksums):
            raise LedgerCorrupt(f"ledger corrupt at seq {op.seq}: its hash does not match its content")
        prev = op.hash


def queued_operation_seqs(session: Session) -> list[int]:
    """Seqs of unfinished ops (queued, and applying ones a crashed worker left): what the queue must hold."""
    return list(session.scalars(select(Operation.seq).where(Operation.status.in_(PENDING)).order_by(Operation.seq)))


def status_counts(session: Session) -> dict[str, int]:
    """Edits per status, every status present (0 when none)."""
    counts = dict.fromkeys(EDIT_STATUSES, 0)
    for status, n in session.execute(select(Edit.status, func.count()).group_by(Edit.status)):
        counts[status] = int(n)
    return counts


# The outcome of an edit whose gates were measured, by its status (a rolled-back edit passed its gates).
GATE_OUTCOMES = {"applied": "passed", "rolled_back": "passed", "rejected": "rejected", "checked": "checked"}
THRESHOLD_GATES = ("efficacy", "generalisation", "locality_drop")  # in the order gates.evaluate measures them


@dataclass(frozen=True)
class GateStats:
    """What the quality gates did, read from the records (metrics_after.gates and gates_s)."""

    outcomes: dict[str, int]  # passed / rejected / checked: edits whose record has gate results
    rejections: dict[str, int]  # rejected edits by the gate that rejected them
    recent_seconds: list[float]  # gates_s of the last `window` gated edits, newest first


def gate_stats(session: Session, window: int) -> GateStats:
    """Gate outcomes over the whole ledger, rejections by gate, and the recent gates_s (for /metrics).

    Outcomes and seconds are filtered and extracted in SQL (JSON paths work alike on SQLite and
    Postgres), so a scrape never loads applied edits' records. The failing gate is parsed in Python
    from the rejected records only: rejections are few (each is a refused request), and a column for
    it would duplicate what metrics_after.gates already records, behind another migration."""
    gates = Edit.metrics_after["gates"]
    gated = Edit.status.in_(GATE_OUTCOMES) & (gates.as_string() != "{}")  # no key: NULL, not counted
    outcomes = dict.fromkeys(GATE_OUTCOMES.values(), 0)
    for status, n in session.execute(select(Edit.status, func.count()).where(gated).group_by(Edit.status)):
        outcomes[GATE_OUTCOMES[status]] += int(n)
    rejections = dict.fromkeys((*THRESHOLD_GATES, "probe"), 0)
    for (after,) in session.execute(select(Edit.metrics_after).where(gated, Edit.status == "rejected")):
        gate = _failed_gate(after["gates"])
        rejections[gate] = rejections.get(gate, 0) + 1
    seconds = session.scalars(select(Edit.metrics_after["gates_s"].as_float())
                              .where(gated).order_by(Edit.seq.desc()).limit(window))
    return GateStats(outcomes, rejections, [float(s) for s in seconds if s is not None])


def _failed_gate(results: dict[str, Any]) -> str:
    """The gate that rejected an edit, as a metric label: a threshold's name, or 'probe' for any probe
    (a label per probe prompt would grow with every edit's own probes). Threshold gates first, as the
    worker's reason names the first gate that failed, in gates.evaluate's order."""
    failed = [name for name, result in results.items() if not result.get("passed", True)]
    for name in THRESHOLD_GATES:
        if name in failed:
            return name
    return "probe" if any(name.startswith("probe:") for name in failed) else "unknown"


def queue_depth(session: Session) -> int:
    """Unfinished operations (queued or applying)."""
    return int(session.scalar(select(func.count()).select_from(Operation).where(Operation.status.in_(PENDING))) or 0)


def rebatch(session: Session, op: Operation | int, batch_id: str) -> None:
    """Move a claimed op to another batch (the worker splits a batch that failed as a whole)."""
    op = _locked_op(session, op)
    _require_pending(op, "re-batch", claimed=True)
    op.batch_id = batch_id
    session.flush()
