"""Initial schema: models, jobs, tasks, frames, outbox, agents.

Revision ID: 0001
Revises:
Create Date: 2026-11-30

The tables are declared here, frozen (not imported from ``tables.py``, which moves on
with later revisions), so that :func:`schema` also serves to recognise a database
that ``create_all`` made before migrations existed. Every constraint and index is
named. On MySQL/MariaDB the tables are InnoDB, ``utf8mb4`` with the binary collation
``utf8mb4_bin``, so that text compares and sorts as on SQLite (case-sensitive: agent
names ``Node1`` and ``node1`` are two agents on both backends).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from alembic.operations import ops
from sqlalchemy.dialects import mysql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIME = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
"""Naive UTC with microseconds on every backend."""
MYSQL_OPTIONS = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}


def _id(name: str = "id") -> sa.Column:
    return sa.Column(name, sa.String(32), nullable=False)


def schema() -> sa.MetaData:
    """The tables, constraints and indexes this revision creates (a fresh ``MetaData``)."""
    md = sa.MetaData()
    sa.Table(
        "models",
        md,
        _id(),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("main", sa.String(1024), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("storage_key", sa.String(255), nullable=False),
        sa.Column("info", sa.JSON(), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_models"),
        sa.Index("ix_models_sha256", "sha256"),
        **MYSQL_OPTIONS,
    )
    sa.Table(
        "jobs",
        md,
        _id(),
        _id("model_id"),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("frames_spec", sa.Text(), nullable=False),
        sa.Column("frame_count", sa.Integer(), nullable=False),
        sa.Column("chunk_size", sa.Integer(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("pool", sa.String(64), nullable=False),
        sa.Column("scene", sa.String(255), nullable=True),
        sa.Column("overrides", sa.JSON(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("updated_at", TIME, nullable=False),
        sa.Column("finished_at", TIME, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name="fk_jobs_model_id_models"),
        sa.Index("ix_jobs_model_id", "model_id"),
        sa.Index("ix_jobs_state", "state"),
        sa.Index("ix_jobs_created_at", "created_at"),
        **MYSQL_OPTIONS,
    )
    sa.Table(
        "tasks",
        md,
        _id(),
        _id("job_id"),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("pool", sa.String(64), nullable=False),
        sa.Column("dispatched_at", TIME, nullable=True),
        sa.Column("frames", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_id", sa.String(32), nullable=True),
        sa.Column("lease_expires_at", TIME, nullable=True),
        sa.Column("agent", sa.String(255), nullable=True),
        sa.Column("current_frame", sa.Integer(), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("log_tail", sa.JSON(), nullable=False),
        sa.Column("render_seconds", sa.Double(), nullable=False),
        sa.Column("started_at", TIME, nullable=True),
        sa.Column("finished_at", TIME, nullable=True),
        sa.Column("updated_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_tasks"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_tasks_job_id_jobs"),
        sa.Index("ix_tasks_state_lease", "state", "lease_expires_at"),
        sa.Index("ix_tasks_job_queue", "job_id", "state", "dispatched_at", "index"),
        sa.Index("ix_tasks_dispatch", "pool", "state", "dispatched_at"),
        **MYSQL_OPTIONS,
    )
    sa.Table(
        "frames",
        md,
        sa.Column("id", sa.Integer(), nullable=False, autoincrement=True),
        _id("job_id"),
        _id("task_id"),
        sa.Column("frame", sa.Integer(), nullable=False),
        sa.Column("storage_key", sa.String(255), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_frames"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_frames_job_id_jobs"),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name="fk_frames_task_id_tasks"),
        sa.UniqueConstraint("job_id", "frame", name="uq_frames_job_frame"),
        sa.Index("ix_frames_task_id", "task_id"),
        **MYSQL_OPTIONS,
    )
    sa.Table(
        "outbox",
        md,
        sa.Column("id", sa.Integer(), nullable=False, autoincrement=True),
        sa.Column("queue", sa.String(64), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("published_at", TIME, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
        sa.Index("ix_outbox_published_at", "published_at"),
        **MYSQL_OPTIONS,
    )
    sa.Table(
        "agents",
        md,
        _id(),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("pool", sa.String(64), nullable=False),
        sa.Column("capabilities", sa.JSON(), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("instance", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("current_task_id", sa.String(32), nullable=True),
        sa.Column("registered_at", TIME, nullable=False),
        sa.Column("last_seen_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_agents"),
        sa.UniqueConstraint("name", name="uq_agents_name"),
        sa.Index("ix_agents_last_seen_at", "last_seen_at"),
        **MYSQL_OPTIONS,
    )
    return md


def upgrade() -> None:
    """Create every table, then its indexes."""
    for table in schema().sorted_tables:
        op.invoke(ops.CreateTableOp.from_table(table))
        for index in sorted(table.indexes, key=lambda ix: ix.name or ""):
            op.invoke(ops.CreateIndexOp.from_index(index))


def downgrade() -> None:
    """Drop every table (and so its data)."""
    for table in reversed(schema().sorted_tables):
        op.drop_table(table.name)
