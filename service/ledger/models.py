"""The edit ledger's tables (SQLAlchemy 2 typed mappings).

migrations/versions/*.py create the same schema; tests/ledger/test_migrations.py checks that the two
agree. The schema must work on both SQLite (embedded) and Postgres (production).
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

ZERO_HASH = "0" * 64

OP_KINDS = ("apply", "rollback")
OP_STATUSES = ("queued", "applying", "done", "failed", "cancelled")
# rejected: computed, but it failed a quality gate, so it was never served (its operation is 'failed').
# checked: a dry run, computed and measured (gates included) but never served, whatever the gates said
# (its operation is 'failed' too: finished, no chain link).
EDIT_STATUSES = ("queued", "applying", "applied", "failed", "rolled_back", "cancelled", "rejected", "checked")
EVENTS = ("queued", "applying", "applied", "failed", "rollback_requested", "rolled_back", "cancelled", "rejected",
          "checked")

# Named constraints, so later migrations (and SQLite batch mode) can refer to them.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out on both backends (SQLite stores naive text and drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("ledger timestamps must be timezone-aware (use datetime.now(timezone.utc))")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class Edit(Base):
    """One fact-edit request and its whole life: the audit record behind GET /edits/{id}."""

    __tablename__ = "edits"
    __table_args__ = (
        CheckConstraint(_in("status", EDIT_STATUSES), name="status"),
        Index("ix_edits_status_seq", "status", "seq"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    subject: Mapped[str] = mapped_column(Text, index=True)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    requested_by: Mapped[str] = mapped_column(String(255))
    method: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    applied_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    rolled_back_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # seq of the edit's 'apply' operation: its place in the global order. Not a foreign key, to keep
    # the edits <-> operations reference one-way (no circular insert).
    seq: Mapped[int | None] = mapped_column(Integer, unique=True)
    batch_id: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[int | None] = mapped_column(Integer)
    metrics_before: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    metrics_after: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    layers: Mapped[list[Any] | None] = mapped_column(JSON)
    update_norms: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # {str(layer): norm}
    settings: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # method, profile, hyper-parameters
    error: Mapped[str | None] = mapped_column(Text)
    rollback_reason: Mapped[str | None] = mapped_column(Text)

    def __repr__(self) -> str:
        return f"<Edit {self.id} {self.status} seq={self.seq}>"


class Operation(Base):
    """One step of the global order: applying or rolling back an edit. seq is THE order."""

    __tablename__ = "operations"
    __table_args__ = (
        CheckConstraint(_in("kind", OP_KINDS), name="kind"),
        CheckConstraint(_in("status", OP_STATUSES), name="status"),
        Index("ix_operations_status_seq", "status", "seq"),
        # AUTOINCREMENT on SQLite: a seq is never reused, even after the last row is deleted.
        {"sqlite_autoincrement": True},
    )

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))
    edit_id: Mapped[str] = mapped_column(ForeignKey("edits.id"), index=True)
    status: Mapped[str] = mapped_column(String(16))
    batch_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Who asked for a rollback and why (null for applies: the edit row holds that).
    actor: Mapped[str | None] = mapped_column(String(255))
    reason: Mapped[str | None] = mapped_column(Text)
    weights_digest: Mapped[str | None] = mapped_column(String(64))
    # Times a worker claimed the op (mark_applying); null on rows older than migration 0003 (= 0).
    attempts: Mapped[int | None] = mapped_column(Integer)
    prev_hash: Mapped[str | None] = mapped_column(String(64))
    hash: Mapped[str | None] = mapped_column(String(64))

    def __repr__(self) -> str:
        return f"<Operation {self.seq} {self.kind} {self.status} edit={self.edit_id}>"


class EditFactor(Base):
    """The rank-one factors of one edit at one layer, encoded by service.ledger.codec."""

    __tablename__ = "edit_factors"

    edit_id: Mapped[str] = mapped_column(ForeignKey("edits.id"), primary_key=True)
    layer: Mapped[int] = mapped_column(Integer, primary_key=True)
    r: Mapped[bytes] = mapped_column(LargeBinary)
    a: Mapped[bytes] = mapped_column(LargeBinary)
    k: Mapped[bytes] = mapped_column(LargeBinary)
    dtype: Mapped[str] = mapped_column(String(16))
    r_shape: Mapped[list[Any]] = mapped_column(JSON)
    a_shape: Mapped[list[Any]] = mapped_column(JSON)
    k_shape: Mapped[list[Any]] = mapped_column(JSON)
    checksum: Mapped[str] = mapped_column(String(64))


class EditEvent(Base):
    """Append-only audit trail of an edit."""

    __tablename__ = "edit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    edit_id: Mapped[str] = mapped_column(ForeignKey("edits.id"), index=True)
    event: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str | None] = mapped_column(String(255))
    reason: Mapped[str | None] = mapped_column(Text)
    seq: Mapped[int | None] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UTCDateTime)


class IdempotencyKey(Base):
    """An Idempotency-Key already used by a requester, and the edits it created."""

    __tablename__ = "idempotency_keys"

    requested_by: Mapped[str] = mapped_column(String(255), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    edit_ids: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
