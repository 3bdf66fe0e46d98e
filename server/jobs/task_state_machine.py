"""Task and job states, the allowed transitions, and how a job's state follows from its tasks.

Task: ``queued -> running -> completed | failed``; ``running -> queued`` when
its lease is lost and attempts remain; ``queued | running -> canceled``.
Job: ``queued`` until a task runs, ``running`` while any task is unfinished,
then ``completed`` (every task completed), ``failed`` (any task failed) or
``canceled``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

QUEUED, RUNNING, COMPLETED, FAILED, CANCELED = "queued", "running", "completed", "failed", "canceled"
TASK_STATES = (QUEUED, RUNNING, COMPLETED, FAILED, CANCELED)
FINISHED = frozenset({COMPLETED, FAILED, CANCELED})

_TASK_TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, CANCELED, FAILED}),
    RUNNING: frozenset({COMPLETED, FAILED, CANCELED, QUEUED}),
    COMPLETED: frozenset(),
    FAILED: frozenset(),
    CANCELED: frozenset(),
}


class IllegalTransition(Exception):
    """A state change the state machine does not allow (e.g. a finished task set running)."""


def check_task_transition(old: str, new: str) -> None:
    """Raise :class:`IllegalTransition` unless a task may go from ``old`` to ``new``."""
    if new not in _TASK_TRANSITIONS.get(old, frozenset()):
        raise IllegalTransition(f"task cannot go from {old} to {new}")


def job_state(task_states: Iterable[str], current: str) -> str:
    """The job state implied by its tasks' states.

    A canceled job stays canceled. Returns ``failed`` only once every task has
    finished, so that frames of other tasks still complete.
    """
    if current == CANCELED:
        return CANCELED
    counts = Counter(task_states)
    total = sum(counts.values())
    finished = sum(counts[s] for s in FINISHED)
    if total and finished == total:
        if counts[FAILED]:
            return FAILED
        if counts[CANCELED]:
            return CANCELED
        return COMPLETED
    if counts[RUNNING] or finished:
        return RUNNING
    return QUEUED
