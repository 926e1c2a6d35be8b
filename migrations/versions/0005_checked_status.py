"""edits.status 'checked': a dry run, computed and measured (quality gates included), never served.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""
from __future__ import annotations

from typing import Sequence, Union

from alembic import op

revision: str = "0005"
down_revision: Union[str, Sequence[str], None] = "0004"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

BEFORE = ("queued", "applying", "applied", "failed", "rolled_back", "cancelled", "rejected")
AFTER = BEFORE + ("checked",)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _status_check(values: tuple[str, ...]) -> None:
    # Batch mode: SQLite cannot alter a constraint, so the table is copied with the new one (env.py
    # lets it drop the old copy on a ledger with data).
    with op.batch_alter_table("edits") as batch:
        batch.drop_constraint("ck_edits_status", type_="check")
        batch.create_check_constraint("ck_edits_status", _in("status", values))


def upgrade() -> None:
    _status_check(AFTER)


def downgrade() -> None:
    # Dry runs never changed the model: as 'failed' they keep their measurements, and the error says what they were.
    op.execute("UPDATE edits SET status = 'failed', error = 'dry run (checked); never applied' "
               "WHERE status = 'checked'")
    _status_check(BEFORE)
