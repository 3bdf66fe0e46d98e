"""Operations on jobs and tasks. Each runs in one transaction; the cache and events follow the commit."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import weakref
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import case, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import load_only

from protocol.devices import DeviceError, check_device
from protocol.frames import FrameSpecError, chunk_frames, format_frames, parse_frames
from protocol.messages import (
    OUTPUT_EXTENSIONS,
    RENDER_OVERRIDES,
    TaskMessage,
    TaskResult,
    TaskSpec,
    queue_for_pool,
)
from server.context import FarmContext
from server.errors import ApiError, not_found
from server.jobs import failure_policy
from server.jobs import task_state_machine as sm
from server.jobs.status import StatusPublisher
from server.persistence.retry import retry_on_disconnect
from server.persistence.tables import (
    DEFAULT_POOL,
    Agent,
    Frame,
    Job,
    Model,
    OutboxMessage,
    Task,
    TaskFailure,
    new_id,
    utcnow,
)

log = logging.getLogger(__name__)
_frame_locks: weakref.WeakValueDictionary[tuple[str, int], asyncio.Lock] = weakref.WeakValueDictionary()
"""One lock per (task, frame) while an upload of it is in progress; dropped when unused."""
IMAGE_MAGIC = {".png": b"\x89PNG\r\n\x1a\n", ".jpg": b"\xff\xd8\xff", ".exr": b"\x76\x2f\x31\x01"}
"""File signatures of the output formats (PNG, JPEG/JFIF and OpenEXR specifications)."""
WAITING_PREFIX = "waiting for an agent"
"""How the dispatcher's message on a job whose tasks no online agent may take begins."""


# ---------------------------------------------------------------- jobs


@retry_on_disconnect
async def create_job(ctx: FarmContext, req: dict[str, Any]) -> Job:
    """Validate a job request, then write the job, its tasks and their outbox rows in one transaction.

    Args:
        req: validated request fields (``server.api.schemas.JobCreate``): model_id, frames,
            chunk_size, priority, scene, name and the overrides (camera, engine, samples,
            resolution_percentage, resolution_x, resolution_y, output_format), ``pool``,
            ``device`` (``protocol.devices.DEVICES``, default ``any``) and ``cpu_fallback``,
            plus ``owner`` (user name) and ``owner_id``. The job belongs to the model's project.

    Raises:
        ApiError: 404 for an unknown model; 400 naming ``frames`` (with the bad token),
            ``device``, ``scene`` or ``camera``; 422 when the scene cannot render (no camera) or the
            model refers to files it does not hold (unless ``allow_missing``).
    """
    try:
        frames = parse_frames(req["frames"])
    except FrameSpecError as exc:
        raise ApiError(400, str(exc), "frames") from exc
    try:
        device = check_device(req.get("device") or "any")
    except DeviceError as exc:
        raise ApiError(400, str(exc), "device") from exc
    async with ctx.db.session() as s:
        model = await s.get(Model, req["model_id"])
        if model is None:
            raise ApiError(404, f"model {req['model_id']!r} not found", "model_id")
        _check_outside_libraries(model.info)
        scene = _check_scene(model.info, req.get("scene"), req.get("camera"))
        _check_size(model.info, scene, req, ctx.settings.max_frame_pixels)
        if not req.get("allow_missing"):
            _check_missing(model.info)
        overrides = {k: req.get(k) for k in RENDER_OVERRIDES if req.get(k) is not None}
        overrides.setdefault("output_format", "PNG")
        job = Job(
            id=new_id(),
            model_id=model.id,
            name=req.get("name") or model.filename,
            frames_spec=format_frames(frames),
            frame_count=len(frames),
            chunk_size=req["chunk_size"],
            priority=req.get("priority", 0),
            scene=scene,
            overrides=overrides,
            owner=req.get("owner") or "",
            owner_id=req.get("owner_id"),
            project_id=model.project_id,
            pool=req.get("pool") or DEFAULT_POOL,
            device=device,
            cpu_fallback=bool(req.get("cpu_fallback")),
        )
        s.add(job)
        await s.flush()  # the job's row before its tasks'
        await s.execute(  # multi-row INSERTs, no ORM objects: 10,000 tasks in well under 1 s
            insert(Task),
            [
                {"id": new_id(), "job_id": job.id, "index": i, "frames": chunk, "pool": job.pool}
                for i, chunk in enumerate(chunk_frames(frames, req["chunk_size"]))
            ],
        )
        await s.commit()
    await ctx.wake_dispatcher()
    await publish_job(ctx, job.id)
    return job


def _check_scene(info: dict[str, Any], scene: str | None, camera: str | None) -> str | None:
    scenes = {sc.get("name"): sc for sc in info.get("scenes", []) if isinstance(sc, dict)}
    if not scenes:
        return scene
    name = scene or info.get("active_scene") or next(iter(scenes))
    if name not in scenes:
        raise ApiError(400, f"scene {name!r} is not in the model; it has {sorted(scenes)}", "scene")
    sc = scenes[name]
    if camera is not None:
        cams = sc.get("cameras") or []
        if camera not in cams:
            raise ApiError(400, f"camera {camera!r} is not in scene {name!r}; it has {cams}", "camera")
    elif not sc.get("renderable", True):
        problem = sc.get("problem") or "it cannot render"
        raise ApiError(
            422, f"scene {name!r} of {info.get('main', 'the model')} cannot render: {problem}", "scene"
        )
    return name


def _check_size(info: dict[str, Any], scene: str | None, req: dict[str, Any], max_pixels: int) -> None:
    """Refuse frames larger than ``max_pixels`` (width x height after the percentage)."""
    sc = next((x for x in info.get("scenes", []) if isinstance(x, dict) and x.get("name") == scene), {})
    x = req.get("resolution_x") or sc.get("resolution_x") or 1920
    y = req.get("resolution_y") or sc.get("resolution_y") or 1080
    pct = req.get("resolution_percentage") or sc.get("resolution_percentage") or 100
    w, h = int(x) * int(pct) // 100, int(y) * int(pct) // 100
    if w * h > max_pixels:
        raise ApiError(
            400,
            f"frames of {w}x{h} pixels are larger than this farm's limit of {max_pixels} pixels "
            "(resolution_x x resolution_y x resolution_percentage)",
            "resolution_percentage" if req.get("resolution_percentage") else "resolution_x",
        )


def _check_outside_libraries(info: dict[str, Any]) -> None:
    """Refuse, always, a model linking libraries outside its package: Blender reads them when
    the file opens, from the render machine's own disk (another job's files, say)."""
    outside = [
        str(d.get("path"))
        for d in info.get("dependencies", [])
        if isinstance(d, dict) and d.get("kind") == "library" and d.get("outside_root")
    ]
    if outside:
        raise ApiError(
            422,
            f"the model links libraries by absolute paths or paths leaving its folder: {', '.join(outside)}; "
            "make the paths relative (File > External Data > Make Paths Relative) and upload a .zip "
            "holding the libraries",
            "model_id",
        )


def _check_missing(info: dict[str, Any]) -> None:
    """Refuse a model that refers to files it does not hold: Blender would render without them
    (missing objects, magenta placeholder images, re-simulated caches) and report success."""
    missing = [
        f"{d.get('kind', 'file')} {d.get('path')}"
        for d in info.get("dependencies", [])
        if isinstance(d, dict) and d.get("missing")
    ]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise ApiError(
            422,
            f"the model refers to files that are not in it: {shown}; upload a .zip holding them, "
            "or set allow_missing (CLI: --allow-missing) to render without them",
            "model_id",
        )


def outbox_for(task: Task, job: Job, route: str | None = None) -> OutboxMessage:
    """The outbox row that will put ``task`` on the queue of ``route`` (default: the task's
    route, else its pool) at the job's priority."""
    msg = TaskMessage(task_id=task.id, job_id=job.id, priority=job.priority)
    queue = queue_for_pool(route or task.route or task.pool)
    return OutboxMessage(queue=queue, payload=msg.to_dict(), priority=job.priority)


async def _unfinished_job(s: AsyncSession, job_id: str) -> Job:
    """The job, which must exist and not have finished.

    Raises:
        ApiError: 404 unknown job; 409 when the job has already finished.
    """
    job = await s.get(Job, job_id)
    if job is None:
        raise not_found("job", job_id)
    if job.state in sm.FINISHED:
        raise ApiError(409, f"job {job_id} has already finished ({job.state})", "job_id")
    return job


@retry_on_disconnect
async def cancel_job(ctx: FarmContext, job_id: str) -> Job:
    """Cancel a job: queued and running tasks become canceled; running agents stop at their next heartbeat.

    Raises:
        ApiError: 404 unknown job; 409 when the job has already finished.
    """
    async with ctx.db.session() as s:
        job = await _unfinished_job(s, job_id)
        now = utcnow()
        job.state, job.message, job.finished_at = sm.CANCELED, "canceled by request", now
        await s.execute(
            update(Task)
            .where(Task.job_id == job_id, Task.state.in_([sm.QUEUED, sm.RUNNING]))
            .values(state=sm.CANCELED, finished_at=now, message="canceled", lease_id=None)
            .execution_options(synchronize_session=False)
        )
        await s.commit()
        canceled = (await s.scalars(select(Task).where(Task.job_id == job_id, Task.finished_at == now))).all()
    for t in canceled:
        ctx.observe("task_finished", 0.0, state=sm.CANCELED, pool=t.pool)
    await status_of(ctx).tasks(canceled, events=False)
    await publish_job(ctx, job_id)
    await ctx.wake_dispatcher()
    return job


@retry_on_disconnect
async def retry_job(ctx: FarmContext, job_id: str, by: str = "") -> dict[str, Any]:
    """Put a job's failed tasks back in the queue, and reopen the job if it failed.

    Each failed task becomes ``queued`` again: its ``attempts``, ``failure_kind`` and its rows
    in ``task_failures`` stay for the record, but those rows are marked cleared (they no
    longer blocklist their agents for the job) and its failed agents and ``not_before`` are
    emptied, so that every agent may try it again at once. When the job itself failed, the
    tasks that its failing early canceled come back too, and the job is ``running`` again
    (``queued`` if none of its tasks ever ran) with no ``finished_at``. Like new tasks, they
    are dispatched by the dispatcher, which writes their outbox rows. One transaction, under
    a lock on the job's row.

    Args:
        by: who asked (a user name), for the tasks' and the job's message.

    Returns:
        ``{"job_id", "failed": <failed tasks requeued>, "canceled": <tasks canceled by the job
        failing, requeued>}``.

    Raises:
        ApiError: 404 unknown job; 409 when the job was canceled or has no failed task (a
            completed job has none).
    """
    now = utcnow()
    async with ctx.db.session() as s:
        job = await s.get(Job, job_id, with_for_update=True, populate_existing=True)
        if job is None:
            raise not_found("job", job_id)
        if job.state == sm.CANCELED:
            raise ApiError(
                409, f"job {job_id} was canceled: its tasks are not retried (submit it again)", "job_id"
            )
        states = [sm.FAILED, sm.CANCELED] if job.state == sm.FAILED else [sm.FAILED]
        if not await _has(s, job_id, [sm.FAILED]):
            raise ApiError(409, f"job {job_id} has no failed task to retry (it is {job.state})", "job_id")
        await s.execute(  # before the tasks change: the subquery picks them by their state
            update(TaskFailure)
            .where(
                TaskFailure.job_id == job_id,
                TaskFailure.cleared_at.is_(None),
                TaskFailure.task_id.in_(
                    select(Task.id).where(Task.job_id == job_id, Task.state.in_(states)).scalar_subquery()
                ),
            )
            .values(cleared_at=now)
            .execution_options(synchronize_session=False)
        )
        tasks = list(
            (
                await s.scalars(
                    select(Task).where(Task.job_id == job_id, Task.state.in_(states)).order_by(Task.index)
                )
            ).all()
        )
        failed = sum(t.state == sm.FAILED for t in tasks)
        canceled = len(tasks) - failed
        who = f" (requested by {by})" if by else ""
        for t in tasks:
            sm.check_task_retry(t.state, job.state)
            t.message = f"retried after it {'failed' if t.state == sm.FAILED else 'was canceled'}{who}"[:4000]
            t.state = sm.QUEUED
            t.failed_agents = None
            t.not_before = t.dispatched_at = t.route = None
            t.lease_id = t.lease_expires_at = t.current_frame = t.finished_at = None
        await s.flush()
        started = any(t.attempts for t in tasks) or await _has(s, job_id, [sm.RUNNING, sm.COMPLETED])
        job.state, job.finished_at = sm.retried_job_state(started), None
        also = f" and {canceled} canceled when the job failed" if canceled else ""
        job.message = f"retrying {failed} failed task(s){also}{who}"[:4000]
        await s.commit()
    await ctx.wake_dispatcher()
    await status_of(ctx).tasks(tasks)
    await publish_job(ctx, job_id)
    return {"job_id": job_id, "failed": failed, "canceled": canceled}


async def _agent_done(s: AsyncSession, task: Task) -> None:
    """The task's agent no longer works on it (found by its unique name, not by a scan)."""
    if task.agent:
        await s.execute(
            update(Agent)
            .where(Agent.name == task.agent, Agent.current_task_id == task.id)
            .values(current_task_id=None)
        )


@retry_on_disconnect
async def set_priority(ctx: FarmContext, job_id: str, priority: int) -> None:
    """Change a job's priority. Its tasks not yet dispatched follow it at once: only a few
    per pool wait in the broker (the dispatch window), the rest are ordered in the database.

    Raises:
        ApiError: 404 unknown job; 409 when the job has already finished.
    """
    async with ctx.db.session() as s:
        job = await _unfinished_job(s, job_id)
        job.priority = priority
        await s.commit()
    await ctx.wake_dispatcher()
    await publish_job(ctx, job_id)


@retry_on_disconnect
async def job_summary(ctx: FarmContext, job_id: str, session: AsyncSession | None = None) -> dict[str, Any]:
    """The job's status as served by the API: state, task counts by state, frames stored, progress %,
    the device it asked for, how many tasks fell back to the CPU and the agents blocklisted for it.

    Raises:
        ApiError: 404 for an unknown job.
    """
    if session is None:
        async with ctx.db.session() as s:
            return await job_summary(ctx, job_id, s)
    job = await session.get(Job, job_id)
    if job is None:
        raise not_found("job", job_id)
    rows = (
        await session.execute(
            select(Task.state, func.count(), func.sum(case((Task.fallback, 1), else_=0)))
            .where(Task.job_id == job_id)
            .group_by(Task.state)
        )
    ).all()
    counts = {state: 0 for state in sm.TASK_STATES} | {state: n for state, n, _ in rows}
    fallback = sum(int(f or 0) for _, _, f in rows)
    after = ctx.settings.blocklist_after
    blocked = (
        sorted(await failure_policy.blocklisted(session, job_id, after)) if 0 < after <= job.failures else []
    )
    stored = await session.scalar(select(func.count()).select_from(Frame).where(Frame.job_id == job_id)) or 0
    return {
        "id": job.id,
        "name": job.name,
        "model_id": job.model_id,
        "state": job.state,
        "message": job.message,
        "frames": job.frames_spec,
        "frame_count": job.frame_count,
        "frames_done": stored,
        "progress": round(100.0 * stored / job.frame_count, 1) if job.frame_count else 100.0,
        "chunk_size": job.chunk_size,
        "priority": job.priority,
        "pool": job.pool,
        "device": job.device,
        "cpu_fallback": job.cpu_fallback,
        "fallback_tasks": fallback,
        "blocklist": blocked,
        "owner": job.owner,
        "project_id": job.project_id,
        "scene": job.scene,
        "overrides": job.overrides,
        "tasks": counts,
        "task_count": sum(counts.values()),
        "created_at": job.created_at.isoformat() + "Z",
        "finished_at": job.finished_at.isoformat() + "Z" if job.finished_at else None,
    }


def status_of(ctx: FarmContext) -> StatusPublisher:
    """The farm's status publisher (made on first use)."""
    if ctx.status is None:
        ctx.status = StatusPublisher(
            ctx.cache, lambda job_id: job_summary(ctx, job_id), ctx.settings.status_interval_s
        )
    return ctx.status


async def publish_job(ctx: FarmContext, job_id: str, now: bool = True) -> None:
    """Refresh the cached summary of a job after a commit and send it on the job's event channel.

    Args:
        now: publish at once (the job's state changed); otherwise within a fraction of a second,
            coalesced with other changes of the same job.
    """
    if now:
        await status_of(ctx).job_now(job_id)
    else:
        status_of(ctx).job_later(job_id)


async def _has(s: AsyncSession, job_id: str, states: list[str]) -> bool:
    """Whether the job has a task in one of ``states`` (an index seek on tasks(job_id, state))."""
    q = select(Task.id).where(Task.job_id == job_id, Task.state.in_(states)).limit(1)
    return (await s.scalar(q)) is not None


async def _refresh_job_state(s: AsyncSession, job: Job) -> bool:
    """Bring the job's state in line with its tasks' (see :func:`sm.job_state`); returns whether it changed.

    Uses existence checks on the (job_id, state) index rather than reading every task,
    so that it costs the same for a job of 10 tasks and one of 10,000. A finished job stays
    as it is (a job failed early by the failure policy keeps its state and message).
    """
    if job.state in sm.FINISHED:
        return False
    if await _has(s, job.id, [sm.RUNNING]):
        new = sm.RUNNING
    elif await _has(s, job.id, [sm.QUEUED]):
        new = sm.RUNNING if await _has(s, job.id, list(sm.FINISHED)) else sm.QUEUED
    elif await _has(s, job.id, [sm.FAILED]):
        new = sm.FAILED
    elif await _has(s, job.id, [sm.CANCELED]):
        new = sm.CANCELED
    else:
        new = sm.COMPLETED
    if new == job.state:
        return False
    job.state = new
    if new in sm.FINISHED:
        job.finished_at = utcnow()
        if new == sm.FAILED:
            first = (
                await s.scalars(
                    select(Task).where(Task.job_id == job.id, Task.state == sm.FAILED).order_by(Task.index)
                )
            ).first()
            n = await s.scalar(
                select(func.count()).select_from(Task).where(Task.job_id == job.id, Task.state == sm.FAILED)
            )
            assert first is not None
            job.message = f"{n} task(s) failed; first: frames {format_frames(first.frames)}: {first.message}"
        elif new == sm.COMPLETED:
            job.message = ""
    return True


# ---------------------------------------------------------------- agent side


@retry_on_disconnect
async def claim_task(ctx: FarmContext, task_id: str, agent: str, registered: bool = False) -> TaskSpec:
    """Lease a queued task to ``agent`` and return what it needs to render it.

    A registered agent takes only tasks of the pool it registered in, of jobs whose device
    its route offers (:func:`protocol.devices.satisfies`), that it has not failed before and
    of jobs it is not blocklisted for, and only while an admin has not disabled it; with
    ``registered`` (what the agent API asks), an agent that has not registered takes nothing.
    A task refused for its device, or to an agent that is disabled, failed it or is
    blocklisted, is handed back to the dispatcher at once (after
    :data:`server.jobs.failure_policy.REDISPATCH_DELAY_S` seconds for the last three) so that it
    reaches another agent.

    Raises:
        ApiError: 404 unknown task; 409 when the task is no longer wanted (canceled,
            finished, or already leased to another attempt), is for another pool or device,
            the agent is disabled, failed it or is blocklisted for its job, or the agent has
            not registered.
    """
    lease_id = new_id()
    now = utcnow()
    async with ctx.db.session() as s:
        me = (
            await s.execute(select(Agent.pool, Agent.route, Agent.enabled).where(Agent.name == agent))
        ).first()
        if me is None and registered:
            raise ApiError(409, f"agent {agent!r} is not registered: POST /api/agent/register first", "agent")
        row = (  # the task, its job and its model in one round trip, only the columns used
            await s.execute(
                select(Task, Job, Model)
                .join(Job, Task.job_id == Job.id)
                .join(Model, Job.model_id == Model.id)
                .where(Task.id == task_id)
                .options(
                    load_only(
                        Job.id,
                        Job.state,
                        Job.scene,
                        Job.overrides,
                        Job.model_id,
                        Job.device,
                        Job.cpu_fallback,
                        Job.failures,
                    ),
                    load_only(Model.id, Model.sha256, Model.kind, Model.main, Model.storage_key),
                )
            )
        ).first()
        if row is None:
            raise not_found("task", task_id)
        task, job, model = row
        if task.state != sm.QUEUED:
            raise ApiError(409, f"task {task_id} is not waiting to run (state {task.state})", "task_id")
        if me is not None:
            pool, route = me.pool, me.route or me.pool
            if task.pool != pool:
                raise ApiError(
                    409, f"task {task_id} is for pool {task.pool!r}; agent {agent!r} takes {pool!r}"
                )
            if not me.enabled:
                refusal, delay = (
                    f"agent {agent!r} is disabled: it takes no new task (an admin enables it with "
                    f"PATCH /api/agents/{agent} or renderfarm agents --enable {agent}); task {task_id} "
                    "goes to another agent",
                    failure_policy.REDISPATCH_DELAY_S,
                )
            else:
                refusal, delay = await failure_policy.refusal(ctx, s, task, job, agent, route)
            if refusal:
                await s.execute(
                    update(Task)
                    .where(Task.id == task_id, Task.state == sm.QUEUED)
                    .values(
                        dispatched_at=None,
                        route=None,
                        not_before=now + timedelta(seconds=delay) if delay else task.not_before,
                    )
                    .execution_options(synchronize_session=False)
                )
                await s.commit()
                await ctx.wake_dispatcher()
                raise ApiError(409, refusal, "task_id")
        res = await s.execute(
            update(Task)
            .where(Task.id == task_id, Task.state == sm.QUEUED)
            .values(
                state=sm.RUNNING,
                attempts=Task.attempts + 1,
                lease_id=lease_id,
                lease_expires_at=now + timedelta(seconds=ctx.settings.lease_s),
                agent=agent,
                started_at=now,
                message="",
            )
            .execution_options(synchronize_session="evaluate")
        )
        if res.rowcount != 1:  # another agent's claim came first
            raise ApiError(409, f"task {task_id} is not waiting to run (leased meanwhile)", "task_id")
        dispatched_at = task.dispatched_at
        changed = job.state == sm.QUEUED
        if changed:
            job.state = sm.RUNNING
        await s.execute(
            update(Agent).where(Agent.name == agent).values(current_task_id=task_id, last_seen_at=now)
        )
        await s.commit()
    if dispatched_at is not None:
        ctx.observe("dispatch_latency", (now - dispatched_at).total_seconds(), pool=task.pool)
    await ctx.wake_dispatcher()  # a slot of the dispatch window is free
    await status_of(ctx).tasks([task])
    await publish_job(ctx, task.job_id, now=changed)
    ov = job.overrides
    return TaskSpec(
        task_id=task.id,
        job_id=job.id,
        lease_id=lease_id,
        frames=list(task.frames),
        model_sha256=model.sha256,
        model_kind=model.kind,
        model_url=ctx.storage.signed_url(model.storage_key, ctx.settings.download_url_ttl_s),
        model_main=model.main,
        scene=job.scene,
        **{k: ov[k] for k in RENDER_OVERRIDES if k in ov},
        timeout_s=ctx.settings.task_timeout_s,
        stall_timeout_s=ctx.settings.stall_timeout_s,
        heartbeat_s=ctx.settings.heartbeat_s,
        device=job.device,
        cpu_fallback=job.cpu_fallback,
    )


async def _leased_task(s: AsyncSession, task_id: str, lease_id: str) -> Task:
    task = await s.get(Task, task_id)
    if task is None:
        raise not_found("task", task_id)
    if task.state != sm.RUNNING or task.lease_id != lease_id:
        raise ApiError(
            409, f"lease {lease_id} on task {task_id} is no longer valid (state {task.state})", "lease_id"
        )
    return task


@retry_on_disconnect
async def heartbeat(
    ctx: FarmContext, task_id: str, lease_id: str, current_frame: int | None
) -> dict[str, Any]:
    """Extend a lease and record progress.

    Returns:
        ``{"cancel": False}`` while the attempt is wanted.

    Raises:
        ApiError: 409 when the lease is stale (the task was canceled, requeued or finished);
            the agent must stop and discard the attempt.
    """
    async with ctx.db.session() as s:
        task = await _leased_task(s, task_id, lease_id)
        task.lease_expires_at = utcnow() + timedelta(seconds=ctx.settings.lease_s)
        changed = current_frame is not None and current_frame != task.current_frame
        if current_frame is not None:
            task.current_frame = current_frame
        await s.commit()
    if changed:
        await status_of(ctx).tasks([task], events=False)
        await status_of(ctx).event(
            task.job_id, {"type": "progress", "task_id": task_id, "frame": current_frame}
        )
    return {"cancel": False}


async def store_frame(
    ctx: FarmContext, task_id: str, lease_id: str, frame: int, upload: Path, ext: str
) -> tuple[dict[str, Any], bool]:
    """Store one rendered frame of a leased task, once.

    A frame counts once its object is stored and its row committed. When the job
    already has this frame (a repeated upload, or a requeued task), the upload is
    discarded and the existing frame returned.

    Args:
        upload: a temp file holding the image; moved into storage or deleted.
        ext: the file extension (``.png``, ``.exr``, ``.jpg``).

    Returns:
        (the frame's description, whether it was newly stored).

    Raises:
        ApiError: 409 stale lease; 400 when ``frame`` is not one of the task's frames,
            ``ext`` is not an output extension or the file does not start with its signature.
    """
    if ext not in OUTPUT_EXTENSIONS.values():
        upload.unlink(missing_ok=True)
        raise ApiError(400, f"unsupported frame extension {ext!r}", "frame")
    with open(upload, "rb") as fh:
        head = fh.read(8)
    if not head.startswith(IMAGE_MAGIC[ext]):
        upload.unlink(missing_ok=True)
        raise ApiError(400, f"the uploaded frame is not a {ext} image (wrong file signature)", "frame")
    lock = _frame_locks.get((task_id, frame))
    if lock is None:
        lock = _frame_locks[(task_id, frame)] = asyncio.Lock()
    try:
        async with lock, ctx.db.session() as s:
            task = await _leased_task(s, task_id, lease_id)
            if frame not in task.frames:
                raise ApiError(400, f"frame {frame} is not part of task {task_id}", "frame")
            job = await s.get(Job, task.job_id)
            expected = OUTPUT_EXTENSIONS[job.overrides.get("output_format", "PNG")]
            if ext != expected:
                raise ApiError(400, f"this job renders {expected} frames, not {ext}", "ext")
            existing = await s.scalar(select(Frame).where(Frame.job_id == task.job_id, Frame.frame == frame))
            if existing is not None:
                return _frame_dict(existing), False
            filename = f"frame_{frame:06d}{ext}" if frame >= 0 else f"frame_-{-frame:06d}{ext}"
            key = f"jobs/{task.job_id}/frames/{filename}"
            digest = await asyncio.to_thread(_sha256, upload)
            size = await ctx.storage.put_file(key, upload)
            row = Frame(
                job_id=task.job_id,
                task_id=task_id,
                frame=frame,
                storage_key=key,
                filename=filename,
                size_bytes=size,
                sha256=digest,
            )
            s.add(row)
            try:
                await s.commit()
            except IntegrityError:
                await s.rollback()
                existing = await s.scalar(
                    select(Frame).where(Frame.job_id == task.job_id, Frame.frame == frame)
                )
                return _frame_dict(existing), False
    finally:
        upload.unlink(missing_ok=True)
    await status_of(ctx).event(task.job_id, {"type": "frame", "frame": frame, "task_id": task_id})
    await publish_job(ctx, task.job_id, now=False)
    return _frame_dict(row), True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _frame_dict(f: Frame) -> dict[str, Any]:
    return {"frame": f.frame, "filename": f.filename, "size_bytes": f.size_bytes, "sha256": f.sha256}


@retry_on_disconnect
async def finish_task(ctx: FarmContext, task_id: str, result: TaskResult) -> dict[str, Any]:
    """Record the end of an attempt.

    A ``completed`` report is checked against the stored frames: a task whose frames
    are partly missing fails and its message names the missing frames. The devices the
    attempt used and whether it fell back to the CPU are kept on the task.

    A failed attempt follows the failure policy (:func:`server.jobs.failure_policy.fail_attempt`): a row in
    ``task_failures``; the task back in the queue for another agent after a backoff, or
    failed for good; the agent blocklisted for the job after ``blocklist_after`` failures;
    the whole job failed when no eligible agent remains or too many of its tasks failed.

    Returns:
        ``{"task_id", "state", "message"}``: ``state`` is ``completed``, ``failed`` (for
        good) or ``queued`` (to be retried on another agent).

    Raises:
        ApiError: 409 stale lease; 400 for an unknown status.
    """
    if result.status not in (sm.COMPLETED, sm.FAILED):
        raise ApiError(400, f"status must be 'completed' or 'failed', not {result.status!r}", "status")
    stopped: list[Task] = []
    async with ctx.db.session() as s:
        task = await _leased_task(s, task_id, result.lease_id)
        stored = set(
            (
                await s.scalars(
                    select(Frame.frame).where(Frame.job_id == task.job_id, Frame.frame.in_(task.frames))
                )
            ).all()
        )
        missing = [f for f in task.frames if f not in stored]
        state, message, kind = result.status, result.message, result.kind
        if state == sm.COMPLETED and missing:
            state, kind = sm.FAILED, "frames_missing"
            message = f"frames missing after render: {format_frames(missing)}"
        elif state == sm.FAILED and missing and "missing" not in message:
            message = f"{message} (frames missing: {format_frames(missing)})".strip()
        now = utcnow()
        job = await s.get(Job, task.job_id)
        assert job is not None
        task.log_tail = [line[:1000] for line in result.log_tail[-50:]]
        task.render_seconds = result.render_seconds
        task.device_used, task.fallback = result.device[:255], bool(result.fallback)
        await _agent_done(s, task)
        if state == sm.COMPLETED:
            sm.check_task_transition(task.state, state)
            task.state, task.message, task.finished_at = state, message[:4000], now
            task.lease_id, task.lease_expires_at = None, None
            changed = await _refresh_job_state(s, job)
        else:
            state, message, stopped = await failure_policy.fail_attempt(
                ctx, s, task, job, kind or "error", message, now
            )
            changed = job.state in sm.FINISHED or await _refresh_job_state(s, job)
        await s.commit()
        out = {"task_id": task_id, "state": state, "message": message}
        if not changed and job.state not in sm.FINISHED:
            try:  # in a new transaction, after the commit (see settle_job)
                changed = await _settle(s, task.job_id)
            except Exception as exc:  # the result is committed; only the job's state may lag
                log.warning("job %s: state not refreshed after task %s: %s", task.job_id, task_id, exc)
    if state in sm.FINISHED:
        ctx.observe("task_finished", result.render_seconds, state=state, frames=len(stored), pool=task.pool)
    for t in stopped:
        ctx.observe("task_finished", 0.0, state=sm.CANCELED, pool=t.pool)
    if state == sm.QUEUED:
        await ctx.wake_dispatcher()
    await status_of(ctx).tasks([task])
    if stopped:
        await status_of(ctx).tasks(stopped, events=False)
    await publish_job(ctx, task.job_id, now=changed)
    return out


@retry_on_disconnect
async def settle_job(ctx: FarmContext, job_id: str) -> bool:
    """End a job whose tasks have all finished, under a lock on its row; returns whether its state changed.

    :func:`finish_task` checks the job inside its own transaction, before its commit:
    two tasks finishing at the same moment each see the other still running (READ
    COMMITTED) and neither ends the job. This check runs after the commit, so the later
    of the two sees both. It costs one index seek while the job still has work.
    """
    async with ctx.db.session() as s:
        return await _settle(s, job_id)


async def _settle(s: AsyncSession, job_id: str) -> bool:
    if await _has(s, job_id, [sm.RUNNING, sm.QUEUED]):
        return False  # the read-only transaction ends with the session
    job = await s.get(Job, job_id, with_for_update=True, populate_existing=True)
    if job is None:
        return False
    changed = await _refresh_job_state(s, job)
    await s.commit()
    return changed


@retry_on_disconnect
async def release_task(ctx: FarmContext, task_id: str, lease_id: str) -> dict[str, Any]:
    """An agent that stops (shut down, not crashed) hands its task back: queued again, attempt not counted.

    Raises:
        ApiError: 409 stale lease.
    """
    async with ctx.db.session() as s:
        task = await _leased_task(s, task_id, lease_id)
        job = await s.get(Job, task.job_id)
        sm.check_task_transition(task.state, sm.QUEUED)
        task.state, task.message = sm.QUEUED, f"released by agent {task.agent} (stopping)"
        task.attempts = max(0, task.attempts - 1)
        task.lease_id = task.lease_expires_at = task.current_frame = task.dispatched_at = task.route = None
        changed = await _refresh_job_state(s, job)
        await _agent_done(s, task)
        await s.commit()
    await ctx.wake_dispatcher()
    await status_of(ctx).tasks([task])
    await publish_job(ctx, task.job_id, now=changed)
    return {"task_id": task_id, "state": sm.QUEUED}


@retry_on_disconnect
async def extend_leases(ctx: FarmContext) -> int:
    """Give every running task a full lease from now; returns how many.

    Called when a scheduler takes over (a server started, or another one lost the lock):
    while no scheduler ran, agents could not heartbeat, so their leases say nothing
    about whether they are alive. Those still rendering heartbeat within the new lease.
    """
    async with ctx.db.session() as s:
        res = await s.execute(
            update(Task)
            .where(Task.state == sm.RUNNING)
            .values(lease_expires_at=utcnow() + timedelta(seconds=ctx.settings.lease_s))
        )
        await s.commit()
    return res.rowcount or 0


@retry_on_disconnect
async def requeue_expired(ctx: FarmContext) -> int:
    """Requeue running tasks whose lease expired (agent lost); fail them after ``max_attempts``.

    Returns:
        How many tasks were requeued or failed.
    """
    now = utcnow()
    touched: set[str] = set()
    async with ctx.db.session() as s:
        expired = (
            await s.scalars(select(Task).where(Task.state == sm.RUNNING, Task.lease_expires_at < now))
        ).all()
        for task in expired:
            job = await s.get(Job, task.job_id)
            task.lease_id, task.lease_expires_at, task.current_frame = None, None, None
            if task.attempts >= ctx.settings.max_attempts:
                task.state, task.finished_at = sm.FAILED, now
                task.message = f"lease expired on {task.attempts} attempts (agent {task.agent} lost)"
                ctx.observe("task_finished", 0.0, state=sm.FAILED, pool=task.pool)
            else:
                task.state, task.dispatched_at, task.route = sm.QUEUED, None, None
                task.message = f"requeued: lease of agent {task.agent} expired"
            await _refresh_job_state(s, job)
            touched.add(job.id)
        await s.commit()
    if expired:
        await ctx.wake_dispatcher()
        await status_of(ctx).tasks(expired)
    for job_id in touched:
        await publish_job(ctx, job_id)
    return len(expired)


# ---------------------------------------------------------------- blocklist


@retry_on_disconnect
async def job_blocklist(ctx: FarmContext, job_id: str) -> dict[str, Any]:
    """The agents blocklisted for a job (``settings.blocklist_after`` failures in it not cleared).

    Returns:
        ``{"job_id", "blocklist_after", "agents": [{"agent", "failures", "kinds", "last_failure_at",
        "last_message"}]}``, agents by name.

    Raises:
        ApiError: 404 unknown job.
    """
    after = ctx.settings.blocklist_after
    async with ctx.db.session() as s:
        if await s.get(Job, job_id) is None:
            raise not_found("job", job_id)
        names = await failure_policy.blocklisted(s, job_id, after)
        rows = (
            await s.scalars(
                select(TaskFailure)
                .where(
                    TaskFailure.job_id == job_id,
                    TaskFailure.agent.in_(sorted(names)),
                    TaskFailure.cleared_at.is_(None),
                )
                .order_by(TaskFailure.agent, TaskFailure.at, TaskFailure.id)
            )
        ).all()
    agents: dict[str, dict[str, Any]] = {}
    for r in rows:
        a = agents.setdefault(r.agent, {"agent": r.agent, "failures": 0, "kinds": []})
        a["failures"] += 1
        if r.kind not in a["kinds"]:
            a["kinds"].append(r.kind)
        a["last_failure_at"], a["last_message"] = r.at.isoformat() + "Z", r.message
    return {"job_id": job_id, "blocklist_after": after, "agents": list(agents.values())}


@retry_on_disconnect
async def clear_blocklist(ctx: FarmContext, job_id: str, agent: str) -> dict[str, Any]:
    """Let a blocklisted agent take a job's tasks again: its failures in the job are marked
    cleared (they no longer count), and it leaves the failed agents of the job's queued tasks.

    Returns:
        ``{"job_id", "agent", "cleared": <failure rows cleared>}``.

    Raises:
        ApiError: 404 unknown job, or the agent is not blocklisted for it; 409 the job has finished.
    """
    now = utcnow()
    async with ctx.db.session() as s:
        job = await s.get(Job, job_id)
        if job is None:
            raise not_found("job", job_id)
        if job.state in sm.FINISHED:
            raise ApiError(
                409,
                f"job {job_id} has already finished ({job.state}): nothing of it is left to render",
                "job_id",
            )
        if agent not in await failure_policy.blocklisted(s, job_id, ctx.settings.blocklist_after):
            raise ApiError(404, f"agent {agent!r} is not blocklisted for job {job_id}", "agent")
        res = await s.execute(
            update(TaskFailure)
            .where(TaskFailure.job_id == job_id, TaskFailure.agent == agent, TaskFailure.cleared_at.is_(None))
            .values(cleared_at=now)
            .execution_options(synchronize_session=False)
        )
        queued = (
            await s.scalars(
                select(Task).where(
                    Task.job_id == job_id, Task.state == sm.QUEUED, Task.failed_agents.is_not(None)
                )
            )
        ).all()
        for t in queued:
            if agent in (t.failed_agents or []):
                t.failed_agents = [a for a in t.failed_agents or [] if a != agent]
        await s.commit()
    await ctx.wake_dispatcher()
    await publish_job(ctx, job_id)
    return {"job_id": job_id, "agent": agent, "cleared": res.rowcount or 0}
