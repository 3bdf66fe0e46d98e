"""GPU routing and the failure policy: job devices, task routes and failures, agent routes.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

* ``jobs.device`` (``any`` for existing rows), ``jobs.cpu_fallback`` (false) and
  ``jobs.failures`` (0: failed attempts of its tasks, so that the blocklist is looked up only
  for jobs that had enough);
* ``tasks.route`` (the route a task was dispatched to; set to the pool for tasks waiting in
  the broker now, which is where they are), ``not_before`` (retry backoff),
  ``failed_agents`` (JSON list, NULL for none), ``failure_kind``, ``device_used``, ``fallback``;
  the dispatcher's index ``ix_tasks_dispatch`` gains ``route`` (in-flight counts per route
  are read from the index alone);
* ``agents.route`` (set to the agent's pool: agents registered so far advertised no backend
  the farm routed by);
* ``outbox.queue`` widened to 160 characters (route queues are longer than pool queues);
* the ``task_failures`` table: one row per failed attempt, indexed for the blocklist
  (``job_id, agent, cleared_at``) and per task.

Like 0001 and 0002, what it creates is declared here, frozen.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from alembic.operations import ops
from sqlalchemy.dialects import mysql

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIME = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
MYSQL_OPTIONS = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}


def schema() -> sa.MetaData:
    """The table this revision creates (a fresh ``MetaData``)."""
    md = sa.MetaData()
    sa.Table("jobs", md, sa.Column("id", sa.String(32), primary_key=True))
    sa.Table("tasks", md, sa.Column("id", sa.String(32), primary_key=True))
    sa.Table(
        "task_failures",
        md,
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("task_id", sa.String(32), nullable=False),
        sa.Column("agent", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("at", TIME, nullable=False),
        sa.Column("cleared_at", TIME, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_task_failures"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_task_failures_job_id_jobs"),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name="fk_task_failures_task_id_tasks"),
        sa.Index("ix_task_failures_job_agent", "job_id", "agent", "cleared_at"),
        sa.Index("ix_task_failures_task_id", "task_id"),
        **MYSQL_OPTIONS,
    )
    return md


def new_columns() -> dict[str, tuple[sa.Column, ...]]:
    """Columns added to earlier tables (fresh objects); existing rows get the server defaults."""
    return {
        "jobs": (
            sa.Column("device", sa.String(16), nullable=False, server_default="any"),
            sa.Column("cpu_fallback", sa.Boolean(), nullable=False, server_default=sa.false()),
            sa.Column("failures", sa.Integer(), nullable=False, server_default="0"),
        ),
        "tasks": (
            sa.Column("route", sa.String(128), nullable=True),
            sa.Column("not_before", TIME, nullable=True),
            sa.Column("failed_agents", sa.JSON(), nullable=True),
            sa.Column("failure_kind", sa.String(32), nullable=False, server_default=""),
            sa.Column("device_used", sa.String(255), nullable=False, server_default=""),
            sa.Column("fallback", sa.Boolean(), nullable=False, server_default=sa.false()),
        ),
        "agents": (sa.Column("route", sa.String(128), nullable=False, server_default="default"),),
    }


def upgrade() -> None:
    """Add the columns, fill the routes of existing rows, widen the outbox queue, rebuild the
    dispatcher's index with ``route``, then create ``task_failures``."""
    for table, columns in new_columns().items():
        for column in columns:
            op.add_column(table, column)
    op.execute("UPDATE agents SET route = pool")
    op.execute("UPDATE tasks SET route = pool WHERE state = 'queued' AND dispatched_at IS NOT NULL")
    with op.batch_alter_table("outbox") as batch:
        batch.alter_column(
            "queue", existing_type=sa.String(64), type_=sa.String(160), existing_nullable=False
        )
    op.drop_index("ix_tasks_dispatch", table_name="tasks")
    op.create_index("ix_tasks_dispatch", "tasks", ["pool", "state", "dispatched_at", "route"])
    table = schema().tables["task_failures"]
    op.invoke(ops.CreateTableOp.from_table(table))
    for index in sorted(table.indexes, key=lambda ix: ix.name or ""):
        op.invoke(ops.CreateIndexOp.from_index(index))


def downgrade() -> None:
    """Drop ``task_failures`` (and so its rows), the new columns and the index's ``route``."""
    op.drop_table("task_failures")
    op.drop_index("ix_tasks_dispatch", table_name="tasks")
    op.create_index("ix_tasks_dispatch", "tasks", ["pool", "state", "dispatched_at"])
    with op.batch_alter_table("outbox") as batch:
        batch.alter_column(
            "queue", existing_type=sa.String(160), type_=sa.String(64), existing_nullable=False
        )
    for table, columns in new_columns().items():
        with op.batch_alter_table(table) as batch:
            for column in reversed(columns):
                batch.drop_column(column.name)
