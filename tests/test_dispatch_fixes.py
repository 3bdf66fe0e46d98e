"""Faults found by ``benchmarks/dispatch.py`` (one 10,000-task job through MariaDB and RabbitMQ).

* The last tasks of a job finishing at the same moment end the job (MariaDB, READ
  COMMITTED): each ``finish_task`` checks the job's state inside its own transaction,
  before its commit, so two of them running together each saw the other task still
  running, and a job whose every task had completed stayed ``running``.
* Job summaries are coalesced under steady load: the publisher summarized a job again
  as soon as the previous summary was done, dozens of times a second, because changes
  made during a summary kept its flush going.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import insert, select

from protocol.messages import TaskResult
from server.cache.redis import RedisCache
from server.config import Settings
from server.context import FarmContext
from server.jobs import service
from server.jobs.status import StatusPublisher
from server.persistence.tables import Job, Model, Task, new_id, utcnow
from tests.mariadb import mariadb_url  # noqa: F401  (fixture)


@pytest.fixture
async def ctx(tmp_path: Path, mariadb_url: str) -> AsyncIterator[FarmContext]:  # noqa: F811
    """A farm context on a fresh MariaDB database (embedded broker and cache)."""
    # every task of a job fails below: with the default max_failed_task_share the first failures
    # would end the job early and refuse the last results (409), which this file does not test
    c = FarmContext.from_settings(
        Settings(data_dir=tmp_path, database_url=mariadb_url, max_failed_task_share=1.0)
    )
    await c.db.migrate()
    yield c
    await c.close()


async def test_tasks_finishing_together_end_their_job(ctx: FarmContext) -> None:
    jobs, per_job = 20, 3
    now = utcnow()
    leases: dict[str, list[tuple[str, str]]] = {}
    async with ctx.db.session() as s:
        model = Model(
            filename="a.blend", kind="blend", main="a.blend", sha256="0" * 64, size_bytes=1, storage_key="m"
        )
        s.add(model)
        await s.flush()
        rows = []
        for _ in range(jobs):
            job = Job(
                id=new_id(),
                model_id=model.id,
                state="running",
                frames_spec=f"1-{per_job}",
                frame_count=per_job,
                chunk_size=1,
            )
            s.add(job)
            leases[job.id] = []
            for i in range(per_job):
                tid, lease = new_id(), new_id()
                leases[job.id].append((tid, lease))
                rows.append(
                    {
                        "id": tid,
                        "job_id": job.id,
                        "index": i,
                        "frames": [i + 1],
                        "state": "running",
                        "attempts": 1,
                        "lease_id": lease,
                        "started_at": now,
                        "dispatched_at": now,
                    }
                )
        await s.flush()
        await s.execute(insert(Task), rows)
        await s.commit()

    async def finish(tid: str, lease: str) -> None:
        await service.finish_task(ctx, tid, TaskResult(lease_id=lease, status="failed", message="x"))

    await asyncio.gather(*(finish(t, lease) for pairs in leases.values() for t, lease in pairs))
    async with ctx.db.session() as s:
        states = (await s.execute(select(Job.id, Job.state, Job.finished_at))).all()
        task_states = set((await s.scalars(select(Task.state))).all())
    assert task_states == {"failed"}
    assert {state for _, state, _ in states} == {"failed"}, states
    assert all(finished is not None for _, _, finished in states)


async def test_job_summaries_are_coalesced_while_a_job_keeps_changing() -> None:
    cache = RedisCache("redis://127.0.0.1:6379/0")
    job_id = f"test-coalesce-{new_id()}"
    made: list[float] = []

    async def summarize(jid: str) -> dict[str, object]:
        made.append(asyncio.get_running_loop().time())
        await asyncio.sleep(0.02)  # a summary takes a while (counts over the job's tasks)
        return {"id": jid, "n": len(made)}

    pub = StatusPublisher(cache, summarize, interval_s=0.2)
    try:
        loop = asyncio.get_running_loop()
        end = loop.time() + 1.5
        while loop.time() < end:  # a change every 5 ms for 1.5 s, as tasks finishing under load
            pub.job_later(job_id)
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.5)
        # one summary per interval (about 8 in 1.5 s), not one after another (about 60)
        assert 5 <= len(made) <= 10, len(made)
        assert all(b - a >= 0.19 for a, b in itertools.pairwise(made)), made
        assert await cache.get(f"job:{job_id}") == {"id": job_id, "n": len(made)}  # the last one is cached
    finally:
        await pub.close()
        await cache.delete(f"job:{job_id}")
        await cache.close()
