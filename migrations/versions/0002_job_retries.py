"""Job retries that count only runs without progress, with a backoff between them.

`failed_attempts` (runs in a row that stopped without a new checkpoint), `attempt_from_step` (the
newest checkpoint when the current run was claimed) and `retry_at` (a retried job is not claimed
before then) on fine_tuning_jobs.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # server_default: rows written before this revision get 0, i.e. no failed run counted yet.
    with op.batch_alter_table("fine_tuning_jobs") as batch:
        batch.add_column(
            sa.Column("failed_attempts", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("attempt_from_step", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("retry_at", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fine_tuning_jobs") as batch:
        batch.drop_column("retry_at")
        batch.drop_column("attempt_from_step")
        batch.drop_column("failed_attempts")
