"""Lease timeout checker: tasks whose agent stopped heartbeating go back to the queue."""

from server.jobs.service import requeue_expired

__all__ = ["requeue_expired"]
