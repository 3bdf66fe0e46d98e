"""Background loops: the outbox relay (dispatch) and the lease timeout checker."""

from server.scheduler.loops import Scheduler

__all__ = ["Scheduler"]
