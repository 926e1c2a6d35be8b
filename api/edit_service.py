"""The use cases behind the /edits routes. Each owns one ledger transaction; queue messages are
published only after it commits (architecture principle 2)."""
from __future__ import annotations

import logging

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from api.schemas.edits import (
    EditAccepted,
    EditAudit,
    EditEventOut,
    EditIn,
    EditListIn,
    EditPage,
    EditRecord,
    FactorSummary,
    RollbackAccepted,
)
from service.engine.types import EditRequest
from service.engine.validation import check_json_text, validate_request
from service.errors import InvalidRequest
from service.ledger import repository as repo
from service.ledger.models import Edit, IdempotencyKey, Operation
from service.queue import OperationQueue

log = logging.getLogger(__name__)


def stored_request(edit: EditIn, label: str) -> dict[str, object]:
    """The validated request as the ledger stores it (metadata included); InvalidRequest names `label`."""
    request = EditRequest.from_dict(edit.model_dump())
    try:
        validate_request(request)
        check_json_text("metadata", edit.metadata)  # stored (and hashed) with the request
    except InvalidRequest as exc:
        raise InvalidRequest(f"{label}{exc.message}") from None
    data = request.to_dict()
    if edit.metadata is not None:
        data["metadata"] = edit.metadata
    return data


def chosen_method(edits: list[EditIn], default: str) -> str:
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


def submit_edits(ledger: sessionmaker[Session], queue: OperationQueue, body: EditIn | EditListIn, *,
                 requested_by: str, default_method: str,
                 idempotency_key: str | None) -> tuple[list[EditAccepted], bool]:
    """Record edits as queued and enqueue them; returns (accepted, replayed Idempotency-Key)."""
    edits = [body] if isinstance(body, EditIn) else body.edits
    requests = [stored_request(e, "" if isinstance(body, EditIn) else f"edits[{i}]: ") for i, e in enumerate(edits)]
    method = chosen_method(edits, default_method)
    with ledger.begin() as session:
        replayed = idempotency_key is not None and \
            session.get(IdempotencyKey, (requested_by, idempotency_key)) is not None
        rows = repo.create_edits(session, requests, subjects=[e.subject for e in edits], requested_by=requested_by,
                                 method=method, idempotency_key=idempotency_key)
        accepted = [EditAccepted(id=row.id, status=row.status, queue_position=repo.queue_position(session, row),
                                 created_at=row.created_at) for row in rows]
        seqs = [int(row.seq) for row in rows if row.status == "queued" and row.seq is not None]
    if not replayed:  # a replay's operations were published by the first request
        publish(queue, seqs, f"edits {', '.join(a.id for a in accepted)}")
    log.info("edits %s queued by %s%s", ", ".join(a.id for a in accepted), requested_by,
             " (Idempotency-Key replay)" if replayed else "")
    return accepted, replayed


def audit(session: Session, edit: Edit) -> EditAudit:
    history = repo.edit_events(session, edit.id)
    factors = [FactorSummary(layer=f.layer, checksum=f.checksum(), dtype=str(f.r.dtype),
                             shapes={"r": list(f.r.shape), "a": list(f.a.shape), "k": list(f.k.shape)})
               for f in repo.edit_factors(session, edit.id)]
    record = EditRecord.model_validate(edit).model_dump()
    return EditAudit(**record, queue_position=repo.queue_position(session, edit),
                     history=[EditEventOut.model_validate(e) for e in history], factors=factors)


def get_audit(ledger: sessionmaker[Session], edit_id: str) -> EditAudit:
    with ledger() as session:
        return audit(session, repo.get_edit(session, edit_id))


def list_records(ledger: sessionmaker[Session], *, status: str | None, subject: str | None, cursor: str | None,
                 limit: int) -> EditPage:
    with ledger() as session:
        edits, next_cursor = repo.list_edits(session, status=status, subject=subject, cursor=cursor, limit=limit)
        return EditPage(items=[EditRecord.model_validate(e) for e in edits], next_cursor=next_cursor)


def operations_ahead(session: Session, seq: int) -> int:
    """Unfinished operations before `seq` (repo.queue_position does this for an edit's own apply)."""
    ahead = select(func.count()).select_from(Operation).where(Operation.status.in_(repo.PENDING), Operation.seq < seq)
    return int(session.scalar(ahead) or 0)


def request_rollback(ledger: sessionmaker[Session], queue: OperationQueue, edit_id: str, *, reason: str,
                     actor: str) -> RollbackAccepted:
    with ledger.begin() as session:
        op = repo.request_rollback(session, edit_id, reason=reason, actor=actor)
        edit = repo.get_edit(session, edit_id)
        accepted = RollbackAccepted(id=edit.id, status=edit.status, rollback_seq=op.seq,
                                    queue_position=operations_ahead(session, op.seq))
    publish(queue, [accepted.rollback_seq], f"rollback of edit {edit_id}")
    log.info("edit %s: rollback queued by %s as operation %d", edit_id, actor, accepted.rollback_seq)
    return accepted


def cancel(ledger: sessionmaker[Session], edit_id: str, *, actor: str) -> EditAudit:
    with ledger.begin() as session:
        edit = repo.cancel_edit(session, edit_id, actor=actor)
        record = audit(session, edit)
    log.info("edit %s cancelled by %s", edit_id, actor)
    return record
