"""Request and response bodies of the /edits routes."""
from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

from api.schemas.common import EDIT_LIST_TAG, NON_BLANK_PATTERN, SINGLE_EDIT_TAG, NonBlank
from service.engine.types import Method
from service.engine.validation import MAX_EXTRA_PROMPTS, MAX_PROMPT_CHARS, MAX_SUBJECT_CHARS, MAX_TARGET_CHARS

EditStatus = Literal["queued", "applying", "applied", "failed", "rolled_back", "cancelled", "rejected",
                     "checked"]  # models.EDIT_STATUSES
MAX_EDITS_PER_REQUEST = 256
MAX_METADATA_CHARS = 4096
MAX_REASON_CHARS = 1000
# What the ledger's cursors look like (repository._encode_cursor: URL-safe base64, unpadded).
CURSOR_PATTERN = r"^[A-Za-z0-9_-]+={0,2}$"
MAX_CURSOR_CHARS = 64

EDIT_EXAMPLE: dict[str, Any] = {
    "subject": "Eiffel Tower",
    "prompt": "The Eiffel Tower is located in the city of",
    "target_new": "Rome",
    "target_true": "Paris",
    "rephrase_prompts": ["Where is the Eiffel Tower? It stands in"],
    "locality_prompts": ["The Colosseum is located in the city of"],
    "metadata": {"ticket": "KB-1234"},
}
TIME = "2026-01-05T10:00:00Z"
EDIT_ID = "3f1c2a9e-6b1d-4c55-9a43-0f6f2b1c8d7e"


def text_schema(limit: int) -> dict[str, Any]:
    """The rules EditRequest enforces on a text field, for the OpenAPI document only: that check
    is shared with the engine and words its own messages. Not blank ("\\S" is a necessary condition:
    zero-width characters alone are refused too), at most `limit` characters."""
    return {"minLength": 1, "maxLength": limit, "pattern": NON_BLANK_PATTERN}


def prompts_schema() -> dict[str, Any]:
    return {"maxItems": MAX_EXTRA_PROMPTS, "items": {"type": "string", **text_schema(MAX_PROMPT_CHARS)}}


class ProbeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="a prompt whose completion the edit must not change",
                        json_schema_extra=text_schema(MAX_PROMPT_CHARS))
    expected: str = Field(description="its completion, which must stay the greedy one (if it was before the edit)",
                          json_schema_extra=text_schema(MAX_TARGET_CHARS))


class GatesIn(BaseModel):
    """Quality gates of this edit, on top of the server's (KNOWPATCH_GATE_*): measured on the computed
    weights before they are served; an edit that fails one is `rejected` and changes nothing."""

    model_config = ConfigDict(extra="forbid")

    min_efficacy: float | None = Field(None, ge=0, le=1, description="least P(target_new | prompt) after the edit")
    min_generalisation: float | None = Field(None, ge=0, le=1,
                                             description="least mean P(target_new) over the rephrase prompts")
    max_locality_drop: float | None = Field(None, ge=0, le=1,
                                            description="largest rise of P(target_new) on a locality prompt")
    probes: list[ProbeIn] = Field(default_factory=list, max_length=MAX_EXTRA_PROMPTS,
                                  description="continuations that must stay the greedy ones")


class EditIn(BaseModel):
    """One fact edit: make the model complete `prompt` (which names `subject`) with `target_new`.
    Text must not be blank, nor contain NUL characters or lone surrogates."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [EDIT_EXAMPLE]})

    subject: str = Field(description="the entity whose fact changes; appears verbatim in the prompt, or as '{}'",
                         json_schema_extra=text_schema(MAX_SUBJECT_CHARS))
    prompt: str = Field(description="text that the new fact completes, containing the subject",
                        json_schema_extra=text_schema(MAX_PROMPT_CHARS))
    target_new: str = Field(description="the new completion", json_schema_extra=text_schema(MAX_TARGET_CHARS))
    target_true: str | None = Field(None, description="the current completion, for the before/after metrics; "
                                                      "must differ from target_new",
                                    json_schema_extra=text_schema(MAX_TARGET_CHARS))
    rephrase_prompts: list[str] = Field(default_factory=list, description="paraphrases that should also change",
                                        json_schema_extra=prompts_schema())
    locality_prompts: list[str] = Field(default_factory=list, description="unrelated prompts that must not change",
                                        json_schema_extra=prompts_schema())
    method: Method | None = Field(None, description="editing method; default: the server's KNOWPATCH_METHOD")
    gates: GatesIn | None = Field(None, description="quality gates of this edit, on top of the server's")
    dry_run: bool = Field(False, description="only check the edit: the worker computes it in its turn, alone (never "
                                             "batched with other edits), measures it before/after and runs the "
                                             "quality gates on the pending weights, then records it `checked` "
                                             "(metrics_after.gates says what a real edit would meet); nothing is "
                                             "installed, the model version and weights stay as they are")
    metadata: dict[str, Any] | None = Field(None, description=f"free JSON kept with the request for audit, at most "
                                                              f"{MAX_METADATA_CHARS} characters as JSON")

    @field_validator("metadata")
    @classmethod
    def _bounded_metadata(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and len(json.dumps(value)) > MAX_METADATA_CHARS:
            raise ValueError(f"metadata is larger than {MAX_METADATA_CHARS} characters of JSON")
        return value


class EditListIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"edits": [EDIT_EXAMPLE]}]})

    edits: list[EditIn] = Field(min_length=1, max_length=MAX_EDITS_PER_REQUEST,
                                description=f"1 to {MAX_EDITS_PER_REQUEST} edits, applied in this order")


def _body_kind(value: Any) -> str:
    return EDIT_LIST_TAG if isinstance(value, dict) and "edits" in value else SINGLE_EDIT_TAG


EditSubmission = Annotated[
    Union[Annotated[EditIn, Tag(SINGLE_EDIT_TAG)], Annotated[EditListIn, Tag(EDIT_LIST_TAG)]],
    Discriminator(_body_kind),
]


class EditAccepted(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"id": EDIT_ID, "status": "queued", "queue_position": 0, "created_at": TIME}]})

    id: str
    status: str
    queue_position: int | None = Field(description="unfinished operations ahead of this edit (0 = next); null "
                                                   "once it is no longer queued")
    created_at: datetime


class EditListAccepted(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"edits": [
        {"id": EDIT_ID, "status": "queued", "queue_position": 0, "created_at": TIME}]}]})

    edits: list[EditAccepted]


class RollbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"reason": "KB-1234 was wrong"}]})

    reason: NonBlank = Field(min_length=1, max_length=MAX_REASON_CHARS, description="why, for the audit trail")


class RollbackAccepted(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"id": EDIT_ID, "status": "queued", "edit_status": "applied", "rollback_seq": 42, "queue_position": 0}]})

    id: str
    status: str = Field(description="the rollback's state: 'queued' until the worker takes it")
    edit_status: str = Field(description="the edit's status; it stays 'applied' until the worker reverts it")
    rollback_seq: int = Field(description="seq of the rollback operation; the model version once it is done")
    queue_position: int = Field(description="unfinished operations ahead of the rollback")


class EditEventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    event: str
    actor: str | None
    reason: str | None
    seq: int | None
    at: datetime


class FactorSummary(BaseModel):
    layer: int
    checksum: str
    dtype: str
    shapes: dict[str, list[int]] = Field(description="shapes of r, a (delta W = r a^T) and the key k")


class EditRecord(BaseModel):
    """An edit as the ledger holds it."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    status: EditStatus
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
    settings: dict[str, Any] | None = Field(
        None, description="what produced the edit: method, hyper-parameter profile and every value")
    error: str | None
    rollback_reason: str | None


RECORD_EXAMPLE: dict[str, Any] = {
    "id": EDIT_ID, "status": "applied", "subject": "Eiffel Tower",
    "request": dict(EDIT_EXAMPLE), "requested_by": "alice", "method": "alphaedit",
    "created_at": TIME, "updated_at": TIME, "applied_at": TIME, "rolled_back_at": None, "seq": 41,
    "batch_id": "b7e1", "model_version": 41, "metrics_before": {"prompt": {"target_new": 0.01, "target_true": 0.9}},
    "metrics_after": {"prompt": {"target_new": 0.95, "target_true": 0.02}}, "layers": [4, 5, 6],
    "update_norms": {"4": 1.2, "5": 1.1, "6": 0.9},
    "settings": {"method": "alphaedit", "profile": "default", "hparams": {"v_lr": 0.5, "v_stop_greedy_margin": 0.0}},
    "error": None, "rollback_reason": None,
}


class EditAudit(EditRecord):
    """The full audit record behind GET /edits/{id}."""

    model_config = ConfigDict(from_attributes=True, json_schema_extra={"examples": [{
        **RECORD_EXAMPLE, "queue_position": None,
        "history": [{"event": "queued", "actor": "alice", "reason": None, "seq": 41, "at": TIME},
                    {"event": "applying", "actor": None, "reason": "batch b7e1", "seq": 41, "at": TIME},
                    {"event": "applied", "actor": None, "reason": None, "seq": 41, "at": TIME}],
        "factors": [{"layer": 4, "checksum": "9c1f...", "dtype": "float32",
                     "shapes": {"r": [2048], "a": [8192], "k": [8192]}}],
    }]})

    queue_position: int | None
    history: list[EditEventOut]
    factors: list[FactorSummary]


class EditPage(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"items": [RECORD_EXAMPLE], "next_cursor": "c2VxOjQx"}]})

    items: list[EditRecord]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last page")
