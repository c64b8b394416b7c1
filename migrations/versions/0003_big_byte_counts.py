"""Byte and token counts as 64-bit integers on PostgreSQL (its INTEGER stops at 2 GiB).

SQLite's INTEGER already holds 64 bits, so there this revision changes nothing; the models
declare these columns BigInteger with an INTEGER variant for SQLite, so both databases match.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (  # table, column, nullable
    ("files", "bytes", False),
    ("adapters", "size_bytes", False),
    ("fine_tuning_jobs", "trained_tokens", True),
)


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    for table, column, nullable in COLUMNS:
        op.alter_column(table, column, type_=sa.BigInteger(), existing_nullable=nullable)


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    for table, column, nullable in COLUMNS:
        op.alter_column(table, column, type_=sa.Integer(), existing_nullable=nullable)
