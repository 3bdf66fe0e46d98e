"""Agents can be disabled: ``agents.enabled``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-15

* ``agents.enabled`` (true for existing rows): an admin disables an agent with
  ``PATCH /api/agents/{name}``; a disabled agent's claims are refused and the dispatcher
  routes nothing to it.

Like the earlier revisions, what it adds is declared here, frozen.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def new_columns() -> dict[str, tuple[sa.Column, ...]]:
    """Columns added to earlier tables (fresh objects); existing rows get the server defaults."""
    return {"agents": (sa.Column("enabled", sa.Boolean(), nullable=False, server_default=sa.true()),)}


def upgrade() -> None:
    """Add ``agents.enabled``: every agent registered so far is enabled."""
    for table, columns in new_columns().items():
        for column in columns:
            op.add_column(table, column)


def downgrade() -> None:
    """Drop ``agents.enabled`` (disabled agents are enabled again)."""
    for table, columns in new_columns().items():
        with op.batch_alter_table(table) as batch:
            for column in reversed(columns):
                batch.drop_column(column.name)
