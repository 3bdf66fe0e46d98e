"""Relational state: ORM tables, the async engine, migrations and transaction retries."""

from server.persistence.db import Database, normalize_url, redact_url
from server.persistence.retry import is_retryable, retry_on_disconnect, run_in_tx
from server.persistence.tables import Agent, Base, Frame, Job, Model, OutboxMessage, Task

__all__ = [
    "Agent",
    "Base",
    "Database",
    "Frame",
    "Job",
    "Model",
    "OutboxMessage",
    "Task",
    "is_retryable",
    "normalize_url",
    "redact_url",
    "retry_on_disconnect",
    "run_in_tx",
]
