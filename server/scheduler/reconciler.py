"""The reconciler: compares the database (the truth) with the broker and the cache, and repairs drift.

* **Broker.** A task dispatched to a route's queue but neither claimed nor waiting
  there (its message was lost with a broker restart, or dead-lettered) would wait
  for ever. When a queue holds fewer messages than the route has dispatched,
  unclaimed tasks, the oldest such tasks dispatched more than ``grace_s`` seconds
  ago are handed back to the dispatcher. So are tasks waiting more than ``grace_s``
  seconds on a route that no online agent serves while another route of the same pool
  has agents (sent to the pool's CPU queue while no agent was online, and then only GPU
  agents came). A task published twice is harmless: the second claim is refused (409)
  and the agent drops the message.
* **Cache.** The cached summaries of unfinished jobs and the statuses of their
  running tasks are compared with the database and rewritten when they differ. After
  a cache outage (``on_recover``) every unfinished job is rewritten whole.
* **Leases.** Expired leases are requeued by :mod:`server.scheduler.timeout_checker`,
  which runs in the same loop.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select, update

from protocol.devices import route_pool
from protocol.messages import queue_for_pool
from server.context import FarmContext
from server.jobs import task_state_machine as sm
from server.jobs.service import job_summary, status_of
from server.jobs.status import task_status
from server.persistence.retry import retry_on_disconnect
from server.persistence.tables import Agent, Job, OutboxMessage, Task, utcnow

log = logging.getLogger(__name__)


@retry_on_disconnect
async def reconcile_broker(ctx: FarmContext, grace_s: float = 30.0) -> int:
    """Hand back to the dispatcher tasks whose messages are missing from the broker; returns how many."""
    cutoff = utcnow() - timedelta(seconds=grace_s)
    repaired = 0
    async with ctx.db.session() as s:
        unpublished = await s.scalar(
            select(func.count()).select_from(OutboxMessage).where(OutboxMessage.published_at.is_(None))
        )
        if unpublished:  # the relay is behind (or the broker is down): nothing to compare yet
            return 0
        rows = await s.execute(
            select(Task.pool, Task.route, func.count())
            .where(Task.state == sm.QUEUED, Task.dispatched_at.is_not(None))
            .group_by(Task.pool, Task.route)
        )
        waiting_on = [(pool, route or pool, n) for pool, route, n in rows.all()]
        served: set[str] = set()
        if waiting_on:
            since = utcnow() - timedelta(seconds=max(3 * ctx.settings.heartbeat_s, 15.0))
            served = set(
                (
                    await s.scalars(
                        select(Agent.route).where(Agent.state == "online", Agent.last_seen_at >= since)
                    )
                ).all()
            )
        served_pools = {route_pool(r) for r in served}
        for pool, route, waiting in waiting_on:
            if route not in served and pool in served_pools:
                lost, why = waiting, "wait on a route no online agent serves"
            else:
                try:
                    depth = await ctx.broker.depth(queue_for_pool(route))
                except Exception as exc:
                    log.info("reconciler: cannot read the depth of route %s: %s", route, exc)
                    continue
                lost, why = waiting - depth, "were missing from the broker"
            if lost <= 0:
                continue
            ids = (
                await s.scalars(
                    select(Task.id)
                    .where(
                        Task.pool == pool,
                        Task.state == sm.QUEUED,
                        Task.dispatched_at.is_not(None),
                        (Task.route == route) | (Task.route.is_(None) & (Task.pool == route)),
                        Task.dispatched_at < cutoff,
                    )
                    .order_by(Task.dispatched_at)
                    .limit(lost)
                )
            ).all()
            if ids:
                await s.execute(
                    update(Task)
                    .where(Task.id.in_(ids), Task.state == sm.QUEUED)
                    .values(dispatched_at=None, route=None)
                    .execution_options(synchronize_session=False)
                )
                repaired += len(ids)
                log.warning("reconciler: %d task(s) of route %s %s; dispatching again", len(ids), route, why)
        await s.commit()
    if repaired:
        ctx.dispatch_ready.set()
    return repaired


@retry_on_disconnect
async def prune_outbox(ctx: FarmContext, keep_s: float = 3600.0) -> int:
    """Delete outbox rows published more than ``keep_s`` seconds ago; returns how many.

    Published rows are kept a while for inspection, then go: the outbox would
    otherwise grow by one row per dispatched task for ever.
    """
    async with ctx.db.session() as s:
        res = await s.execute(
            delete(OutboxMessage).where(
                OutboxMessage.published_at.is_not(None),
                OutboxMessage.published_at < utcnow() - timedelta(seconds=keep_s),
            )
        )
        await s.commit()
    return res.rowcount or 0


async def reconcile_cache(ctx: FarmContext, full: bool = False) -> int:
    """Rewrite cached statuses that differ from the database; returns how many entries were rewritten.

    Args:
        full: rewrite every task of every unfinished job, and jobs finished in the last
            day, whatever the cache holds (after a cache outage).
    """
    rewritten = 0
    since = utcnow() - timedelta(days=1)
    async with ctx.db.session() as s:
        q = select(Job.id).where(Job.state.in_([sm.QUEUED, sm.RUNNING]))
        if full:
            q = select(Job.id).where((Job.state.in_([sm.QUEUED, sm.RUNNING])) | (Job.finished_at >= since))
        job_ids = (await s.scalars(q.limit(5000))).all()
        for job_id in job_ids:
            summary = await job_summary(ctx, job_id, s)
            if full or not _same(await _cached(ctx, f"job:{job_id}"), summary):
                await status_of(ctx).job_now(job_id)
                rewritten += 1
        tq = select(Task).where(Task.state == sm.RUNNING)
        if full and job_ids:
            tq = select(Task).where(Task.job_id.in_(job_ids))
        tasks = (await s.scalars(tq)).all()
    stale = []
    for t in tasks:
        if full or not _same(await _cached(ctx, f"task:{t.id}"), task_status(t)):
            stale.append(t)
    for i in range(0, len(stale), 1000):
        await status_of(ctx).tasks(stale[i : i + 1000], events=False)
    return rewritten + len(stale)


async def _cached(ctx: FarmContext, key: str) -> dict[str, Any] | None:
    try:
        return await ctx.cache.get(key)
    except Exception:
        return None


def _same(cached: dict[str, Any] | None, fresh: dict[str, Any]) -> bool:
    return cached is not None and cached == fresh
