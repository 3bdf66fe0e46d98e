"""ORM tables (SQLAlchemy 2.0 declarative). Ids are 32-char hex UUIDs; times are naive UTC.

Times keep microseconds on every backend (MySQL's ``DATETIME`` drops them unless
declared ``DATETIME(6)``), so that lease expiry and latencies are exact.
Every schema change comes with an Alembic migration (``server/persistence/migrations``).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def new_id() -> str:
    """A new random id: 32 lowercase hex characters."""
    return uuid.uuid4().hex


def utcnow() -> datetime:
    """The current time in UTC, naive (every backend stores naive UTC)."""
    return datetime.now(UTC).replace(tzinfo=None)


TIMESTAMP_US = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
"""A naive UTC time with microseconds on SQLite, MySQL and MariaDB."""
DEFAULT_POOL = "default"
"""The capability pool of a job that asks for nothing in particular."""
DEFAULT_DEVICE = "any"
"""The device of a job that asks for nothing in particular (``protocol.devices.DEFAULT_DEVICE``)."""


class Base(DeclarativeBase):
    """Declarative base of every table."""

    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSON,
        list[Any]: JSON,
        datetime: TIMESTAMP_US,
    }


class Model(Base):
    """An uploaded .blend or .zip package, stored under ``storage_key``."""

    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    filename: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(8))  # blend | zip
    main: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    storage_key: Mapped[str] = mapped_column(String(255))
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    project_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    """The project the model belongs to (None only for rows made before projects existed: admins only)."""
    owner_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    """The user who uploaded it."""


class Job(Base):
    """A request to render frames of a model; split into tasks."""

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    name: Mapped[str] = mapped_column(String(255), default="")
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    frames_spec: Mapped[str] = mapped_column(Text)
    frame_count: Mapped[int] = mapped_column(Integer)
    chunk_size: Mapped[int] = mapped_column(Integer)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    owner: Mapped[str] = mapped_column(String(255), default="")
    """Who submitted the job, by user name (the dispatcher is fair between owners)."""
    owner_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    """The submitting user's id (an artist manages the jobs whose ``owner_id`` is theirs)."""
    project_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    """The project of the job's model; its members see the job, others get 404."""
    pool: Mapped[str] = mapped_column(String(64), default=DEFAULT_POOL)
    """The capability pool whose agents may render it."""
    device: Mapped[str] = mapped_column(String(16), default=DEFAULT_DEVICE)
    """What it renders on (``protocol.devices.DEVICES``): ``any``, ``cpu``, ``gpu``, ``gpu:optix``..."""
    cpu_fallback: Mapped[bool] = mapped_column(Boolean, default=False)
    """Whether an attempt whose GPU devices fail may render on the CPU instead."""
    failures: Mapped[int] = mapped_column(Integer, default=0)
    """Failed attempts of its tasks so far (rows in ``task_failures``, cleared or not): while it is
    below ``blocklist_after`` no agent can be blocklisted for the job, and nothing is looked up."""
    scene: Mapped[str | None] = mapped_column(String(255), nullable=True)
    overrides: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    message: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)

    tasks: Mapped[list[Task]] = relationship(back_populates="job", order_by="Task.index")


class Task(Base):
    """A chunk of a job's frames, rendered by one agent in one Blender process per attempt."""

    __tablename__ = "tasks"
    __table_args__ = (
        Index("ix_tasks_state_lease", "state", "lease_expires_at"),
        Index("ix_tasks_job_queue", "job_id", "state", "dispatched_at", "index"),
        Index("ix_tasks_dispatch", "pool", "state", "dispatched_at", "route"),
    )
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    index: Mapped[int] = mapped_column(Integer)
    pool: Mapped[str] = mapped_column(String(64), default=DEFAULT_POOL)
    dispatched_at: Mapped[datetime | None] = mapped_column(nullable=True)
    """When the dispatcher put the task's message in the outbox (None: not dispatched yet)."""
    route: Mapped[str | None] = mapped_column(String(128), nullable=True)
    """The route (``protocol.devices.route_key``) whose queue it was dispatched to (None: not dispatched)."""
    not_before: Mapped[datetime | None] = mapped_column(nullable=True)
    """Not dispatched before this time (the backoff after a failed attempt); None: at once."""
    failed_agents: Mapped[list[Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    """Names of the agents whose attempt failed (they do not get it again); None: none."""
    failure_kind: Mapped[str] = mapped_column(String(32), default="")
    """How the last failed attempt failed (``protocol.messages.FAILURE_KINDS``); empty: none failed."""
    device_used: Mapped[str] = mapped_column(String(255), default="")
    """The devices the last attempt rendered on, as the agent reported them (``"OPTIX: ..."``, ``"CPU"``)."""
    fallback: Mapped[bool] = mapped_column(Boolean, default=False)
    """The last attempt rendered on the CPU although the job asked for a GPU (the job allowed it)."""
    frames: Mapped[list[Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(nullable=True)
    agent: Mapped[str | None] = mapped_column(String(255), nullable=True)
    current_frame: Mapped[int | None] = mapped_column(Integer, nullable=True)
    message: Mapped[str] = mapped_column(Text, default="")
    log_tail: Mapped[list[Any]] = mapped_column(JSON, default=list)
    render_seconds: Mapped[float] = mapped_column(Double, default=0.0)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    job: Mapped[Job] = relationship(back_populates="tasks")


class Frame(Base):
    """One stored output frame. At most one row (and one object) per job and frame number."""

    __tablename__ = "frames"
    __table_args__ = (UniqueConstraint("job_id", "frame", name="uq_frames_job_frame"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id"), index=True)
    frame: Mapped[int] = mapped_column(Integer)
    storage_key: Mapped[str] = mapped_column(String(255))
    filename: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class OutboxMessage(Base):
    """A broker message committed with the state change that causes it; a relay publishes it."""

    __tablename__ = "outbox"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    queue: Mapped[str] = mapped_column(String(160))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(nullable=True, index=True)


class Agent(Base):
    """A node agent that registered with the server; online while it heartbeats."""

    __tablename__ = "agents"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    pool: Mapped[str] = mapped_column(String(64), default=DEFAULT_POOL)
    route: Mapped[str] = mapped_column(String(128), default=DEFAULT_POOL)
    """Its route (``protocol.devices.route_key`` of its pool and GPU backends): the queue it consumes."""
    capabilities: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    """``{"cpu_cores": int, "memory_bytes": int, "gpus": [...], "backends": [...],
    "blender": str, "tags": [...]}`` as the agent advertised it."""
    version: Mapped[str] = mapped_column(String(64), default="")
    instance: Mapped[str] = mapped_column(String(64), default="")
    """A random id of the agent process now using the name (two processes may not share one)."""
    state: Mapped[str] = mapped_column(String(16), default="online")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    """False once an admin disabled it (``PATCH /api/agents/{name}``): its claims are refused and
    the dispatcher routes nothing to it; a task it is rendering runs to its end. It still heartbeats."""
    current_task_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    registered_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class TaskFailure(Base):
    """One failed attempt of a task: which agent, how (``kind``) and why. An agent with
    ``settings.blocklist_after`` rows of a job not cleared (``cleared_at`` NULL) is blocklisted
    for that job."""

    __tablename__ = "task_failures"
    __table_args__ = (
        Index("ix_task_failures_job_agent", "job_id", "agent", "cleared_at"),
        Index("ix_task_failures_task_id", "task_id"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id"))
    agent: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    cleared_at: Mapped[datetime | None] = mapped_column(nullable=True)
    """When someone cleared the agent's blocklisting for the job (the row then no longer counts)."""


class User(Base):
    """A person who logs in. Passwords are argon2id hashes (argon2-cffi)."""

    __tablename__ = "users"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    disabled_at: Mapped[datetime | None] = mapped_column(nullable=True)
    token_version: Mapped[int] = mapped_column(Integer, default=0)
    """Bumped when the password changes or the user is disabled: older access tokens stop working."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Project(Base):
    """A project: models and jobs belong to one; users hold a role in it."""

    __tablename__ = "projects"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Membership(Base):
    """A user's role (``manager``, ``artist`` or ``viewer``) in one project."""

    __tablename__ = "memberships"
    __table_args__ = (UniqueConstraint("project_id", "user_id", name="uq_memberships_project_user"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    role: Mapped[str] = mapped_column(String(16))


class ApiToken(Base):
    """An opaque token, stored as its SHA-256 only: ``personal`` (CLI, add-on), ``agent`` or ``refresh``.

    Refresh tokens of one login share a ``family_id``; using one marks it ``used_at`` and
    issues the next, and presenting a used one revokes the whole family.
    """

    __tablename__ = "api_tokens"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[str | None] = mapped_column(ForeignKey("users.id"), nullable=True, index=True)
    agent_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    name: Mapped[str] = mapped_column(String(255), default="")
    family_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    created_by: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(nullable=True)
    used_at: Mapped[datetime | None] = mapped_column(nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)


class AuditEntry(Base):
    """One audit row. Append-only; ``hash`` is SHA-256 over ``prev_hash`` and the row's fields."""

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_action_actor_at", "action", "actor", "at"),
        Index("ix_audit_action_ip_at", "action", "ip", "at"),
        Index("ix_audit_at", "at"),
    )
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(255), default="")
    actor_kind: Mapped[str] = mapped_column(String(16), default="anonymous")
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(255), default="")
    project_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    ip: Mapped[str] = mapped_column(String(64), default="")
    user_agent: Mapped[str] = mapped_column(String(255), default="")
    outcome: Mapped[str] = mapped_column(String(16))
    status: Mapped[int] = mapped_column(Integer, default=0)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """The single row (``id`` 1) holding the last audit ``seq`` and ``hash``; appends lock it in turn."""

    __tablename__ = "audit_head"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger, default=0)
    hash: Mapped[str] = mapped_column(String(64))
