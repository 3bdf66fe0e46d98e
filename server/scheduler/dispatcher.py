"""The dispatcher: decides which queued tasks go to the broker, a bounded number per route.

Agents of one pool with the same GPU backends form a **route** (a capability pool,
:func:`protocol.devices.route_key`), with one broker queue. Only a small window of tasks
per route sits in the broker at a time ("in flight": dispatched, not yet claimed). The
rest wait in the database, where a cancel or a priority change applies at once, without
purging queues. Each free slot goes to the highest-priority job; between jobs of the same
priority, to the owner with the fewest tasks in flight or running in the pool (fair share
between users), then to the oldest job, then in frame order.

A task goes to a route of its job's pool whose backends satisfy the job's device
(:func:`protocol.devices.satisfies`) and that holds an online agent that is enabled
(an admin may disable one: ``PATCH /api/agents/{name}``), neither blocklisted for the job
nor among the agents that failed the task; of those, the one with the most free slots.
A pool with no online agent keeps one route, the pool itself (the CPU queue), for jobs
that any agent may render, so that work waits in the broker for the first agent to start;
a job asking for a GPU then waits in the database, its message saying so. A route whose
online agents are all disabled gets nothing (its window counts enabled agents only), and a
pool whose online agents are all disabled does not fall back to its base route: its jobs
wait, their message naming the disabled agents.
Tasks whose ``not_before`` (retry backoff) is still ahead are left for a later pass.

A dispatch marks the task (``dispatched_at``, ``route``) and writes its outbox row in one
transaction; the relay then publishes the row (:mod:`server.scheduler.relay`). A route is
refilled once a quarter of its window is free (:func:`refill_at`), so that a busy route
costs one dispatch per few claims rather than one per claim. Each pass costs a fixed
number of queries (jobs, online agents, in-flight counts, fair share, and the blocklists of
jobs with at least ``blocklist_after`` failed attempts) plus one per job that gets slots.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import load_only

from protocol.devices import route_backends, satisfies
from server.context import FarmContext
from server.jobs import task_state_machine as sm
from server.jobs.service import WAITING_PREFIX, outbox_for, publish_job
from server.persistence.retry import retry_on_disconnect
from server.persistence.tables import Agent, Job, OutboxMessage, Task, TaskFailure, utcnow

MIN_WINDOW = 4
"""Smallest automatic window per route (tasks in the broker not yet claimed)."""
REFETCH_ROUNDS = 3
"""Times a job's candidate tasks are read again when some of them no online agent may take."""


def online_since(ctx: FarmContext) -> datetime:
    """The oldest heartbeat (naive UTC) of an agent still online: ``max(3 * heartbeat_s, 15)`` s ago."""
    return utcnow() - timedelta(seconds=max(3 * ctx.settings.heartbeat_s, 15.0))


@retry_on_disconnect
async def online_agents(ctx: FarmContext) -> dict[str, int]:
    """Agents heartbeating now, by pool (online: seen within ``max(3 * heartbeat_s, 15)`` seconds)."""
    async with ctx.db.session() as s:
        rows = await s.execute(
            select(Agent.pool, func.count())
            .where(Agent.state == "online", Agent.last_seen_at >= online_since(ctx))
            .group_by(Agent.pool)
        )
        return {pool: n for pool, n in rows.all()}


async def online_routes(
    s: AsyncSession, since: datetime, pools: set[str], disabled: set[str] | None = None
) -> dict[str, dict[str, list[str]]]:
    """``{pool: {route: [online agent names]}}`` for ``pools``; a pool without an online agent
    gets its base route (the pool itself) with no names, which any agent of the pool may serve.

    Disabled agents are listed too (a pool whose agents are all disabled is not a pool without
    agents); their names are added to ``disabled`` when it is given."""
    rows = await s.execute(
        select(Agent.pool, Agent.route, Agent.name, Agent.enabled).where(
            Agent.state == "online", Agent.last_seen_at >= since, Agent.pool.in_(pools)
        )
    )
    out: dict[str, dict[str, list[str]]] = {p: {} for p in pools}
    for pool, route, name, enabled in rows.all():
        out[pool].setdefault(route or pool, []).append(name)
        if not enabled and disabled is not None:
            disabled.add(name)
    for pool, routes in out.items():
        if not routes:
            routes[pool] = []
    return out


def refill_at(window: int) -> int:
    """Free slots a route's window needs before it is refilled: a quarter of it, at least 1."""
    return max(1, window // 4)


def _open_to(agents: list[str], excluded: set[str]) -> bool:
    """Whether a route with online ``agents`` ([]: the base route of a pool with none online)
    holds one not in ``excluded``."""
    return not agents or any(a not in excluded for a in agents)


def _waiting_message(
    job: Job, satisfying: list[str], agents_of: dict[str, list[str]], disabled: set[str]
) -> str:
    if not satisfying:
        return f"{WAITING_PREFIX} offering {job.device} in pool {job.pool}"
    names = sorted({n for r in satisfying for n in agents_of[r]})
    off = [n for n in names if n in disabled]
    base = f"{WAITING_PREFIX} offering {job.device} in pool {job.pool} that is"
    if off and len(off) == len(names):
        return f"{base} enabled (disabled: {', '.join(off)})"
    if off:
        return f"{base} enabled and not blocklisted for this job (disabled: {', '.join(off)})"
    return f"{base} not blocklisted for this job"


@retry_on_disconnect
async def dispatch_once(ctx: FarmContext) -> int:
    """Fill every route's window once; returns how many tasks were dispatched.

    The window is ``settings.dispatch_window`` when set, else twice the route's online
    agents and at least :data:`MIN_WINDOW`. Also sets (and clears) the message of jobs
    whose tasks no online agent may take ("waiting for an agent offering gpu:optix in pool
    default").
    """
    fixed = ctx.settings.dispatch_window
    after = ctx.settings.blocklist_after
    now = utcnow()
    dispatched = 0
    noted: list[str] = []
    async with ctx.db.session() as s:
        jobs = (
            await s.scalars(
                select(Job)
                .options(
                    load_only(
                        Job.id,
                        Job.pool,
                        Job.priority,
                        Job.owner,
                        Job.created_at,
                        Job.device,
                        Job.message,
                        Job.failures,
                    )
                )
                .where(Job.state.in_([sm.QUEUED, sm.RUNNING]))
                .order_by(Job.priority.desc(), Job.created_at)
                .limit(1000)
            )
        ).all()
        if not jobs:
            return 0
        pools = {j.pool for j in jobs}
        disabled: set[str] = set()
        routes = await online_routes(s, online_since(ctx), pools, disabled)
        agents_of = {r: names for pool_routes in routes.values() for r, names in pool_routes.items()}
        blocked: dict[str, set[str]] = defaultdict(lambda: set(disabled))  # disabled: out of every job
        failing = [j.id for j in jobs if 0 < after <= j.failures]  # jobs that may have a blocklist
        if failing:
            rows = await s.execute(
                select(TaskFailure.job_id, TaskFailure.agent)
                .where(TaskFailure.job_id.in_(failing), TaskFailure.cleared_at.is_(None))
                .group_by(TaskFailure.job_id, TaskFailure.agent)
                .having(func.count() >= after)
            )
            for job_id, agent in rows.all():
                blocked[job_id].add(agent)  # on top of the disabled agents
        job_routes: dict[str, list[str]] = {}
        for job in jobs:
            satisfying = [r for r in routes[job.pool] if satisfies(job.device, route_backends(r))]
            job_routes[job.id] = [r for r in satisfying if _open_to(agents_of[r], blocked[job.id])]
            waiting = "" if job_routes[job.id] else _waiting_message(job, satisfying, agents_of, disabled)
            if job.message != waiting and (waiting or job.message.startswith(WAITING_PREFIX)):
                job.message = waiting
                noted.append(job.id)
        inflight_rows = await s.execute(
            select(Task.route, func.count())
            .where(Task.pool.in_(pools), Task.state == sm.QUEUED, Task.dispatched_at.is_not(None))
            .group_by(Task.route)
        )
        inflight = {route: n for route, n in inflight_rows.all()}
        windows = {
            r: fixed if fixed > 0 else max(MIN_WINDOW, 2 * sum(n not in disabled for n in names))
            for r, names in agents_of.items()
        }
        free = {r: windows[r] - inflight.get(r, 0) for r in agents_of}
        due = {r: free[r] for r in sorted(agents_of) if free[r] >= refill_at(windows[r])}
        if due:
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
            for pool in sorted(pools):
                cap = {r: n for r, n in due.items() if r in routes[pool]}
                if not cap:
                    continue
                candidates = [(j, [r for r in job_routes[j.id] if r in cap]) for j in jobs if j.pool == pool]
                picks = [(j, rs) for j, rs in candidates if rs]
                chosen = await _choose(s, picks, cap, share[pool], agents_of, blocked, now)
                by_route: dict[str, list[str]] = defaultdict(list)
                for t, _, r in chosen:
                    by_route[r].append(t.id)
                for r, ids in by_route.items():
                    await s.execute(
                        update(Task)
                        .where(Task.id.in_(ids), Task.state == sm.QUEUED, Task.dispatched_at.is_(None))
                        .values(dispatched_at=now, route=r)
                        .execution_options(synchronize_session=False)
                    )
                s.add_all([outbox_for(t, job, r) for t, job, r in chosen])
                dispatched += len(chosen)
        await s.commit()
    if dispatched:
        ctx.outbox_ready.set()
    for job_id in noted:
        await publish_job(ctx, job_id, now=False)
    return dispatched


async def _choose(
    s: AsyncSession,
    jobs: list[tuple[Job, list[str]]],
    cap: dict[str, int],
    share: dict[str, int],
    agents_of: dict[str, list[str]],
    blocked: dict[str, set[str]],
    now: datetime,
) -> list[tuple[Task, Job, str]]:
    """Pick undispatched tasks of ``jobs`` (sorted by priority, then age; each with the routes
    it may use) for the free slots ``cap`` (route -> slots, decremented); returns
    ``(task, job, route)`` triples. A task goes to the route with the most free slots among
    those holding an online agent that neither failed it nor is blocklisted for its job."""
    chosen: list[tuple[Task, Job, str]] = []
    i = 0
    while i < len(jobs) and sum(cap.values()) > 0:
        level = jobs[i][0].priority
        same = [jr for jr in jobs[i:] if jr[0].priority == level]
        i += len(same)
        pending: dict[str, list[tuple[Task, Job, list[str]]]] = defaultdict(list)
        for job, job_routes in same:  # oldest first within an owner
            room = min(sum(cap[r] for r in job_routes), sum(cap.values()))
            need = room - len(pending[job.owner])
            if need <= 0:  # this owner already has more candidates than there are slots
                continue
            pending[job.owner].extend(
                await _candidates(s, job, job_routes, need, agents_of, blocked[job.id], now)
            )
        cursors = {owner: 0 for owner in pending}
        while sum(cap.values()) > 0:
            live = [o for o in pending if cursors[o] < len(pending[o])]
            if not live:
                break
            owner = min(live, key=lambda o: (share.get(o, 0), o))
            task, job, task_routes = pending[owner][cursors[owner]]
            cursors[owner] += 1
            open_routes = [r for r in task_routes if cap[r] > 0]
            if not open_routes:
                continue
            route = max(open_routes, key=lambda r: (cap[r], _preferred(job.device, r), r))
            cap[route] -= 1
            chosen.append((task, job, route))
            share[owner] = share.get(owner, 0) + 1
    return chosen


def _preferred(device: str, route: str) -> bool:
    """Between routes with as many free slots: a CPU route for a ``cpu`` job, a GPU one otherwise."""
    return bool(route_backends(route)) != (device == "cpu")


async def _candidates(
    s: AsyncSession,
    job: Job,
    job_routes: list[str],
    need: int,
    agents_of: dict[str, list[str]],
    blocked: set[str],
    now: datetime,
) -> list[tuple[Task, Job, list[str]]]:
    """Up to ``need`` of the job's tasks due for dispatch, in frame order, each with the routes
    it may go to. Tasks that every online agent of those routes failed are skipped (and more
    read in their place, a few times at most)."""
    out: list[tuple[Task, Job, list[str]]] = []
    offset = 0
    for _ in range(REFETCH_ROUNDS):
        tasks = (
            await s.scalars(
                select(Task)
                .where(
                    Task.job_id == job.id,
                    Task.state == sm.QUEUED,
                    Task.dispatched_at.is_(None),
                    or_(Task.not_before.is_(None), Task.not_before <= now),
                )
                .order_by(Task.index)
                .offset(offset)
                .limit(need)
            )
        ).all()
        skipped = 0
        for t in tasks:
            excluded: set[str] = blocked | set(t.failed_agents or [])
            routes = [r for r in job_routes if _open_to(agents_of[r], excluded)]
            if routes:
                out.append((t, job, routes))
            else:
                skipped += 1
                failed = ", ".join(t.failed_agents or [])
                waiting = f"{WAITING_PREFIX} that has not failed it (failed on {failed}); none is online now"
                if t.message != waiting:
                    t.message = waiting  # instead of "retrying on another agent in N s", now stale
        if not skipped or len(tasks) < need:
            break
        offset += len(tasks)
        need = skipped
    return out


@retry_on_disconnect
async def forget_dispatches(ctx: FarmContext) -> int:
    """After a restart with a broker that keeps nothing (``memory://``): every queued task is
    dispatched again and unpublished outbox rows are dropped. Returns the tasks reset."""
    async with ctx.db.session() as s:
        res = await s.execute(
            update(Task)
            .where(Task.state == sm.QUEUED, Task.dispatched_at.is_not(None))
            .values(dispatched_at=None, route=None)
        )
        await s.execute(
            update(OutboxMessage).where(OutboxMessage.published_at.is_(None)).values(published_at=utcnow())
        )
        await s.commit()
    ctx.dispatch_ready.set()
    return res.rowcount or 0
