"""The edit use cases: submit, list, audit, roll back, cancel. Each owns one ledger transaction and
returns plain data; queue messages are published only after it commits (architecture principle 2).
The API maps these to HTTP; nothing here knows about it."""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.engine.gates import Gates
from service.engine.types import EditRequest
from service.engine.validation import check_json_text
from service.errors import InvalidRequest
from service.ledger import repository as repo
from service.ledger.models import Edit
from service.queue import OperationQueue

log = logging.getLogger(__name__)
Ledger = sessionmaker[Session]


@dataclass(frozen=True)
class NewEdit:
    """One edit of a submission: the request (valid by construction), free metadata kept with it for
    audit, and the method, None for the server's default."""

    request: EditRequest
    metadata: dict[str, Any] | None = None
    method: str | None = None
    gates: Gates | None = None  # the edit's own quality gates, on top of the server's
    dry_run: bool = False  # computed, measured and gated in its turn, recorded 'checked', never served

    def __post_init__(self) -> None:
        check_json_text("metadata", self.metadata)  # stored and hashed with the request: every ledger must take it
        if self.gates is not None:
            check_json_text("gates", self.gates.to_dict())

    def stored(self) -> dict[str, Any]:
        """The request as the ledger stores (and hashes) it."""
        data = self.request.to_dict()
        if self.metadata is not None:
            data["metadata"] = self.metadata
        if self.gates is not None:
            data["gates"] = self.gates.to_dict()
        if self.dry_run:  # only when set: a real edit's stored request (and its Idempotency-Key hash) is as before
            data["dry_run"] = True
        return data


@dataclass(frozen=True)
class Accepted:
    id: str
    status: str
    queue_position: int | None
    created_at: datetime


@dataclass(frozen=True)
class Submitted:
    edits: list[Accepted]
    replayed: bool  # an Idempotency-Key seen before: these are the first request's edits


@dataclass(frozen=True)
class RollbackQueued:
    id: str
    status: str  # the rollback operation's state
    edit_status: str  # the edit's: 'applied' until the worker has reverted it
    rollback_seq: int
    queue_position: int


@dataclass(frozen=True)
class EditView:
    """An edit as the ledger holds it."""

    id: str
    status: str
    subject: str
    request: dict[str, Any]
    requested_by: str
    method: str
    created_at: datetime
    updated_at: datetime
    applied_at: datetime | None
    rolled_back_at: datetime | None
    seq: int | None
    batch_id: str | None
    model_version: int | None
    metrics_before: dict[str, Any] | None
    metrics_after: dict[str, Any] | None
    layers: list[int] | None
    update_norms: dict[str, float] | None
    settings: dict[str, Any] | None
    error: str | None
    rollback_reason: str | None

    @classmethod
    def of(cls, edit: Edit) -> EditView:
        return cls(**{f.name: getattr(edit, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class EventView:
    event: str
    actor: str | None
    reason: str | None
    seq: int | None
    at: datetime


@dataclass(frozen=True)
class FactorView:
    layer: int
    checksum: str
    dtype: str
    shapes: dict[str, list[int]]  # of r, a (delta W = r a^T) and the key k


@dataclass(frozen=True)
class Audit(EditView):
    queue_position: int | None = None
    history: tuple[EventView, ...] = ()
    factors: tuple[FactorView, ...] = ()


@dataclass(frozen=True)
class Page:
    items: list[EditView]
    next_cursor: str | None


def _method(edits: list[NewEdit], default: str) -> str:
    methods = {edit.method or default for edit in edits}
    if len(methods) > 1:
        raise InvalidRequest(f"the edits of one request must share a method, got {sorted(methods)}: "
                             "send one request per method")
    return methods.pop()


def publish(queue: OperationQueue, seqs: list[int], what: str) -> None:
    """Enqueue committed operations. A failure loses nothing: the worker re-enqueues queued ledger
    rows at start-up, so it is logged and the request still succeeds."""
    for seq in seqs:
        try:
            queue.publish(seq)
        except Exception as exc:
            log.error("%s: operation %d is recorded but could not be enqueued (the worker re-enqueues it at "
                      "start-up): %s", what, seq, exc)


def submit(ledger: Ledger, queue: OperationQueue, edits: list[NewEdit], *, requested_by: str,
           default_method: str, idempotency_key: str | None = None,
           bound: repo.QueueBound | None = None) -> Submitted:
    """Record edits as queued, in order, and enqueue them; Overloaded past `bound` (nothing written)."""
    method = _method(edits, default_method)
    with ledger.begin() as session:
        rows, replayed = repo.create_edits(session, [edit.stored() for edit in edits], subjects=[e.request.subject for e in edits],
                                           requested_by=requested_by, method=method,
                                           idempotency_key=idempotency_key, bound=bound)
        accepted = [Accepted(row.id, row.status, repo.queue_position(session, row), row.created_at) for row in rows]
        seqs = [int(row.seq) for row in rows if row.status == "queued" and row.seq is not None]
    ids = ", ".join(a.id for a in accepted)
    if not replayed:  # a replay's operations were published by the first request
        publish(queue, seqs, f"edits {ids}")
    log.info("edits %s queued by %s%s", ids, requested_by, " (Idempotency-Key replay)" if replayed else "")
    return Submitted(accepted, replayed)


def _audit(session: Session, edit: Edit) -> Audit:
    history = tuple(EventView(e.event, e.actor, e.reason, e.seq, e.at) for e in repo.edit_events(session, edit.id))
    factors = tuple(FactorView(f.layer, f.checksum(), str(f.r.dtype),
                               {"r": list(f.r.shape), "a": list(f.a.shape), "k": list(f.k.shape)})
                    for f in repo.edit_factors(session, edit.id))
    view = EditView.of(edit)
    return Audit(**{f.name: getattr(view, f.name) for f in fields(EditView)},
                 queue_position=repo.queue_position(session, edit), history=history, factors=factors)


def audit(ledger: Ledger, edit_id: str) -> Audit:
    with ledger() as session:
        return _audit(session, repo.get_edit(session, edit_id))


def list_edits(ledger: Ledger, *, status: str | None = None, subject: str | None = None,
               cursor: str | None = None, limit: int = 50) -> Page:
    with ledger() as session:
        edits, next_cursor = repo.list_edits(session, status=status, subject=subject, cursor=cursor, limit=limit)
        return Page([EditView.of(e) for e in edits], next_cursor)


def roll_back(ledger: Ledger, queue: OperationQueue, edit_id: str, *, reason: str, actor: str) -> RollbackQueued:
    """Queue the revert of an applied edit, ordered after everything accepted before it."""
    with ledger.begin() as session:
        op = repo.request_rollback(session, edit_id, reason=reason, actor=actor)
        edit = repo.get_edit(session, edit_id)
        queued = RollbackQueued(edit.id, op.status, edit.status, op.seq, repo.operations_ahead(session, op.seq))
    publish(queue, [queued.rollback_seq], f"rollback of edit {edit_id}")
    log.info("edit %s: rollback queued by %s as operation %d", edit_id, actor, queued.rollback_seq)
    return queued


def cancel(ledger: Ledger, edit_id: str, *, actor: str) -> Audit:
    """Cancel an edit that is still queued."""
    with ledger.begin() as session:
        record = _audit(session, repo.cancel_edit(session, edit_id, actor=actor))
    log.info("edit %s cancelled by %s", edit_id, actor)
    return record
