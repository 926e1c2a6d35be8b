"""/edits: submit, inspect, list, roll back and cancel fact edits. The use cases are service.edits';
this module maps bodies to them and their results to the response models."""
from __future__ import annotations

from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Body, Header, Query, Response
from pydantic import BaseModel

from api.deps import EditAdmin, EditWriter, LedgerDep, QueueDep, SettingsDep
from api.errors import error_responses
from api.schemas.edits import (
    CURSOR_PATTERN,
    EDIT_EXAMPLE,
    MAX_CURSOR_CHARS,
    EditAccepted,
    EditAudit,
    EditIn,
    EditListAccepted,
    EditPage,
    EditStatus,
    EditSubmission,
    RollbackAccepted,
    RollbackIn,
)
from service import edits
from service.engine.gates import Gates
from service.engine.types import EditRequest
from service.engine.validation import MAX_SUBJECT_CHARS
from service.errors import InvalidRequest
from service.ledger.repository import QueueBound

router = APIRouter(prefix="/edits", tags=["edits"])
SUBMISSION_EXAMPLES = {
    "one edit": {"summary": "one edit", "value": EDIT_EXAMPLE},
    "a list": {"summary": "several edits, applied in order", "value": {"edits": [
        EDIT_EXAMPLE, {"subject": "Colosseum", "prompt": "The Colosseum is in", "target_new": "Paris"}]}},
}
M = TypeVar("M", bound=BaseModel)


def out(model: type[M], result: Any) -> M:
    return model.model_validate(result, from_attributes=True)


def new_edit(edit: EditIn, label: str) -> edits.NewEdit:
    """The body's edit as the domain's; its rules are checked here, once (InvalidRequest names `label`)."""
    try:
        request = EditRequest.from_dict(edit.model_dump())
        gates = Gates.from_dict(edit.gates.model_dump()) if edit.gates is not None else None
        return edits.NewEdit(request, edit.metadata, edit.method, gates, edit.dry_run)
    except InvalidRequest as exc:
        raise InvalidRequest(f"{label}{exc.message}") from None


@router.post("", status_code=202, response_model=EditAccepted | EditListAccepted,
             responses=error_responses(400, 401, 403, 409, 422, 429, 503), summary="Submit one edit or a list of edits")
def submit_edits(caller: EditWriter, body: Annotated[EditSubmission, Body(openapi_examples=SUBMISSION_EXAMPLES)],
                 response: Response, settings: SettingsDep,
                 ledger: LedgerDep, queue: QueueDep,
                 idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
                 ) -> EditAccepted | EditListAccepted:
    """Records the edits as `queued` (scope `edits:write`); the worker applies them in order."""
    if isinstance(body, EditIn):
        submission = [new_edit(body, "")]
    else:
        submission = [new_edit(edit, f"edits[{i}]: ") for i, edit in enumerate(body.edits)]
    bound = QueueBound(settings.max_queued, settings.max_queued_per_key)
    submitted = edits.submit(ledger, queue, submission, requested_by=caller.name, default_method=settings.method,
                             idempotency_key=idempotency_key, bound=bound)
    response.headers["Location"] = f"/edits/{submitted.edits[0].id}"
    if submitted.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    if isinstance(body, EditIn):
        return out(EditAccepted, submitted.edits[0])
    return out(EditListAccepted, submitted)


@router.get("", response_model=EditPage, responses=error_responses(401, 403, 422, 503), summary="List edits, newest first")
def list_edits(_: EditWriter, ledger: LedgerDep,
               status: Annotated[EditStatus | None, Query(description="only edits in this status")] = None,
               subject: Annotated[str | None, Query(description="only edits of exactly this subject",
                                                    max_length=MAX_SUBJECT_CHARS)] = None,
               cursor: Annotated[str | None, Query(description="next_cursor of the previous page, unchanged",
                                                   max_length=MAX_CURSOR_CHARS, pattern=CURSOR_PATTERN)] = None,
               limit: Annotated[int, Query(ge=1, le=200)] = 50) -> EditPage:
    return out(EditPage, edits.list_edits(ledger, status=status, subject=subject, cursor=cursor, limit=limit))


@router.get("/{edit_id}", response_model=EditAudit, responses=error_responses(401, 403, 404, 503),
            summary="An edit's audit record")
def get_edit(_: EditWriter, edit_id: str, ledger: LedgerDep) -> EditAudit:
    return out(EditAudit, edits.audit(ledger, edit_id))


@router.post("/{edit_id}/rollback", status_code=202, response_model=RollbackAccepted,
             responses=error_responses(400, 401, 403, 404, 409, 422, 503), summary="Queue the rollback of an applied edit")
def rollback_edit(caller: EditAdmin, edit_id: str, body: RollbackIn, ledger: LedgerDep,
                  queue: QueueDep) -> RollbackAccepted:
    """Ordered through the queue after everything already accepted (scope `edits:admin`)."""
    return out(RollbackAccepted, edits.roll_back(ledger, queue, edit_id, reason=body.reason, actor=caller.name))


@router.delete("/{edit_id}", response_model=EditAudit, responses=error_responses(401, 403, 404, 409, 503),
               summary="Cancel an edit that is still queued")
def cancel_edit(caller: EditWriter, edit_id: str, ledger: LedgerDep) -> EditAudit:
    return out(EditAudit, edits.cancel(ledger, edit_id, actor=caller.name))
