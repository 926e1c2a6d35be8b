"""edits.status 'rejected': an edit that failed a quality gate and was never served.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""
from __future__ import annotations

from typing import Sequence, Union

from alembic import op

revision: str = "0004"
down_revision: Union[str, Sequence[str], None] = "0003"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

BEFORE = ("queued", "applying", "applied", "failed", "rolled_back", "cancelled")
AFTER = BEFORE + ("rejected",)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _status_check(values: tuple[str, ...]) -> None:
    # Batch mode: SQLite cannot alter a constraint, so the table is copied with the new one.
    with op.batch_alter_table("edits") as batch:
        batch.drop_constraint("ck_edits_status", type_="check")
        batch.create_check_constraint("ck_edits_status", _in("status", values))


def upgrade() -> None:
    _status_check(AFTER)


def downgrade() -> None:
    # Rejected edits never changed the model: as 'failed' they keep their error and measurements.
    op.execute("UPDATE edits SET status = 'failed' WHERE status = 'rejected'")
    _status_check(BEFORE)
