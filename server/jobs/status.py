"""Status sync, database to cache: what the API's fast reads and the live event stream serve.

The database is the truth. After each commit the service writes the changed
task's status (``task:<id>``) and the job's summary (``job:<id>``) to the cache
and sends an event on the job's channel (``job:<id>``):

* ``{"type": "job", "job": <summary>}`` when the job's state or counts change;
* ``{"type": "task", "task": <task status>}`` when a task changes state;
* ``{"type": "progress", "task_id", "frame"}`` when a task starts a frame;
* ``{"type": "frame", "task_id", "frame"}`` when a frame is stored.

A job summary costs a count over the job's tasks and frames, so summaries of
jobs whose state did not change are coalesced: at most one per job every
``interval_s`` seconds. A state change is published at once. Cache failures are
logged and swallowed (the reconciler rewrites stale entries later).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import Any

from server.persistence.tables import Task

log = logging.getLogger(__name__)
STATUS_TTL_S = 7 * 86400
"""Seconds a cached status lives without being rewritten (finished jobs expire from the cache)."""


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat() + "Z" if dt is not None else None


def task_status(t: Task) -> dict[str, Any]:
    """The cached and served shape of one task's status (``GET /api/tasks/{id}/status``)."""
    return {
        "id": t.id,
        "job_id": t.job_id,
        "index": t.index,
        "state": t.state,
        "current_frame": t.current_frame,
        "attempts": t.attempts,
        "agent": t.agent,
        "message": t.message,
        "started_at": _iso(t.started_at),
        "finished_at": _iso(t.finished_at),
    }


class StatusPublisher:
    """Writes statuses to the cache after commits and coalesces job summaries.

    Args:
        cache: the farm's cache (:class:`server.cache.base.Cache`).
        summarize: ``async (job_id) -> summary`` reading the job from the database.
        interval_s: the longest a coalesced job summary waits, in seconds.
    """

    def __init__(
        self,
        cache: Any,
        summarize: Callable[[str], Awaitable[dict[str, Any]]],
        interval_s: float = 0.2,
    ) -> None:
        self.cache = cache
        self.summarize = summarize
        self.interval_s = interval_s
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def job_now(self, job_id: str) -> dict[str, Any] | None:
        """Summarize the job, cache it and publish it now; ``None`` if the job is gone."""
        self._dirty.discard(job_id)
        try:
            summary = await self.summarize(job_id)
        except Exception as exc:
            log.debug("no summary for job %s: %s", job_id, exc)
            return None
        await self._write({f"job:{job_id}": summary}, [(f"job:{job_id}", {"type": "job", "job": summary})])
        return summary

    def job_later(self, job_id: str) -> None:
        """Mark the job's summary stale; it is published within ``interval_s`` seconds."""
        self._dirty.add(job_id)
        self._wake.set()
        if self._task is None or self._task.done():
            with contextlib.suppress(RuntimeError):  # no running loop: flushed by the next caller
                self._task = asyncio.get_running_loop().create_task(self._run(), name="status-publisher")

    async def tasks(self, tasks: Iterable[Task], events: bool = True) -> None:
        """Cache the status of ``tasks`` (one round trip) and publish a task event for each."""
        statuses = [task_status(t) for t in tasks]
        if not statuses:
            return
        evs = [(f"job:{st['job_id']}", {"type": "task", "task": st}) for st in statuses] if events else []
        await self._write({f"task:{st['id']}": st for st in statuses}, evs)

    async def event(self, job_id: str, event: dict[str, Any]) -> None:
        """Publish one event on the job's channel."""
        await self._write({}, [(f"job:{job_id}", event)])

    async def flush(self) -> None:
        """Publish every job summary marked stale so far, once each.

        Jobs marked stale while it runs wait for the next round: under steady load a
        job's summary is published once per ``interval_s``, not back to back.
        """
        dirty, self._dirty = self._dirty, set()
        try:
            while dirty:
                await self.job_now(dirty.pop())
        finally:
            self._dirty |= dirty  # interrupted: the rest stay stale

    async def close(self) -> None:
        """Flush and stop the background task."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.flush()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self.interval_s)
            try:
                await self.flush()
            except Exception:
                log.exception("status publisher failed")

    async def _write(
        self, values: dict[str, dict[str, Any]], events: list[tuple[str, dict[str, Any]]]
    ) -> None:
        try:
            if values:
                if hasattr(self.cache, "set_many"):
                    await self.cache.set_many(values, ttl_s=STATUS_TTL_S)
                else:
                    for key, value in values.items():
                        await self.cache.set(key, value, ttl_s=STATUS_TTL_S)
            for channel, event in events:
                await self.cache.publish(channel, event)
        except Exception:  # the cache is a copy; the database stays right
            log.warning("cache update failed", exc_info=True)
