"""Accounts: users, projects, memberships, tokens, the audit log; jobs and models get a project.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30

Like 0001, the tables are declared here, frozen. Rows made before this revision have no
project (``project_id`` NULL): only admins see them.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from alembic.operations import ops
from sqlalchemy.dialects import mysql

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIME = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
MYSQL_OPTIONS = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}


def _id(name: str = "id", nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.String(32), nullable=nullable)


def schema() -> sa.MetaData:
    """The tables this revision creates (a fresh ``MetaData``)."""
    md = sa.MetaData()
    sa.Table(
        "users",
        md,
        _id(),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("disabled_at", TIME, nullable=True),
        sa.Column("token_version", sa.Integer(), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("username", name="uq_users_username"),
        **MYSQL_OPTIONS,
    )
    sa.Table(
        "projects",
        md,
        _id(),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_projects"),
        sa.UniqueConstraint("name", name="uq_projects_name"),
        **MYSQL_OPTIONS,
    )
    sa.Table(
        "memberships",
        md,
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        _id("project_id"),
        _id("user_id"),
        sa.Column("role", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_memberships"),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], name="fk_memberships_project_id_projects"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_memberships_user_id_users"),
        sa.UniqueConstraint("project_id", "user_id", name="uq_memberships_project_user"),
        sa.Index("ix_memberships_user_id", "user_id"),
        **MYSQL_OPTIONS,
    )
    sa.Table(
        "api_tokens",
        md,
        _id(),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        _id("user_id", nullable=True),
        sa.Column("agent_name", sa.String(255), nullable=True),
        sa.Column("name", sa.String(255), nullable=False),
        _id("family_id", nullable=True),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("expires_at", TIME, nullable=True),
        sa.Column("last_used_at", TIME, nullable=True),
        sa.Column("used_at", TIME, nullable=True),
        sa.Column("revoked_at", TIME, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_tokens"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_api_tokens_user_id_users"),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
        sa.Index("ix_api_tokens_user_id", "user_id"),
        sa.Index("ix_api_tokens_family_id", "family_id"),
        **MYSQL_OPTIONS,
    )
    sa.Table(
        "audit_log",
        md,
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("at", TIME, nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("actor_kind", sa.String(16), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(255), nullable=False),
        _id("project_id", nullable=True),
        sa.Column("ip", sa.String(64), nullable=False),
        sa.Column("user_agent", sa.String(255), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_audit_log"),
        sa.Index("ix_audit_action_actor_at", "action", "actor", "at"),
        sa.Index("ix_audit_action_ip_at", "action", "ip", "at"),
        sa.Index("ix_audit_at", "at"),
        **MYSQL_OPTIONS,
    )
    sa.Table(
        "audit_head",
        md,
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_head"),
        **MYSQL_OPTIONS,
    )
    return md


NEW_COLUMNS = {
    "models": ("project_id", "owner_id"),
    "jobs": ("project_id", "owner_id"),
}
"""Columns added to 0001's tables (nullable ids; ``project_id`` indexed)."""


def upgrade() -> None:
    """Create the new tables and their indexes, then add the project columns."""
    for table in schema().sorted_tables:
        op.invoke(ops.CreateTableOp.from_table(table))
        for index in sorted(table.indexes, key=lambda ix: ix.name or ""):
            op.invoke(ops.CreateIndexOp.from_index(index))
    for table, columns in NEW_COLUMNS.items():
        for column in columns:
            op.add_column(table, sa.Column(column, sa.String(32), nullable=True))
        op.create_index(f"ix_{table}_project_id", table, ["project_id"])


def downgrade() -> None:
    """Drop the project columns and the new tables (and so their data)."""
    for table in NEW_COLUMNS:
        op.drop_index(f"ix_{table}_project_id", table_name=table)
        with op.batch_alter_table(table) as batch:
            for column in reversed(NEW_COLUMNS[table]):
                batch.drop_column(column)
    for table in reversed(schema().sorted_tables):
        op.drop_table(table.name)
