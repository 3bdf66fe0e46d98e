"""``GET /api/events``: the live events of every job the caller may read, as one stream.

The per-job stream (``GET /api/jobs/{job_id}/events``, :mod:`server.api.jobs`) serves one
job's channel; this one subscribes to every job channel at once (``job:*``) and passes on
each event of a job whose project the caller holds ``job:read`` in (an admin: every job).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import OrderedDict
from typing import Any

from aiohttp import web
from sqlalchemy import select

from server.api.access import principal_of
from server.api.middleware import CTX, open_event_stream
from server.api.registry import route
from server.auth.principal import Principal
from server.auth.service import authenticate
from server.context import FarmContext
from server.errors import ApiError
from server.persistence.tables import Job

KEEPALIVE_S = 15.0
"""Seconds of silence after which a ``: keepalive`` comment is sent (proxies close idle streams)."""
RESYNC_S = 5.0
"""Seconds between checks that the caller may still read (token not revoked, account enabled,
roles kept); a role added or removed since counts from the next check."""
POLL_S = 1.0
"""Longest wait for an event before looking whether the reader has gone (aiohttp does not cancel
a handler whose client disconnected; without a write, nothing else would notice)."""
PROJECTS_CACHED = 10_000
"""Job -> project pairs a connection remembers (a job never changes project)."""
CHANNEL_PREFIX = "job:"

UNKNOWN: Any = object()
"""A job not in the database (deleted, or an event of another farm sharing the cache)."""


def sse(event: dict[str, Any]) -> bytes:
    """One server-sent event: ``event: <type>\\ndata: <compact JSON>\\n\\n``."""
    data = json.dumps(event, separators=(",", ":"))
    return f"event: {event.get('type', 'message')}\ndata: {data}\n\n".encode()


class _Readable:
    """Which jobs the caller may read, with a per-connection memo of each job's project.

    Args:
        ctx: the farm.
        principal: the caller (refreshed by :meth:`update` at each resync).
    """

    def __init__(self, ctx: FarmContext, principal: Principal) -> None:
        self.ctx = ctx
        self.projects: OrderedDict[str, Any] = OrderedDict()
        self.update(principal)

    def update(self, principal: Principal) -> None:
        """Take the caller's current admin flag and projects."""
        self.is_admin = principal.is_admin
        self.allowed = frozenset(principal.projects_with("job:read"))

    def learn(self, job_id: str, event: dict[str, Any]) -> None:
        """Remember the project a job summary event names (no database read needed later)."""
        job = event.get("job")
        if isinstance(job, dict) and job.get("project_id"):
            self._remember(job_id, job["project_id"])

    async def may_read(self, job_id: str) -> bool:
        """Whether the caller may read the job's events (one database read per job per connection)."""
        if self.is_admin:
            return True
        if not self.allowed:
            return False
        project = self.projects.get(job_id, None)
        if project is None:
            async with self.ctx.db.session() as s:
                found = await s.scalar(select(Job.project_id).where(Job.id == job_id))
            project = found if found is not None else UNKNOWN
            self._remember(job_id, project)
        return project is not UNKNOWN and project in self.allowed

    def _remember(self, job_id: str, project: Any) -> None:
        self.projects[job_id] = project
        self.projects.move_to_end(job_id)
        if len(self.projects) > PROJECTS_CACHED:
            self.projects.popitem(last=False)


@route(
    "GET",
    "/api/events",
    permission="job:read",
    scope="any",
    summary="Live events of every job you may read, as server-sent events (job summaries, task changes, "
    "progress, new frames; each names its job_id)",
    response_content="text/event-stream",
)
async def events(request: web.Request) -> web.StreamResponse:
    """``event: <type>`` / ``data: <JSON>`` pairs, as the per-job stream sends them, for every job
    of the caller's projects (an admin: all), each with ``job_id`` added to its data:

    * ``{"type": "job", "job_id", "job": <summary>}``;
    * ``{"type": "task", "job_id", "task": <task status>}``;
    * ``{"type": "progress", "job_id", "task_id", "frame"}``;
    * ``{"type": "frame", "job_id", "task_id", "frame"}``.

    The stream opens with a ``: ready`` comment once subscribed; after ``KEEPALIVE_S`` seconds
    without an event a ``: keepalive`` comment is sent. Every ``RESYNC_S`` seconds the token is
    authenticated again: when it no longer is (revoked, expired, account disabled) the stream
    ends with ``{"type": "error", "status": 401, "message"}``, and when the caller holds
    ``job:read`` in no project any more, with ``status`` 403. Events are not replayed: read the
    current state with ``GET /api/jobs`` after connecting. A reader too slow for the farm's
    event rate loses the oldest events (the cache's subscriber queues are bounded). A reader
    that disconnects is noticed within ``POLL_S`` seconds and its subscription dropped.
    """
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    readable = _Readable(ctx, principal_of(request))
    sub = ctx.cache.subscribe_pattern(f"{CHANNEL_PREFIX}*")
    try:
        with contextlib.suppress(TimeoutError, Exception):
            await sub.ready(2.0)
        resp = await open_event_stream(request)
        await resp.write(b": ready\n\n")
        checked = last_write = time.monotonic()
        while True:
            now = time.monotonic()
            if now - checked >= RESYNC_S:
                gone = await _recheck(request, readable)
                if gone is not None:
                    await resp.write(sse(gone))
                    break
                checked = now = time.monotonic()
            if now - last_write >= KEEPALIVE_S:
                await resp.write(b": keepalive\n\n")
                last_write = now
            wait = max(0.0, min(checked + RESYNC_S, last_write + KEEPALIVE_S, now + POLL_S) - now)
            try:
                channel, event = await asyncio.wait_for(sub.__anext__(), wait)
            except TimeoutError:
                if request.transport is None or request.transport.is_closing():
                    return resp  # the reader has gone
                continue
            except StopAsyncIteration:
                break
            if not channel.startswith(CHANNEL_PREFIX) or not isinstance(event, dict):
                continue
            job_id = channel[len(CHANNEL_PREFIX) :]
            readable.learn(job_id, event)
            if await readable.may_read(job_id):
                await resp.write(sse({**event, "job_id": job_id}))  # a copy: other readers share it
                last_write = time.monotonic()
        await resp.write_eof()
        return resp
    finally:
        await sub.aclose()


async def _recheck(request: web.Request, readable: _Readable) -> dict[str, Any] | None:
    """Authenticate the caller again and take their current roles; the error event that ends the
    stream when they may read no job any more, else None."""
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    try:
        p = await authenticate(ctx, request.headers.get("Authorization"))
    except ApiError as exc:
        why = f"access ended ({exc.message}): token revoked or expired, or account disabled"
        return {"type": "error", "status": 401, "message": why}
    readable.update(p)
    if not p.is_admin and not readable.allowed:
        return {"type": "error", "status": 403, "message": "you hold job:read in no project any more"}
    return None
