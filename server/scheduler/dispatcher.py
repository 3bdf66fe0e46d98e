"""The dispatcher: decides which queued tasks go to the broker, a bounded number per pool.

Only a small window of tasks per capability pool sits in the broker at a time
("in flight": dispatched, not yet claimed). The rest wait in the database,
where a cancel or a priority change applies at once, without purging queues.
Each free slot goes to the highest-priority job; between jobs of the same
priority, to the owner with the fewest tasks in flight or running (fair share
between users), then to the oldest job, then in frame order.

A dispatch marks the task (``dispatched_at``) and writes its outbox row in one
transaction; the relay then publishes the row (:mod:`server.scheduler.relay`).
A pool is refilled once a quarter of its window is free (:func:`refill_at`), so that
a busy pool costs one dispatch per few claims rather than one per claim.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import load_only

from server.context import FarmContext
from server.jobs import task_state_machine as sm
from server.jobs.service import outbox_for
from server.persistence.retry import retry_on_disconnect
from server.persistence.tables import Agent, Job, OutboxMessage, Task, utcnow

MIN_WINDOW = 4
"""Smallest automatic window per pool (tasks in the broker not yet claimed)."""


@retry_on_disconnect
async def online_agents(ctx: FarmContext) -> dict[str, int]:
    """Agents heartbeating now, by pool (online: seen within ``max(3 * heartbeat_s, 15)`` seconds)."""
    since = utcnow() - timedelta(seconds=max(3 * ctx.settings.heartbeat_s, 15.0))
    async with ctx.db.session() as s:
        rows = await s.execute(
            select(Agent.pool, func.count())
            .where(Agent.state == "online", Agent.last_seen_at >= since)
            .group_by(Agent.pool)
        )
        return {pool: n for pool, n in rows.all()}


def refill_at(window: int) -> int:
    """Free slots a pool's window needs before it is refilled: a quarter of it, at least 1."""
    return max(1, window // 4)


@retry_on_disconnect
async def dispatch_once(ctx: FarmContext) -> int:
    """Fill every pool's window once; returns how many tasks were dispatched.

    The window is ``settings.dispatch_window`` when set, else twice the pool's online
    agents and at least :data:`MIN_WINDOW`.
    """
    fixed = ctx.settings.dispatch_window
    agents = {} if fixed > 0 else await online_agents(ctx)
    now = utcnow()
    dispatched = 0
    async with ctx.db.session() as s:
        jobs = (
            await s.scalars(
                select(Job)
                .options(load_only(Job.id, Job.pool, Job.priority, Job.owner, Job.created_at))
                .where(Job.state.in_([sm.QUEUED, sm.RUNNING]))
                .order_by(Job.priority.desc(), Job.created_at)
                .limit(1000)
            )
        ).all()
        if not jobs:
            return 0
        pools = {j.pool for j in jobs}
        inflight_rows = await s.execute(
            select(Task.pool, func.count())
            .where(Task.pool.in_(pools), Task.state == sm.QUEUED, Task.dispatched_at.is_not(None))
            .group_by(Task.pool)
        )
        inflight = {pool: n for pool, n in inflight_rows.all()}
        windows = {p: fixed if fixed > 0 else max(MIN_WINDOW, 2 * agents.get(p, 0)) for p in pools}
        due = [p for p in sorted(pools) if windows[p] - inflight.get(p, 0) >= refill_at(windows[p])]
        if not due:
            return 0
        busy = await s.execute(
            select(Task.pool, Job.owner, func.count())
            .join(Job, Task.job_id == Job.id)
            .where(
                Task.pool.in_(pools),
                or_(
                    Task.state == sm.RUNNING,
                    (Task.state == sm.QUEUED) & Task.dispatched_at.is_not(None),
                ),
            )
            .group_by(Task.pool, Job.owner)
        )
        share: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for pool, owner, n in busy.all():
            share[pool][owner] = n
        for pool in due:
            free = windows[pool] - inflight.get(pool, 0)
            chosen = await _choose(s, [j for j in jobs if j.pool == pool], free, share[pool])
            if not chosen:
                continue
            ids = [t.id for t, _ in chosen]
            await s.execute(
                update(Task)
                .where(Task.id.in_(ids), Task.state == sm.QUEUED, Task.dispatched_at.is_(None))
                .values(dispatched_at=now)
                .execution_options(synchronize_session=False)
            )
            s.add_all([outbox_for(t, job) for t, job in chosen])
            dispatched += len(chosen)
        await s.commit()
    if dispatched:
        ctx.outbox_ready.set()
    return dispatched


async def _choose(s, jobs: list[Job], free: int, share: dict[str, int]) -> list[tuple[Task, Job]]:  # type: ignore[no-untyped-def]
    """Pick up to ``free`` undispatched tasks from ``jobs`` (sorted by priority, then age)."""
    chosen: list[tuple[Task, Job]] = []
    i = 0
    while i < len(jobs) and len(chosen) < free:
        level = jobs[i].priority
        same = [j for j in jobs[i:] if j.priority == level]
        i += len(same)
        pending: dict[str, list[tuple[Task, Job]]] = defaultdict(list)
        for job in same:  # oldest first within an owner
            need = free - len(chosen) - len(pending[job.owner])
            if need <= 0:  # this owner already has more candidates than there are slots
                continue
            tasks = (
                await s.scalars(
                    select(Task)
                    .where(Task.job_id == job.id, Task.state == sm.QUEUED, Task.dispatched_at.is_(None))
                    .order_by(Task.index)
                    .limit(need)
                )
            ).all()
            pending[job.owner].extend((t, job) for t in tasks)
        cursors = {owner: 0 for owner in pending}
        while len(chosen) < free:
            live = [o for o in pending if cursors[o] < len(pending[o])]
            if not live:
                break
            owner = min(live, key=lambda o: (share.get(o, 0), o))
            chosen.append(pending[owner][cursors[owner]])
            cursors[owner] += 1
            share[owner] = share.get(owner, 0) + 1
    return chosen


@retry_on_disconnect
async def forget_dispatches(ctx: FarmContext) -> int:
    """After a restart with a broker that keeps nothing (``memory://``): every queued task is
    dispatched again and unpublished outbox rows are dropped. Returns the tasks reset."""
    async with ctx.db.session() as s:
        res = await s.execute(
            update(Task)
            .where(Task.state == sm.QUEUED, Task.dispatched_at.is_not(None))
            .values(dispatched_at=None)
        )
        await s.execute(
            update(OutboxMessage).where(OutboxMessage.published_at.is_(None)).values(published_at=utcnow())
        )
        await s.commit()
    ctx.dispatch_ready.set()
    return res.rowcount or 0
