"""``/api/jobs`` and ``/api/tasks``: submit, list, inspect and cancel jobs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from aiohttp import web
from sqlalchemy import select

from server.api.access import note, principal_of, target_of
from server.api.middleware import CTX, json_ok, open_event_stream, parse_body
from server.api.registry import route
from server.api.schemas import (
    Blocklist,
    BlocklistCleared,
    JobCreate,
    JobList,
    JobSummary,
    JobUpdate,
    TaskList,
    TaskOut,
    TaskStatus,
)
from server.auth.permissions import allows
from server.auth.service import authenticate
from server.context import FarmContext
from server.errors import ApiError, not_found
from server.jobs import service
from server.jobs import task_state_machine as sm
from server.jobs.status import task_status as task_status_dict
from server.persistence.tables import Job, Task


def _iso(dt: object) -> str | None:
    return dt.isoformat() + "Z" if dt is not None else None  # type: ignore[attr-defined]


@route(
    "POST",
    "/api/jobs",
    permission="job:create",
    summary="Submit a job: a model, a frame spec, a chunk size and render overrides",
    body=JobCreate,
    response=JobSummary,
    status=201,
    scope="job-create",
)
async def create_job(request: web.Request) -> web.Response:
    """Validate and queue a job; its tasks are dispatched by the scheduler."""
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    req = await parse_body(request, JobCreate)
    p = principal_of(request)
    job = await service.create_job(ctx, req.model_dump() | {"owner": p.name, "owner_id": p.user_id})
    note(
        request,
        f"job_id={job.id}",
        model_id=job.model_id,
        frames=job.frames_spec,
        pool=job.pool,
        device=job.device,
    )
    return web.json_response(await service.job_summary(ctx, job.id), status=201)


@route(
    "GET",
    "/api/jobs",
    permission="job:read",
    summary="List jobs, newest first",
    response=JobList,
    query={
        "state": "only jobs in this state",
        "limit": "at most this many (1-500, default 100)",
        "mine": "true: only the jobs you submitted",
    },
    integer_query=("limit",),
    scope="any",
)
async def list_jobs(request: web.Request) -> web.Response:
    """Newest jobs first, optionally filtered by state."""
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise ApiError(400, "limit must be an integer", "limit") from None
    if not 1 <= limit <= 500:
        raise ApiError(400, "limit must be between 1 and 500", "limit")
    q = select(Job.id).order_by(Job.created_at.desc()).limit(limit)
    p = principal_of(request)
    if not p.is_admin:
        q = q.where(Job.project_id.in_(p.projects_with("job:read")))
    if state := request.query.get("state"):
        if state not in sm.TASK_STATES:
            raise ApiError(400, f"state must be one of {', '.join(sm.TASK_STATES)}, not {state!r}", "state")
        q = q.where(Job.state == state)
    mine = request.query.get("mine", "false").lower()
    if mine not in ("true", "false", "1", "0"):
        raise ApiError(400, f"mine must be true or false, not {mine!r}", "mine")
    if mine in ("true", "1"):
        q = q.where(Job.owner_id == p.user_id)
    async with ctx.db.session() as s:
        ids = (await s.scalars(q)).all()
        jobs = [await service.job_summary(ctx, i, s) for i in ids]
    return web.json_response({"jobs": jobs})


@route(
    "GET",
    "/api/jobs/{job_id}",
    permission="job:read",
    summary="A job's state, task counts by state and progress in percent",
    response=JobSummary,
)
async def get_job(request: web.Request) -> web.Response:
    """Served from the status cache, falling back to the database."""
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    job_id = request.match_info["job_id"]
    raw = await ctx.cache.get_raw(f"job:{job_id}")  # never raises: None on a miss or an outage
    if raw is not None:
        return web.Response(body=raw, content_type="application/json")
    return web.json_response(await service.job_summary(ctx, job_id))


@route(
    "GET",
    "/api/jobs/{job_id}/events",
    permission="job:read",
    summary="Live events of a job as server-sent events: summaries, task changes, progress, new frames",
    response_content="text/event-stream",
)
async def job_events(request: web.Request) -> web.StreamResponse:
    """``event: <type>`` / ``data: <JSON>`` pairs; the first is the job's summary, the last a finished one.

    Fed by the cache's pub/sub channel ``job:<id>`` (Redis across server processes). When
    no event arrives for ``RESYNC_S`` seconds (or the cache is down), the summary is read
    from the database and sent again, which also keeps the connection alive.
    """
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    job_id = request.match_info["job_id"]
    sub = ctx.cache.subscribe(f"job:{job_id}")
    try:
        with contextlib.suppress(TimeoutError, Exception):
            await sub.ready(2.0)
        summary = await service.job_summary(ctx, job_id)  # 404 before the stream starts
        resp = await open_event_stream(request)
        event: dict[str, Any] = {"type": "job", "job": summary}
        checked = time.monotonic()
        while True:
            data = json.dumps(event, separators=(",", ":"))
            await resp.write(f"event: {event.get('type', 'message')}\ndata: {data}\n\n".encode())
            if event.get("type") == "job" and event["job"].get("state") in sm.FINISHED:
                break
            if time.monotonic() - checked > RESYNC_S:
                if not await _still_allowed(request):
                    why = "access to this job ended (token revoked, account disabled or role removed)"
                    gone = {"type": "error", "status": 401, "message": why}
                    await resp.write(f"event: error\ndata: {json.dumps(gone)}\n\n".encode())
                    break
                checked = time.monotonic()
            try:
                event = await asyncio.wait_for(sub.__anext__(), RESYNC_S)
            except TimeoutError:
                event = {"type": "job", "job": await service.job_summary(ctx, job_id)}
            except StopAsyncIteration:
                break
        await resp.write_eof()
        return resp
    finally:
        await sub.aclose()


async def _still_allowed(request: web.Request) -> bool:
    """Whether the caller of a long-lived stream may still read the job: its token not revoked,
    the user not disabled, the role in the job's project kept (checked at every resync)."""
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    try:
        p = await authenticate(ctx, request.headers.get("Authorization"))
    except ApiError:
        return False
    return allows(p.role_in(target_of(request).project_id), "job:read", owns=False)


RESYNC_S = 5.0
"""Seconds without an event after which the events stream re-reads the job from the database."""


def task_out(t: Task) -> TaskOut:
    """The API shape of a task row."""
    return TaskOut(
        id=t.id,
        job_id=t.job_id,
        index=t.index,
        frames=t.frames,
        state=t.state,
        attempts=t.attempts,
        agent=t.agent,
        current_frame=t.current_frame,
        message=t.message,
        log_tail=t.log_tail or [],
        render_seconds=t.render_seconds,
        started_at=_iso(t.started_at),
        finished_at=_iso(t.finished_at),
        route=t.route,
        not_before=_iso(t.not_before),
        failed_agents=list(t.failed_agents or []),
        failure_kind=t.failure_kind or "",
        device_used=t.device_used or "",
        fallback=bool(t.fallback),
    )


@route(
    "GET",
    "/api/jobs/{job_id}/tasks",
    permission="job:read",
    summary="The tasks of a job with their frames, state, agent, last log lines, devices used and failures",
    response=TaskList,
)
async def list_tasks(request: web.Request) -> web.Response:
    """Every task of the job, in frame order."""
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    job_id = request.match_info["job_id"]
    async with ctx.db.session() as s:
        if await s.get(Job, job_id) is None:
            raise not_found("job", job_id)
        tasks = (await s.scalars(select(Task).where(Task.job_id == job_id).order_by(Task.index))).all()
    return json_ok(TaskList(tasks=[task_out(t) for t in tasks]))


@route(
    "GET",
    "/api/tasks/{task_id}/status",
    permission="job:read",
    summary="One task's state and the frame it is rendering",
    response=TaskStatus,
)
async def task_status(request: web.Request) -> web.Response:
    """A small, fast status read."""
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    task_id = request.match_info["task_id"]
    raw = await ctx.cache.get_raw(f"task:{task_id}")
    if raw is not None:
        return web.Response(body=raw, content_type="application/json")
    async with ctx.db.session() as s:
        t = await s.get(Task, task_id)
    if t is None:
        raise not_found("task", task_id)
    await service.status_of(ctx).tasks([t], events=False)
    return web.json_response(task_status_dict(t))


@route(
    "PATCH",
    "/api/jobs/{job_id}",
    permission="job:update",
    summary="Change a job's priority; its tasks not yet dispatched follow at once",
    body=JobUpdate,
    response=JobSummary,
)
async def update_job(request: web.Request) -> web.Response:
    """409 when the job has already finished."""
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    req = await parse_body(request, JobUpdate)
    job_id = request.match_info["job_id"]
    note(request, priority=req.priority)
    await service.set_priority(ctx, job_id, req.priority)
    return web.json_response(await service.job_summary(ctx, job_id))


@route(
    "POST",
    "/api/jobs/{job_id}/retry",
    permission="job:update",
    summary="Retry a job's failed tasks: they are queued again for every agent, and a failed job reopens",
    response=JobSummary,
)
async def retry_job(request: web.Request) -> web.Response:
    """409 when the job was canceled or has no failed task (a completed job has none).

    Attempts and failure records stay; the failures of the retried tasks no longer blocklist
    their agents. When the job failed, the tasks its failing early canceled are queued too.
    """
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    job_id = request.match_info["job_id"]
    out = await service.retry_job(ctx, job_id, by=principal_of(request).name)
    note(request, f"job_id={job_id}", failed=out["failed"], canceled=out["canceled"])
    return web.json_response(await service.job_summary(ctx, job_id))


@route(
    "POST",
    "/api/jobs/{job_id}/cancel",
    permission="job:cancel",
    summary="Cancel a job; running renders stop within a heartbeat",
    response=JobSummary,
)
async def cancel_job(request: web.Request) -> web.Response:
    """409 when the job has already finished."""
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    job = await service.cancel_job(ctx, request.match_info["job_id"])
    return web.json_response(await service.job_summary(ctx, job.id))


@route(
    "GET",
    "/api/jobs/{job_id}/blocklist",
    permission="job:read",
    summary="Agents blocklisted for a job (blocklist_after failed attempts in it): they take none of it",
    response=Blocklist,
)
async def get_blocklist(request: web.Request) -> web.Response:
    """Each agent with its failures in the job not cleared, their kinds and the last message."""
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    return web.json_response(await service.job_blocklist(ctx, request.match_info["job_id"]))


@route(
    "DELETE",
    "/api/jobs/{job_id}/blocklist/{agent}",
    permission="job:update",
    summary="Clear an agent's blocklisting for a job: it may take the job's tasks again",
    response=BlocklistCleared,
)
async def clear_blocklist(request: web.Request) -> web.Response:
    """404 when the agent is not blocklisted for the job. Its failures stay on record, marked cleared."""
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    job_id, agent = request.match_info["job_id"], request.match_info["agent"]
    out = await service.clear_blocklist(ctx, job_id, agent)
    note(request, f"job_id={job_id}", agent=agent, cleared=out["cleared"])
    return web.json_response(out)
