"""Task and job states, the allowed transitions, and how a job's state follows from its tasks.

Task: ``queued -> running -> completed | failed``; ``running -> queued`` when
its lease is lost and attempts remain; ``queued | running -> canceled``;
``failed -> queued`` when someone retries the job's failed tasks
(``POST /api/jobs/{id}/retry``), and then also ``canceled -> queued`` for the tasks a job
failing early canceled (:func:`check_task_retry`; a canceled job is never retried).
Job: ``queued`` until a task runs, ``running`` while any task is unfinished,
then ``completed`` (every task completed), ``failed`` (any task failed) or
``canceled``; a retry reopens a failed job (``failed -> running | queued``,
:func:`retried_job_state`).
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
    FAILED: frozenset({QUEUED}),  # only by a retry of the job (check_task_retry)
    CANCELED: frozenset(),
}


class IllegalTransition(Exception):
    """A state change the state machine does not allow (e.g. a finished task set running)."""


def check_task_transition(old: str, new: str) -> None:
    """Raise :class:`IllegalTransition` unless a task may go from ``old`` to ``new``."""
    if new not in _TASK_TRANSITIONS.get(old, frozenset()):
        raise IllegalTransition(f"task cannot go from {old} to {new}")


def check_task_retry(old: str, job: str) -> None:
    """Raise :class:`IllegalTransition` unless a retry of a job in state ``job`` may put a task
    in state ``old`` back in the queue: a failed task, or a task canceled because its (not
    canceled) job failed early. Completed, queued and running tasks stay as they are."""
    if job == CANCELED:
        raise IllegalTransition("the tasks of a canceled job are never retried")
    if old == FAILED:
        check_task_transition(old, QUEUED)
    elif not (old == CANCELED and job == FAILED):
        raise IllegalTransition(f"a retry cannot put a {old} task of a {job} job back in the queue")


def retried_job_state(has_started: bool) -> str:
    """A job's state once a retry put tasks of it back in the queue: ``running`` when any of
    its tasks ran (``has_started``: one is running or finished), else ``queued``."""
    return RUNNING if has_started else QUEUED


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
