"""operations.attempts: how many times a worker has claimed the operation, so that one which keeps
failing (or keeps killing the worker) is failed after a bounded number of tries.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""
from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: Union[str, Sequence[str], None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # Nullable: operations written before this revision were never counted (null reads as 0).
    with op.batch_alter_table("operations") as batch:
        batch.add_column(sa.Column("attempts", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("operations") as batch:
        batch.drop_column("attempts")
