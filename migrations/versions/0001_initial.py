"""The initial ledger schema: edits, operations, edit_factors, edit_events, idempotency_keys.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Self-contained on purpose (no imports from service.ledger.models): a migration must keep creating
the schema of its own time after the models move on.
"""
from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

TS = sa.DateTime(timezone=True)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    op.create_table(
        "edits",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("requested_by", sa.String(255), nullable=False),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("applied_at", TS, nullable=True),
        sa.Column("rolled_back_at", TS, nullable=True),
        sa.Column("seq", sa.Integer(), nullable=True),
        sa.Column("batch_id", sa.String(64), nullable=True),
        sa.Column("model_version", sa.Integer(), nullable=True),
        sa.Column("metrics_before", sa.JSON(), nullable=True),
        sa.Column("metrics_after", sa.JSON(), nullable=True),
        sa.Column("layers", sa.JSON(), nullable=True),
        sa.Column("update_norms", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("rollback_reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_edits"),
        sa.UniqueConstraint("seq", name="uq_edits_seq"),
        sa.CheckConstraint(
            _in("status", ("queued", "applying", "applied", "failed", "rolled_back", "cancelled")),
            name="ck_edits_status",
        ),
    )
    op.create_index("ix_edits_subject", "edits", ["subject"])
    op.create_index("ix_edits_status_seq", "edits", ["status", "seq"])

    op.create_table(
        "operations",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("edit_id", sa.String(36), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("batch_id", sa.String(64), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=True),
        sa.Column("actor", sa.String(255), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("weights_digest", sa.String(64), nullable=True),
        sa.Column("prev_hash", sa.String(64), nullable=True),
        sa.Column("hash", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("seq", name="pk_operations"),
        sa.ForeignKeyConstraint(["edit_id"], ["edits.id"], name="fk_operations_edit_id_edits"),
        sa.CheckConstraint(_in("kind", ("apply", "rollback")), name="ck_operations_kind"),
        sa.CheckConstraint(
            _in("status", ("queued", "applying", "done", "failed", "cancelled")), name="ck_operations_status"
        ),
        sqlite_autoincrement=True,  # never reuse a seq
    )
    op.create_index("ix_operations_edit_id", "operations", ["edit_id"])
    op.create_index("ix_operations_status_seq", "operations", ["status", "seq"])

    op.create_table(
        "edit_factors",
        sa.Column("edit_id", sa.String(36), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("r", sa.LargeBinary(), nullable=False),
        sa.Column("a", sa.LargeBinary(), nullable=False),
        sa.Column("k", sa.LargeBinary(), nullable=False),
        sa.Column("dtype", sa.String(16), nullable=False),
        sa.Column("r_shape", sa.JSON(), nullable=False),
        sa.Column("a_shape", sa.JSON(), nullable=False),
        sa.Column("k_shape", sa.JSON(), nullable=False),
        sa.Column("checksum", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("edit_id", "layer", name="pk_edit_factors"),
        sa.ForeignKeyConstraint(["edit_id"], ["edits.id"], name="fk_edit_factors_edit_id_edits"),
    )

    op.create_table(
        "edit_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("edit_id", sa.String(36), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(255), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("seq", sa.Integer(), nullable=True),
        sa.Column("at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_edit_events"),
        sa.ForeignKeyConstraint(["edit_id"], ["edits.id"], name="fk_edit_events_edit_id_edits"),
    )
    op.create_index("ix_edit_events_edit_id", "edit_events", ["edit_id"])

    op.create_table(
        "idempotency_keys",
        sa.Column("requested_by", sa.String(255), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("edit_ids", sa.JSON(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("requested_by", "key", name="pk_idempotency_keys"),
    )


def downgrade() -> None:
    op.drop_table("idempotency_keys")
    op.drop_index("ix_edit_events_edit_id", table_name="edit_events")
    op.drop_table("edit_events")
    op.drop_table("edit_factors")
    op.drop_index("ix_operations_status_seq", table_name="operations")
    op.drop_index("ix_operations_edit_id", table_name="operations")
    op.drop_table("operations")
    op.drop_index("ix_edits_status_seq", table_name="edits")
    op.drop_index("ix_edits_subject", table_name="edits")
    op.drop_table("edits")
