"""The scheduler against real databases (SQLite and MariaDB): the bounded dispatch window,
priority and fair share, cancels, pools, the reconciler and the MariaDB leader lock.

The scheduler's loops are not started: each test calls ``dispatch_once``, ``relay_once``
and the reconciler itself, so it decides exactly when a dispatch happens.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from protocol.messages import TASK_QUEUE, queue_for_pool
from server.config import Settings
from server.context import FarmContext
from server.jobs import service
from server.jobs.service import job_summary
from server.jobs.status import task_status
from server.nodes import service as nodes
from server.persistence import Database
from server.persistence.tables import Model, OutboxMessage, Task, utcnow
from server.scheduler.dispatcher import dispatch_once, forget_dispatches
from server.scheduler.leader import LeaderLock
from server.scheduler.reconciler import prune_outbox, reconcile_broker, reconcile_cache
from server.scheduler.relay import relay_once
from tests.conftest import farm_settings
from tests.mariadb import admin_connection, fresh_database, mariadb_url  # noqa: F401

pytestmark = pytest.mark.asyncio


@pytest.fixture(params=["sqlite", "mariadb"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Farm settings on SQLite or on a fresh MariaDB database; a fixed window of 3."""
    kw: dict[str, object] = {"dispatch_window": 3}
    if request.param == "mariadb":
        kw["database_url"] = request.getfixturevalue("mariadb_url")
    return farm_settings(tmp_path / "farm", **kw)


@pytest.fixture
async def ctx(settings: Settings) -> AsyncIterator[FarmContext]:
    """A farm context with its schema and no scheduler loops, agents or API."""
    c = FarmContext.from_settings(settings)
    try:
        await c.db.migrate()
        yield c
    finally:
        await c.close()


async def _model(ctx: FarmContext) -> str:
    async with ctx.db.session() as s:
        m = Model(
            filename="a.blend", kind="blend", main="a.blend", sha256="0" * 64, size_bytes=1, storage_key="k"
        )
        s.add(m)
        await s.commit()
        return m.id


async def _job(
    ctx: FarmContext, tasks: int = 10, priority: int = 0, owner: str = "", pool: str | None = None
) -> str:
    """A job of ``tasks`` one-frame tasks; created_at strictly after the previous job's."""
    await asyncio.sleep(0.01)
    req = {
        "model_id": await _model(ctx),
        "frames": f"1-{tasks}",
        "chunk_size": 1,
        "priority": priority,
        "owner": owner,
        "pool": pool,
    }
    return (await service.create_job(ctx, req)).id


async def _dispatched(ctx: FarmContext) -> dict[str, list[int]]:
    """Task indexes with ``dispatched_at`` set and still queued, by job id."""
    out: dict[str, list[int]] = {}
    async with ctx.db.session() as s:
        rows = await s.execute(
            select(Task.job_id, Task.index)
            .where(Task.dispatched_at.is_not(None), Task.state == "queued")
            .order_by(Task.job_id, Task.index)
        )
        for job_id, index in rows.all():
            out.setdefault(job_id, []).append(index)
    return out


async def _outbox(ctx: FarmContext) -> list[OutboxMessage]:
    async with ctx.db.session() as s:
        return list((await s.scalars(select(OutboxMessage).order_by(OutboxMessage.id))).all())


async def _task_id(ctx: FarmContext, job_id: str, index: int) -> str:
    async with ctx.db.session() as s:
        tid = await s.scalar(select(Task.id).where(Task.job_id == job_id, Task.index == index))
    assert tid is not None
    return tid


# ---------------------------------------------------------------- dispatcher


async def test_window_bounds_dispatch_and_a_claim_frees_one_slot_in_index_order(ctx: FarmContext) -> None:
    job = await _job(ctx, tasks=10)
    assert await _dispatched(ctx) == {}  # creating a job dispatches nothing by itself
    assert await dispatch_once(ctx) == 3
    assert await _dispatched(ctx) == {job: [0, 1, 2]}
    rows = await _outbox(ctx)
    assert len(rows) == 3
    assert [r.queue for r in rows] == [TASK_QUEUE] * 3
    ids = {await _task_id(ctx, job, i) for i in range(3)}
    assert {r.payload["task_id"] for r in rows} == ids
    assert all(r.payload["job_id"] == job and r.published_at is None for r in rows)
    assert ctx.outbox_ready.is_set()

    assert await dispatch_once(ctx) == 0  # the window is full
    assert len(await _outbox(ctx)) == 3

    await service.claim_task(ctx, await _task_id(ctx, job, 1), "agent-1")
    assert await dispatch_once(ctx) == 1
    assert await _dispatched(ctx) == {job: [0, 2, 3]}
    assert len(await _outbox(ctx)) == 4
    assert await dispatch_once(ctx) == 0


async def test_higher_priority_job_submitted_later_gets_the_next_free_slots(ctx: FarmContext) -> None:
    low = await _job(ctx, tasks=10, priority=0)
    assert await dispatch_once(ctx) == 3
    high = await _job(ctx, tasks=5, priority=10)
    assert await dispatch_once(ctx) == 0  # nothing is pre-empted from the broker
    for i in range(2):
        await service.claim_task(ctx, await _task_id(ctx, low, i), f"agent-{i}")
    assert await dispatch_once(ctx) == 2
    assert await _dispatched(ctx) == {low: [2], high: [0, 1]}
    rows = await _outbox(ctx)
    assert [r.priority for r in rows[-2:]] == [10, 10]
    assert [r.payload["job_id"] for r in rows[-2:]] == [high, high]


async def test_two_owners_share_the_window_evenly(ctx: FarmContext) -> None:
    ctx.settings.dispatch_window = 4
    alice = await _job(ctx, tasks=10, owner="alice")
    bob = await _job(ctx, tasks=10, owner="bob")
    assert await dispatch_once(ctx) == 4
    assert await _dispatched(ctx) == {alice: [0, 1], bob: [0, 1]}
    # alice's agent takes one, bob's both: the freed slots go to alice, who has fewer in flight+running
    await service.claim_task(ctx, await _task_id(ctx, alice, 0), "a1")
    await service.claim_task(ctx, await _task_id(ctx, bob, 0), "b1")
    await service.claim_task(ctx, await _task_id(ctx, bob, 1), "b2")
    assert await dispatch_once(ctx) == 3
    # busy before: alice 2 (1 running + 1 waiting), bob 2 (2 running); slots go alice, bob, alice
    assert await _dispatched(ctx) == {alice: [1, 2, 3], bob: [2]}


async def test_raising_a_priority_in_the_database_changes_what_goes_next(ctx: FarmContext) -> None:
    ctx.settings.dispatch_window = 2
    first = await _job(ctx, tasks=5)
    second = await _job(ctx, tasks=5)
    assert await dispatch_once(ctx) == 2
    assert await _dispatched(ctx) == {first: [0, 1]}
    await service.claim_task(ctx, await _task_id(ctx, first, 0), "a")
    assert await dispatch_once(ctx) == 1
    assert await _dispatched(ctx) == {first: [1, 2]}  # same priority: the older job first

    async with ctx.db.session() as s:
        from server.persistence.tables import Job

        await s.execute(update(Job).where(Job.id == second).values(priority=5))
        await s.commit()
    await service.claim_task(ctx, await _task_id(ctx, first, 1), "b")
    assert await dispatch_once(ctx) == 1
    assert await _dispatched(ctx) == {first: [2], second: [0]}
    assert (await _outbox(ctx))[-1].priority == 5


async def test_canceled_jobs_are_never_dispatched_and_free_the_window(ctx: FarmContext) -> None:
    doomed = await _job(ctx, tasks=10, priority=5)
    never = await _job(ctx, tasks=4, priority=9)
    await service.cancel_job(ctx, never)
    assert await dispatch_once(ctx) == 3
    assert await _dispatched(ctx) == {doomed: [0, 1, 2]}
    waiting = await _job(ctx, tasks=10, priority=0)
    assert await dispatch_once(ctx) == 0
    await service.cancel_job(ctx, doomed)
    assert await dispatch_once(ctx) == 3
    assert await _dispatched(ctx) == {waiting: [0, 1, 2]}
    rows = await _outbox(ctx)
    assert never not in {r.payload["job_id"] for r in rows}
    assert [r.payload["job_id"] for r in rows].count(doomed) == 3  # none after the cancel
    async with ctx.db.session() as s:
        canceled = (await s.scalars(select(Task).where(Task.job_id == never))).all()
    assert {t.state for t in canceled} == {"canceled"} and all(t.dispatched_at is None for t in canceled)


async def test_automatic_window_grows_with_the_pools_online_agents(ctx: FarmContext) -> None:
    ctx.settings.dispatch_window = 0
    job = await _job(ctx, tasks=20)
    assert await dispatch_once(ctx) == 4  # no agents: at least 4
    caps = {"cpu_cores": 4}
    for i in range(3):
        await nodes.register(ctx, f"node-{i}", "default", caps, "1")
    await nodes.register(ctx, "gpu-node", "gpu", caps, "1")  # another pool's agent does not count
    await nodes.register(ctx, "gone", "default", caps, "1")
    await nodes.beat(ctx, "gone", stopping=True)  # offline agents do not count
    await nodes.register(ctx, "late", "default", caps, "1")
    async with ctx.db.session() as s:
        from server.persistence.tables import Agent

        await s.execute(
            update(Agent).where(Agent.name == "late").values(last_seen_at=utcnow() - timedelta(seconds=60))
        )
        await s.commit()
    assert await dispatch_once(ctx) == 2
    assert await _dispatched(ctx) == {job: list(range(6))}


async def test_pools_have_separate_windows_and_queues(ctx: FarmContext) -> None:
    cpu = await _job(ctx, tasks=10)
    gpu = await _job(ctx, tasks=10, pool="gpu", priority=50)
    assert await dispatch_once(ctx) == 6
    assert await _dispatched(ctx) == {cpu: [0, 1, 2], gpu: [0, 1, 2]}
    by_job: dict[str, set[str]] = {}
    for r in await _outbox(ctx):
        by_job.setdefault(r.payload["job_id"], set()).add(r.queue)
    assert by_job == {cpu: {TASK_QUEUE}, gpu: {"renderfarm.tasks.gpu"}}
    assert queue_for_pool("gpu") == "renderfarm.tasks.gpu"
    # a gpu claim frees a gpu slot only
    await service.claim_task(ctx, await _task_id(ctx, gpu, 0), "g")
    assert await dispatch_once(ctx) == 1
    assert await _dispatched(ctx) == {cpu: [0, 1, 2], gpu: [1, 2, 3]}


async def test_forget_dispatches_resets_what_the_broker_lost(ctx: FarmContext) -> None:
    job = await _job(ctx, tasks=5)
    assert await dispatch_once(ctx) == 3
    await service.claim_task(ctx, await _task_id(ctx, job, 0), "a")
    assert await dispatch_once(ctx) == 1
    assert await forget_dispatches(ctx) == 3  # the running task keeps its claim
    assert await _dispatched(ctx) == {}
    assert all(r.published_at is not None for r in await _outbox(ctx))
    assert await relay_once(ctx) == 0  # the dropped rows are not published later
    assert ctx.dispatch_ready.is_set()
    assert await dispatch_once(ctx) == 3
    assert await _dispatched(ctx) == {job: [1, 2, 3]}


async def test_released_and_expired_tasks_go_back_through_the_window(ctx: FarmContext) -> None:
    job = await _job(ctx, tasks=10)
    assert await dispatch_once(ctx) == 3
    spec = await service.claim_task(ctx, await _task_id(ctx, job, 0), "a")
    assert await dispatch_once(ctx) == 1
    assert await _dispatched(ctx) == {job: [1, 2, 3]}
    await service.release_task(ctx, spec.task_id, spec.lease_id)  # the agent stops cleanly
    assert await dispatch_once(ctx) == 0  # back in the database, not in the broker: the window is full
    await service.claim_task(ctx, await _task_id(ctx, job, 1), "b")
    assert await dispatch_once(ctx) == 1
    assert await _dispatched(ctx) == {job: [0, 2, 3]}  # the released task goes first

    lost = await _task_id(ctx, job, 2)
    await service.claim_task(ctx, lost, "c")
    assert await dispatch_once(ctx) == 1
    async with ctx.db.session() as s:
        await s.execute(
            update(Task).where(Task.id == lost).values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
        await s.commit()
    assert await service.requeue_expired(ctx) == 1
    assert await _dispatched(ctx) == {job: [0, 3, 4]}
    await service.claim_task(ctx, await _task_id(ctx, job, 3), "d")
    assert await dispatch_once(ctx) == 1
    assert await _dispatched(ctx) == {job: [0, 2, 4]}


async def test_many_jobs_of_one_owner_fill_the_window_oldest_first(ctx: FarmContext) -> None:
    ctx.settings.dispatch_window = 5
    jobs = [await _job(ctx, tasks=2, owner="carol") for _ in range(4)]
    other = await _job(ctx, tasks=2, owner="dave")
    assert await dispatch_once(ctx) == 5
    assert await _dispatched(ctx) == {jobs[0]: [0, 1], jobs[1]: [0], other: [0, 1]}


async def test_relay_publishes_dispatched_rows_to_the_pool_queue(ctx: FarmContext) -> None:
    await _job(ctx, tasks=4, pool="gpu")
    assert await dispatch_once(ctx) == 3
    assert await relay_once(ctx) == 3
    assert await ctx.broker.depth(queue_for_pool("gpu")) == 3
    assert await ctx.broker.depth(TASK_QUEUE) == 0
    assert await relay_once(ctx) == 0


# ---------------------------------------------------------------- reconciler


async def _age(ctx: FarmContext, seconds: float) -> None:
    """Pretend every dispatch and every publication happened ``seconds`` ago."""
    past = utcnow() - timedelta(seconds=seconds)
    async with ctx.db.session() as s:
        await s.execute(update(Task).where(Task.dispatched_at.is_not(None)).values(dispatched_at=past))
        await s.execute(update(OutboxMessage).values(published_at=past))
        await s.commit()


async def test_reconciler_hands_back_tasks_missing_from_the_broker(ctx: FarmContext) -> None:
    job = await _job(ctx, tasks=10)
    assert await dispatch_once(ctx) == 3
    await _age(ctx, 3600)  # "published" long ago, yet the broker holds nothing
    assert await ctx.broker.depth(TASK_QUEUE) == 0
    ctx.dispatch_ready.clear()
    assert await reconcile_broker(ctx, grace_s=0) == 3
    assert await _dispatched(ctx) == {}
    assert ctx.dispatch_ready.is_set()
    assert await dispatch_once(ctx) == 3  # and dispatched again
    assert await _dispatched(ctx) == {job: [0, 1, 2]}


async def test_reconciler_leaves_tasks_whose_messages_are_in_the_broker(ctx: FarmContext) -> None:
    job = await _job(ctx, tasks=10)
    assert await dispatch_once(ctx) == 3
    assert await relay_once(ctx) == 3  # really published to the broker
    assert await reconcile_broker(ctx, grace_s=0) == 0
    assert await _dispatched(ctx) == {job: [0, 1, 2]}


async def test_reconciler_hands_back_only_the_lost_messages_and_respects_the_grace(ctx: FarmContext) -> None:
    job = await _job(ctx, tasks=10)
    assert await dispatch_once(ctx) == 3
    rows = await _outbox(ctx)
    # two of the three messages reach the broker; the oldest dispatch's message is lost
    for r in rows[1:]:
        await ctx.broker.publish(r.queue, json.dumps(r.payload).encode(), priority=r.priority)
    async with ctx.db.session() as s:
        await s.execute(update(OutboxMessage).values(published_at=utcnow()))
        await s.commit()
    assert await reconcile_broker(ctx, grace_s=3600) == 0  # too recent to judge
    assert await _dispatched(ctx) == {job: [0, 1, 2]}
    first = await _task_id(ctx, job, 0)
    async with ctx.db.session() as s:
        await s.execute(
            update(Task).where(Task.id == first).values(dispatched_at=utcnow() - timedelta(seconds=120))
        )
        await s.commit()
    assert await reconcile_broker(ctx, grace_s=60) == 1
    assert await _dispatched(ctx) == {job: [1, 2]}


async def test_reconciler_waits_for_the_relay(ctx: FarmContext) -> None:
    job = await _job(ctx, tasks=10)
    assert await dispatch_once(ctx) == 3
    async with ctx.db.session() as s:  # old dispatches, but their rows are not published yet
        await s.execute(
            update(Task)
            .where(Task.dispatched_at.is_not(None))
            .values(dispatched_at=utcnow() - timedelta(seconds=3600))
        )
        await s.commit()
    assert await reconcile_broker(ctx, grace_s=0) == 0
    assert await _dispatched(ctx) == {job: [0, 1, 2]}


async def test_reconcile_cache_rewrites_corrupted_entries_and_leaves_correct_ones(ctx: FarmContext) -> None:
    bad = await _job(ctx, tasks=3)
    good = await _job(ctx, tasks=3)
    await dispatch_once(ctx)
    running = await _task_id(ctx, good, 0)
    await service.claim_task(ctx, running, "a")
    await service.claim_task(ctx, await _task_id(ctx, good, 1), "b")
    await status_flush(ctx)
    assert await reconcile_cache(ctx) == 0  # everything was written correctly

    wrong = {"id": bad, "state": "completed", "progress": 100.0}
    await ctx.cache.set(f"job:{bad}", wrong)
    await ctx.cache.set(f"task:{running}", {"id": running, "state": "queued"})
    assert await reconcile_cache(ctx) == 2
    assert await ctx.cache.get(f"job:{bad}") == await job_summary(ctx, bad)
    assert (await ctx.cache.get(f"job:{bad}"))["state"] == "queued"
    async with ctx.db.session() as s:
        task = await s.get(Task, running)
    assert task is not None
    assert await ctx.cache.get(f"task:{running}") == json.loads(json.dumps(task_status(task)))
    assert (await ctx.cache.get(f"task:{running}"))["state"] == "running"
    assert await reconcile_cache(ctx) == 0

    await ctx.cache.delete(f"job:{good}")  # a missing entry counts as stale
    assert await reconcile_cache(ctx) == 1
    assert await ctx.cache.get(f"job:{good}") == await job_summary(ctx, good)


async def status_flush(ctx: FarmContext) -> None:
    """Wait until coalesced status writes reached the cache."""
    await service.status_of(ctx).flush()


# ---------------------------------------------------------------- leader lock


async def test_sqlite_always_leads(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    try:
        a, b = LeaderLock(db), LeaderLock(db)
        assert await a.acquire() and await b.acquire()
        assert await a.held()
        await a.release()
    finally:
        await db.close()


def _lock_holder(name: str) -> int | None:
    with admin_connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT IS_USED_LOCK(%s)", (name,))
        return cur.fetchone()[0]


def _kill(connection_id: int) -> None:
    with admin_connection() as conn, conn.cursor() as cur:
        cur.execute(f"KILL {int(connection_id)}")


async def _eventually(check, timeout_s: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        if await check():
            return True
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.1)


async def test_mariadb_leader_lock_one_at_a_time_and_taken_over_when_killed(mariadb_url: str) -> None:  # noqa: F811
    db1, db2 = Database(mariadb_url), Database(mariadb_url)
    first, second = LeaderLock(db1), LeaderLock(db2)
    try:
        assert await first.acquire()
        assert await first.acquire()  # taking it again while holding it is fine
        assert not await second.acquire()
        assert await first.held() and not await second.held()

        holder = _lock_holder(first.name)
        assert holder is not None
        _kill(holder)  # the leader's connection dies (as with a SIGKILLed server)
        assert await _eventually(second.acquire)
        assert not await first.held()
        assert await second.held()
        assert not await first.acquire()

        await second.release()  # a clean stop hands it over at once
        assert not await second.held()
        assert await first.acquire()
        assert _lock_holder(first.name) is not None
    finally:
        await first.release()
        await second.release()
        await db1.close()
        await db2.close()


async def test_mariadb_farms_on_different_databases_each_have_a_leader(mariadb_url: str) -> None:  # noqa: F811
    """Two farms sharing one MariaDB server (one database each) must not share one scheduler lock."""
    with fresh_database() as other_url:
        db1, db2 = Database(mariadb_url), Database(other_url)
        a, b = LeaderLock(db1), LeaderLock(db2)
        try:
            assert await a.acquire()
            assert await b.acquire()
            assert a.name != b.name and len(a.name) <= 64
        finally:
            await a.release()
            await b.release()
            await db1.close()
            await db2.close()


async def _until(check, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    assert await _eventually(check, timeout_s), f"not within {timeout_s} s"


async def test_two_servers_on_one_mariadb_one_schedules_and_the_other_takes_over(
    mariadb_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    from server.scheduler.loops import Scheduler

    ctxs = [
        FarmContext.from_settings(farm_settings(tmp_path / n, database_url=mariadb_url, dispatch_window=2))
        for n in ("a", "b")
    ]
    await ctxs[0].db.migrate()
    one, two = (Scheduler(c, relay_poll_s=0.2, reconcile_s=600, leader_check_s=0.2) for c in ctxs)
    try:
        one.start()

        async def one_leads() -> bool:
            return one.leading

        await _until(one_leads)
        two.start()
        await asyncio.sleep(1.0)
        assert not two.leading

        job = await _job(ctxs[0], tasks=5)

        async def published_by_one() -> bool:
            return await ctxs[0].broker.depth(TASK_QUEUE) == 2

        await _until(published_by_one)
        assert await _dispatched(ctxs[0]) == {job: [0, 1]}

        await one.stop()  # the leader stops: the other server takes the lock and the loops

        async def two_leads() -> bool:
            return two.leading

        await _until(two_leads)
        await service.claim_task(ctxs[1], await _task_id(ctxs[1], job, 0), "a")

        async def published_by_two() -> bool:
            return await ctxs[1].broker.depth(TASK_QUEUE) == 1

        await _until(published_by_two)
        assert await _dispatched(ctxs[1]) == {job: [1, 2]}
        assert not one.leading
    finally:
        await one.stop()
        await two.stop()
        for c in ctxs:
            await c.close()


async def test_a_claim_on_another_server_wakes_the_scheduling_one(
    mariadb_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Without the wake over Redis the leader would only notice at its next poll (30 s here)."""
    from server.scheduler.loops import Scheduler

    redis = "redis://127.0.0.1:6379/0"
    ctxs = [
        FarmContext.from_settings(
            farm_settings(tmp_path / n, database_url=mariadb_url, cache_url=redis, dispatch_window=2)
        )
        for n in ("a", "b")
    ]
    await ctxs[0].db.migrate()
    leader = Scheduler(ctxs[0], relay_poll_s=0.2, reconcile_s=600, leader_check_s=0.2)
    leader.dispatch_poll_s = 30
    try:
        leader.start()

        async def leads() -> bool:
            return leader.leading

        await _until(leads)
        await asyncio.sleep(0.5)  # the wake listener is subscribed
        job = await _job(ctxs[0], tasks=5)
        await _until(lambda: _is(_dispatched(ctxs[0]), {job: [0, 1]}))
        assert not ctxs[1].leading
        await service.claim_task(ctxs[1], await _task_id(ctxs[1], job, 0), "b")
        await _until(lambda: _is(_dispatched(ctxs[0]), {job: [1, 2]}), timeout_s=5)
    finally:
        await leader.stop()
        for c in ctxs:
            await c.close()


async def _is(got, want) -> bool:  # type: ignore[no-untyped-def]
    return await got == want


# ---------------------------------------------------------------- outbox pruning


async def test_published_outbox_rows_are_pruned_after_an_hour(ctx: FarmContext) -> None:
    ctx.settings.dispatch_window = 3
    await _job(ctx, tasks=5)
    await dispatch_once(ctx)
    assert await relay_once(ctx) == 3
    async with ctx.db.session() as s:
        rows = (await s.scalars(select(OutboxMessage).order_by(OutboxMessage.id))).all()
        rows[0].published_at = utcnow() - timedelta(hours=2)  # one old, two recent
        s.add(OutboxMessage(queue=TASK_QUEUE, payload={}, priority=0))  # one not yet published
        await s.commit()
    assert await prune_outbox(ctx) == 1
    left = await _outbox(ctx)
    assert len(left) == 3 and sum(r.published_at is None for r in left) == 1


# ---------------------------------------------------------------- stopping


async def test_stop_ends_the_loops_even_when_a_driver_turns_the_cancel_into_an_error(
    ctx: FarmContext,
) -> None:
    """aiomysql and redis-py can turn a cancel that lands inside a query into an ordinary error
    (lost connection), which the loops retry on: stop() must still end them, and at once. Two CI
    runs hung 600 s in test_a_claim_on_another_server_wakes_the_scheduling_one this way."""
    from server.scheduler.loops import Scheduler

    entered = asyncio.Event()

    async def stubborn() -> None:  # a step whose query swallows the cancel
        entered.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise RuntimeError("Lost connection to server during query") from None

    held_calls = 0

    async def stubborn_held() -> bool:  # the lock check, likewise
        nonlocal held_calls
        held_calls += 1
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            raise RuntimeError("Lost connection to server during query") from None
        return True

    sched = Scheduler(ctx, relay_poll_s=0.05, reconcile_s=600, leader_check_s=0.05)
    sched._dispatch = stubborn  # type: ignore[method-assign]
    sched._lock.held = stubborn_held  # type: ignore[method-assign]
    sched.start()
    ctx.dispatch_ready.set()
    await asyncio.wait_for(entered.wait(), 10)
    t0 = asyncio.get_running_loop().time()
    await asyncio.wait_for(sched.stop(), 10)
    assert asyncio.get_running_loop().time() - t0 < 5
    assert held_calls > 0 and not sched.leading
