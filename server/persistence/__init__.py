"""Relational state: ORM tables and the async engine."""

from server.persistence.db import Database
from server.persistence.tables import Base, Frame, Job, Model, OutboxMessage, Task

__all__ = ["Base", "Database", "Frame", "Job", "Model", "OutboxMessage", "Task"]
