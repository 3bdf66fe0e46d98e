"""Prometheus metrics of a farm (prometheus-client), served at ``GET /metrics``.

Each :class:`FarmMetrics` owns its own :class:`~prometheus_client.CollectorRegistry`, so
several farms (apps) in one process -- as in the tests -- never collide. One is
attached to each :class:`~server.context.FarmContext` as ``ctx.metrics`` (see
:func:`metrics_for`); the server code records events through ``ctx.observe(name, value,
**labels)``, which calls :meth:`FarmMetrics.observe`.

Two kinds of metrics:

* **Recorded by this server process** as things happen (reset when it restarts; with
  several server processes, add them up in PromQL with ``sum``):

  - ``renderfarm_dispatch_latency_seconds{pool}`` histogram: from a task's dispatch (its
    outbox message written, ``tasks.dispatched_at``) to its claim by an agent;
  - ``renderfarm_render_seconds{state,pool}`` histogram: Blender seconds of one finished
    task attempt, ``state`` ``completed`` or ``failed``;
  - ``renderfarm_frames_rendered_total{pool}`` counter: frames stored by finished tasks;
  - ``renderfarm_tasks_finished_total{state,pool}`` counter: tasks that ended.

* **Read from the database and the broker at scrape time** (the same in every server
  process; aggregate with ``max``, not ``sum``):

  - ``renderfarm_tasks{state,pool}`` and ``renderfarm_jobs{state,pool}`` gauges for the
    unfinished states ``queued`` and ``running`` (always present for the ``default`` pool,
    0 when empty). Finished states are not counted here: that would scan the whole task
    history at every scrape; ``renderfarm_tasks_finished_total`` counts them instead;
  - ``renderfarm_outbox_backlog`` gauge: outbox rows not yet published to the broker, and
    ``renderfarm_outbox_oldest_seconds``: the age of the oldest of them (0 when none), so a
    stuck relay shows;
  - ``renderfarm_agents_online{pool,backend}`` gauge: agents whose ``state`` is ``online``
    and that were seen within ``max(3 * heartbeat_s, 15)`` seconds (three missed
    heartbeats, but never less than 15 s so that a short GC pause or a slow network does
    not flap the figure). ``backend`` is each entry of the agent's advertised
    ``capabilities["backends"]`` in lower case (``cuda``, ``optix``...), ``cpu`` when it
    advertised none; an agent with several backends counts once under each;
  - ``renderfarm_queue_depth{queue}`` gauge: ready messages of each pool's task queue
    (``ctx.broker.depth``);
  - ``renderfarm_cache_degraded`` gauge: 1 while the status cache (Redis) is unreachable
    and reads fall back to the database, else 0;
  - ``renderfarm_backend_up{backend}`` gauge (``database``, ``broker``): 0 when the last
    scrape could not read that backend. Its other figures are then left out of the
    scrape rather than reported stale, and ``/metrics`` still answers 200 so the
    process's own counters are not lost.

Figures per job are not metrics: a ``job`` label grows without bound, and ``/metrics`` is
not access-controlled while job ids of one project must stay invisible to others (issue
4). A job's frames done and progress are in ``GET /api/jobs/{id}``; this module's
render-time and frame figures are per pool.

Plus the process's own ``process_*`` metrics (CPU, memory, open files) and Python's
``python_gc_*``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from sqlalchemy import func, select

from protocol.messages import TASK_QUEUE
from server.jobs.task_state_machine import COMPLETED, FAILED, QUEUED, RUNNING
from server.persistence.tables import DEFAULT_POOL, Agent, Job, OutboxMessage, Task, utcnow

if TYPE_CHECKING:
    from server.context import FarmContext

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
"""The ``Content-Type`` of :meth:`FarmMetrics.render`'s output (text exposition format)."""
LIVE_STATES = (QUEUED, RUNNING)
"""Task and job states counted by the scrape-time gauges."""
ONLINE_FLOOR_S = 15.0
"""An agent seen within ``max(3 * heartbeat_s, ONLINE_FLOOR_S)`` seconds is online."""
SOURCE_TIMEOUT_S = 5.0
"""Longest wait for one backend during a scrape (Prometheus' default scrape timeout is 10 s)."""
MAX_LABEL_LEN = 64
"""Longer label values (pool, backend names) are cut to this many characters."""
DISPATCH_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)
"""Seconds; fine below 50 ms (the dispatch target) and up to an hour of waiting for an agent."""
RENDER_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0)
"""Seconds of Blender time for one task attempt: a second up to twelve hours."""

try:  # the per-pool queue naming lands with the dispatcher
    from protocol.messages import queue_for_pool  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - until then: one queue for every pool

    def queue_for_pool(pool: str) -> str:
        """The broker queue of ``pool``."""
        return TASK_QUEUE


def online_window_s(heartbeat_s: float) -> float:
    """Seconds since an agent's last heartbeat within which it counts as online: ``max(3 * hb, 15)``."""
    return max(3.0 * heartbeat_s, ONLINE_FLOOR_S)


def _label(value: Any, default: str = DEFAULT_POOL) -> str:
    text = str(value).strip() if value is not None else ""
    return (text or default)[:MAX_LABEL_LEN]


@dataclass
class Snapshot:
    """Figures read from the backends by one scrape, before they are set on the gauges.

    ``None`` for a source means it could not be read (its gauges are left out).
    """

    tasks: dict[tuple[str, str], int] | None = None
    """``{(state, pool): count}`` of unfinished tasks."""
    jobs: dict[tuple[str, str], int] | None = None
    """``{(state, pool): count}`` of unfinished jobs."""
    outbox: tuple[int, float] | None = None
    """(unpublished rows, age in seconds of the oldest)."""
    agents: dict[tuple[str, str], int] | None = None
    """``{(pool, backend): online agents}``."""
    routes: set[str] = field(default_factory=set)
    """Routes of the online agents (their queues' depths are read too)."""
    queues: dict[str, int] = field(default_factory=dict)
    """``{queue: depth}`` for the queues that answered."""
    broker_up: bool = False
    cache_degraded: bool = False


class FarmMetrics:
    """The metrics of one farm, in their own registry (see the module docstring for each metric).

    Args:
        queues: broker queues whose depth is always reported, besides the queue of every
            pool that has unfinished tasks or online agents (``renderfarm.tasks`` by default).
        process: also export ``process_*`` and ``python_gc_*`` metrics.

    Recording methods never raise on odd values: a negative duration counts as 0 and a
    NaN or infinite one is ignored (clocks of two servers may disagree slightly).
    """

    def __init__(self, queues: Iterable[str] = (TASK_QUEUE,), process: bool = True) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queues: set[str] = set(queues)
        if process:
            ProcessCollector(registry=r)
            GCCollector(registry=r)
        self.tasks = Gauge(
            "renderfarm_tasks",
            "Unfinished tasks by state (queued, running) and pool",
            ["state", "pool"],
            registry=r,
        )
        self.jobs = Gauge(
            "renderfarm_jobs",
            "Unfinished jobs by state (queued, running) and pool",
            ["state", "pool"],
            registry=r,
        )
        self.outbox_backlog = Gauge(
            "renderfarm_outbox_backlog", "Outbox messages not yet published to the broker", registry=r
        )
        self.outbox_oldest = Gauge(
            "renderfarm_outbox_oldest_seconds",
            "Age of the oldest unpublished outbox message in seconds (0 when none)",
            registry=r,
        )
        self.agents_online = Gauge(
            "renderfarm_agents_online",
            "Online agents by pool and render backend (an agent with several backends counts under each)",
            ["pool", "backend"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "renderfarm_queue_depth", "Messages ready in a broker queue", ["queue"], registry=r
        )
        self.cache_degraded = Gauge(
            "renderfarm_cache_degraded",
            "1 while the status cache is unreachable and reads fall back to the database",
            registry=r,
        )
        self.backend_up = Gauge(
            "renderfarm_backend_up",
            "1 when the last scrape could read the backend (database, broker)",
            ["backend"],
            registry=r,
        )
        self.dispatch_latency = Histogram(
            "renderfarm_dispatch_latency_seconds",
            "Seconds from a task's dispatch to its claim by an agent",
            ["pool"],
            buckets=DISPATCH_BUCKETS,
            registry=r,
        )
        self.render_seconds = Histogram(
            "renderfarm_render_seconds",
            "Blender seconds of one finished task attempt",
            ["state", "pool"],
            buckets=RENDER_BUCKETS,
            registry=r,
        )
        self.frames_rendered = Counter(
            "renderfarm_frames_rendered", "Frames stored by finished tasks", ["pool"], registry=r
        )
        self.tasks_finished = Counter(
            "renderfarm_tasks_finished", "Tasks that ended, by final state", ["state", "pool"], registry=r
        )

    # ------------------------------------------------------------ recorded by the server

    def observe_dispatch_latency(self, seconds: float, pool: str = DEFAULT_POOL) -> None:
        """Record the time from a task's dispatch to its claim, in seconds."""
        if not math.isfinite(seconds):
            return
        self.dispatch_latency.labels(pool=_label(pool)).observe(max(0.0, seconds))

    def observe_task_finished(
        self, state: str, render_seconds: float = 0.0, frames: int = 0, pool: str = DEFAULT_POOL
    ) -> None:
        """Record a task's end: ``state`` (completed, failed, canceled), its attempt's Blender
        seconds (observed for completed and failed tasks) and the frames it stored."""
        pool, state = _label(pool), _label(state, "unknown")
        self.tasks_finished.labels(state=state, pool=pool).inc()
        if state in (COMPLETED, FAILED) and math.isfinite(render_seconds):
            self.render_seconds.labels(state=state, pool=pool).observe(max(0.0, render_seconds))
        if frames > 0:
            self.frames_rendered.labels(pool=pool).inc(int(frames))

    def observe(self, name: str, value: float, **labels: Any) -> None:
        """Record one event by name; what ``FarmContext.observe`` calls.

        Names:
            ``dispatch_latency``: ``value`` seconds; label ``pool`` (optional).
            ``task_finished``: ``value`` the attempt's Blender seconds; ``state`` (required),
            ``frames`` (frames stored, default 0), ``pool`` (optional).

        Raises:
            ValueError: for an unknown name or a missing ``state``.
        """
        pool = labels.get("pool", DEFAULT_POOL)
        if name == "dispatch_latency":
            self.observe_dispatch_latency(float(value), pool)
        elif name == "task_finished":
            if "state" not in labels:
                raise ValueError("task_finished needs a state label")
            self.observe_task_finished(labels["state"], float(value), int(labels.get("frames", 0) or 0), pool)
        else:
            raise ValueError(f"unknown metric event {name!r}")

    # ------------------------------------------------------------ read at scrape time

    async def snapshot(self, ctx: FarmContext) -> Snapshot:
        """Read the scrape-time figures: four indexed queries and one depth call per queue.

        A backend that fails or takes over :data:`SOURCE_TIMEOUT_S` seconds is left out
        of the snapshot (and logged without its URL); this never raises for that.
        """
        snap = Snapshot(cache_degraded=bool(getattr(ctx.cache, "degraded", False)))
        try:
            async with asyncio.timeout(SOURCE_TIMEOUT_S):
                await self._read_db(ctx, snap)
        except Exception as exc:
            log.warning("metrics: database not readable (%s)", type(exc).__name__)
            snap.tasks = snap.jobs = snap.outbox = snap.agents = None
        pools = (
            {DEFAULT_POOL} | {pool for _, pool in snap.tasks or {}} | {pool for pool, _ in snap.agents or {}}
        )
        queues = self.queues | {queue_for_pool(p) for p in pools | snap.routes}
        try:
            async with asyncio.timeout(SOURCE_TIMEOUT_S):
                for queue in sorted(queues):
                    try:
                        snap.queues[queue] = int(await ctx.broker.depth(queue))
                    except Exception as exc:  # one missing queue must not hide the others
                        log.debug("metrics: depth of %s unknown (%s)", queue, type(exc).__name__)
        except TimeoutError:
            log.warning("metrics: broker did not answer within %s s", SOURCE_TIMEOUT_S)
        snap.broker_up = bool(snap.queues)
        return snap

    async def _read_db(self, ctx: FarmContext, snap: Snapshot) -> None:
        now = utcnow()
        cutoff = now - timedelta(seconds=online_window_s(ctx.settings.heartbeat_s))
        async with ctx.db.session() as s:
            rows = await s.execute(
                select(Task.state, Task.pool, func.count())
                .where(Task.state.in_(LIVE_STATES))
                .group_by(Task.state, Task.pool)
            )
            tasks = {(st, _label(pool)): int(n) for st, pool, n in rows}
            rows = await s.execute(
                select(Job.state, Job.pool, func.count())
                .where(Job.state.in_(LIVE_STATES))
                .group_by(Job.state, Job.pool)
            )
            jobs = {(st, _label(pool)): int(n) for st, pool, n in rows}
            count, oldest = (
                await s.execute(
                    select(func.count(), func.min(OutboxMessage.created_at)).where(
                        OutboxMessage.published_at.is_(None)
                    )
                )
            ).one()
            rows = await s.execute(
                select(Agent.pool, Agent.capabilities, Agent.route).where(
                    Agent.state == "online", Agent.last_seen_at >= cutoff
                )
            )
            agents: dict[tuple[str, str], int] = {}
            for pool, caps, route in rows:
                snap.routes.add(route or pool)
                for backend in _backends(caps):
                    key = (_label(pool), backend)
                    agents[key] = agents.get(key, 0) + 1
        snap.tasks, snap.jobs, snap.agents = tasks, jobs, agents
        snap.outbox = (int(count or 0), max(0.0, (now - oldest).total_seconds()) if oldest else 0.0)

    def apply(self, snap: Snapshot) -> None:
        """Set the scrape-time gauges from ``snap`` (synchronous: no scrape interleaves)."""
        self.cache_degraded.set(1 if snap.cache_degraded else 0)
        self.backend_up.labels(backend="database").set(0 if snap.tasks is None else 1)
        self.backend_up.labels(backend="broker").set(1 if snap.broker_up else 0)
        for gauge, counts in ((self.tasks, snap.tasks), (self.jobs, snap.jobs)):
            gauge.clear()
            if counts is None:
                continue
            pools = {DEFAULT_POOL} | {pool for _, pool in counts}
            for pool in pools:
                for state in LIVE_STATES:
                    gauge.labels(state=state, pool=pool).set(counts.get((state, pool), 0))
        if snap.outbox is None:
            # an unlabelled gauge cannot be removed: NaN says "unknown"
            self.outbox_backlog.set(math.nan)
            self.outbox_oldest.set(math.nan)
        else:
            self.outbox_backlog.set(snap.outbox[0])
            self.outbox_oldest.set(snap.outbox[1])
        self.agents_online.clear()
        if snap.agents is not None:
            # always one series, so that "no agent online" reads 0 rather than no data
            for (pool, backend), n in ({(DEFAULT_POOL, "cpu"): 0} | snap.agents).items():
                self.agents_online.labels(pool=pool, backend=backend).set(n)
        self.queue_depth.clear()
        for queue, depth in snap.queues.items():
            self.queue_depth.labels(queue=queue).set(depth)

    async def render(self, ctx: FarmContext) -> bytes:
        """Read the backends, update the gauges and return the text exposition format.

        The backends are read first (awaiting), then the gauges are set and the text
        generated with no await in between, so concurrent scrapes do not mix.
        """
        started = time.monotonic()
        snap = await self.snapshot(ctx)
        self.apply(snap)
        log.debug("metrics scrape read the backends in %.3f s", time.monotonic() - started)
        return generate_latest(self.registry)


def _backends(caps: Any) -> list[str]:
    raw = caps.get("backends") if isinstance(caps, dict) else None
    names = sorted({_label(b, "").lower() for b in raw if isinstance(b, str) and b.strip()}) if raw else []
    return names or ["cpu"]


def metrics_for(ctx: FarmContext) -> FarmMetrics:
    """The :class:`FarmMetrics` of ``ctx`` (``ctx.metrics``), made and attached on first use."""
    current = getattr(ctx, "metrics", None)
    if isinstance(current, FarmMetrics):
        return current
    metrics = FarmMetrics()
    ctx.metrics = metrics  # type: ignore[attr-defined]
    return metrics
