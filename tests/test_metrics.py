"""``GET /metrics``: scrape-time gauges read from a real database and broker, recorded
histograms and counters, one registry per app, and a scrape that survives a broken database."""

from __future__ import annotations

import asyncio
import math
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import timedelta
from pathlib import Path

import aiomysql
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from cli.farm import free_port
from protocol.messages import TASK_QUEUE
from server.app import create_app
from server.cache import open_cache
from server.config import Settings
from server.context import FarmContext
from server.metrics import FarmMetrics, metrics_for, online_window_s, queue_for_pool
from server.persistence.tables import Agent, Job, Model, OutboxMessage, Task, utcnow

pytestmark = pytest.mark.asyncio

MARIADB = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": ""}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(body: str) -> Samples:
    """Every sample of a scrape by (sample name, labels)."""
    out: Samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


@asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[tuple[FarmContext, TestClient]]:
    """The API app (no scheduler, so outbox rows stay unpublished) on a loopback port."""
    ctx = FarmContext.from_settings(settings)
    app = create_app(ctx, run_scheduler=False)
    async with TestClient(TestServer(app)) as client:
        yield ctx, client


async def scrape(client: TestClient) -> Samples:
    r = await client.get("/metrics")
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=")
    return parse(await r.text())


@pytest.fixture
def mariadb_url() -> Iterator[str]:
    """A private, empty database on the shared MariaDB, dropped afterwards."""
    name = f"rf_metrics_{uuid.uuid4().hex[:12]}"

    async def run(sql: str) -> None:
        conn = await aiomysql.connect(**MARIADB)
        try:
            async with conn.cursor() as cur:
                await cur.execute(sql)
        finally:
            conn.close()

    asyncio.run(run(f"CREATE DATABASE {name}"))
    try:
        yield f"mysql+aiomysql://root@127.0.0.1:3306/{name}"
    finally:
        asyncio.run(run(f"DROP DATABASE IF EXISTS {name}"))


@pytest.fixture(params=["sqlite", "mariadb"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    kw: dict[str, object] = {"heartbeat_s": 1.0}
    if request.param == "mariadb":
        kw["database_url"] = request.getfixturevalue("mariadb_url")
    return Settings(data_dir=tmp_path / "farm", **kw)  # type: ignore[arg-type]


async def _populate(ctx: FarmContext) -> dict[str, str]:
    now = utcnow()
    async with ctx.db.session() as s:
        model = Model(
            filename="a.blend", kind="blend", main="a.blend", sha256="0" * 64, size_bytes=1, storage_key="k"
        )
        s.add(model)
        await s.flush()
        job1 = Job(model_id=model.id, frames_spec="1-5", frame_count=5, chunk_size=1, state="running")
        job2 = Job(
            model_id=model.id, frames_spec="1-3", frame_count=3, chunk_size=1, state="queued", pool="gpu"
        )
        done = Job(model_id=model.id, frames_spec="1", frame_count=1, chunk_size=1, state="completed")
        s.add_all([job1, job2, done])
        await s.flush()
        for i, state in enumerate(["queued", "queued", "running", "completed", "failed"]):
            s.add(Task(job_id=job1.id, index=i, frames=[i + 1], state=state))
        for i in range(3):
            s.add(Task(job_id=job2.id, index=i, frames=[i + 1], state="queued", pool="gpu"))
        s.add(Task(job_id=done.id, index=0, frames=[1], state="completed"))
        s.add_all(
            [
                OutboxMessage(queue=TASK_QUEUE, payload={}, created_at=now - timedelta(seconds=30)),
                OutboxMessage(queue=TASK_QUEUE, payload={}, created_at=now),
                OutboxMessage(
                    queue=TASK_QUEUE, payload={}, created_at=now - timedelta(hours=1), published_at=now
                ),
            ]
        )
        stale = now - timedelta(seconds=online_window_s(ctx.settings.heartbeat_s) + 5)
        s.add_all(
            [
                Agent(name="gpu-1", capabilities={"backends": ["CUDA", "OPTIX"]}, last_seen_at=now),
                Agent(name="cpu-1", capabilities={"cpu_cores": 8}, last_seen_at=now),
                Agent(name="gpu-2", pool="gpu", capabilities={"backends": ["CUDA"]}, last_seen_at=now),
                Agent(name="late", capabilities={"backends": ["CUDA"]}, last_seen_at=stale),
                Agent(name="gone", capabilities={}, state="offline", last_seen_at=now),
            ]
        )
        await s.commit()
    return {"job2": job2.id}


async def test_scrape_time_gauges_follow_the_database_and_broker(settings: Settings) -> None:
    async with served(settings) as (ctx, client):
        empty = await scrape(client)
        assert value(empty, "renderfarm_tasks", state="queued", pool="default") == 0
        assert value(empty, "renderfarm_agents_online", pool="default", backend="cpu") == 0
        assert value(empty, "renderfarm_outbox_backlog") == 0

        ids = await _populate(ctx)
        for _ in range(2):
            await ctx.broker.publish(TASK_QUEUE, b"{}", priority=0)
        got = await scrape(client)

        assert series(got, "renderfarm_tasks") == {
            frozenset({("state", "queued"), ("pool", "default")}): 2,
            frozenset({("state", "running"), ("pool", "default")}): 1,
            frozenset({("state", "queued"), ("pool", "gpu")}): 3,
            frozenset({("state", "running"), ("pool", "gpu")}): 0,
        }
        assert value(got, "renderfarm_jobs", state="running", pool="default") == 1
        assert value(got, "renderfarm_jobs", state="queued", pool="default") == 0
        assert value(got, "renderfarm_jobs", state="queued", pool="gpu") == 1
        assert value(got, "renderfarm_outbox_backlog") == 2
        assert 29 <= value(got, "renderfarm_outbox_oldest_seconds") < 600
        assert series(got, "renderfarm_agents_online") == {
            frozenset({("pool", "default"), ("backend", "cuda")}): 1,
            frozenset({("pool", "default"), ("backend", "optix")}): 1,
            frozenset({("pool", "default"), ("backend", "cpu")}): 1,
            frozenset({("pool", "gpu"), ("backend", "cuda")}): 1,
        }
        assert value(got, "renderfarm_queue_depth", queue=TASK_QUEUE) == 2
        if queue_for_pool("gpu") != TASK_QUEUE:
            assert value(got, "renderfarm_queue_depth", queue=queue_for_pool("gpu")) == 0
        assert value(got, "renderfarm_cache_degraded") == 0
        assert value(got, "renderfarm_backend_up", backend="database") == 1
        assert value(got, "renderfarm_backend_up", backend="broker") == 1
        assert value(got, "process_resident_memory_bytes") > 0

        # the gpu job ends: its pool's series go away instead of staying stale
        async with ctx.db.session() as s:
            await s.execute(
                text("UPDATE tasks SET state = 'completed' WHERE job_id = :j"), {"j": ids["job2"]}
            )
            await s.execute(text("UPDATE jobs SET state = 'completed' WHERE id = :j"), {"j": ids["job2"]})
            await s.execute(text("UPDATE agents SET state = 'offline' WHERE pool = 'gpu'"))
            await s.execute(text("UPDATE outbox SET published_at = created_at"))
            await s.commit()
        after = await scrape(client)
        assert {dict(k)["pool"] for k in series(after, "renderfarm_tasks")} == {"default"}
        assert {dict(k)["pool"] for k in series(after, "renderfarm_agents_online")} == {"default"}
        assert value(after, "renderfarm_outbox_backlog") == 0
        assert value(after, "renderfarm_outbox_oldest_seconds") == 0


async def test_recorded_histograms_and_counters(tmp_path: Path) -> None:
    async with served(Settings(data_dir=tmp_path / "farm")) as (ctx, client):
        m = metrics_for(ctx)
        assert metrics_for(ctx) is m and getattr(ctx, "metrics", None) is m
        m.observe("dispatch_latency", 0.02)
        m.observe("dispatch_latency", -0.5, pool="gpu")  # another server's clock: counts as 0
        m.observe("dispatch_latency", math.nan)  # ignored
        m.observe("task_finished", 12.5, state="completed", frames=3, pool="gpu")
        m.observe("task_finished", 100.0, state="completed", frames=2, pool="gpu")
        m.observe("task_finished", 3.0, state="failed", frames=1)
        m.observe("task_finished", 0.0, state="canceled")
        with pytest.raises(ValueError, match="unknown metric event"):
            m.observe("nope", 1.0)
        with pytest.raises(ValueError, match="state"):
            m.observe("task_finished", 1.0)
        got = await scrape(client)

    lat = "renderfarm_dispatch_latency_seconds"
    assert value(got, f"{lat}_count", pool="default") == 1
    assert value(got, f"{lat}_sum", pool="default") == pytest.approx(0.02)
    assert value(got, f"{lat}_bucket", pool="default", le="0.01") == 0
    assert value(got, f"{lat}_bucket", pool="default", le="0.025") == 1
    assert value(got, f"{lat}_bucket", pool="gpu", le="0.001") == 1
    assert value(got, f"{lat}_sum", pool="gpu") == 0
    rs = "renderfarm_render_seconds"
    assert value(got, f"{rs}_count", state="completed", pool="gpu") == 2
    assert value(got, f"{rs}_sum", state="completed", pool="gpu") == pytest.approx(112.5)
    assert value(got, f"{rs}_bucket", state="completed", pool="gpu", le="30.0") == 1
    assert value(got, f"{rs}_count", state="failed", pool="default") == 1
    assert not any(dict(k).get("state") == "canceled" for k in series(got, f"{rs}_count"))
    assert value(got, "renderfarm_frames_rendered_total", pool="gpu") == 5
    assert value(got, "renderfarm_frames_rendered_total", pool="default") == 1
    assert value(got, "renderfarm_tasks_finished_total", state="completed", pool="gpu") == 2
    assert value(got, "renderfarm_tasks_finished_total", state="failed", pool="default") == 1
    assert value(got, "renderfarm_tasks_finished_total", state="canceled", pool="default") == 1


async def test_two_apps_in_one_process_keep_their_own_figures(tmp_path: Path) -> None:
    async with served(Settings(data_dir=tmp_path / "a")) as (a, ca):
        async with served(Settings(data_dir=tmp_path / "b")) as (b, cb):
            assert metrics_for(a).registry is not metrics_for(b).registry
            metrics_for(a).observe("task_finished", 5.0, state="completed", frames=4)
            await a.broker.publish(TASK_QUEUE, b"{}")
            got_a, got_b = await scrape(ca), await scrape(cb)
    assert value(got_a, "renderfarm_frames_rendered_total", pool="default") == 4
    assert ("renderfarm_frames_rendered_total", frozenset({("pool", "default")})) not in got_b
    assert value(got_a, "renderfarm_queue_depth", queue=TASK_QUEUE) == 1
    assert value(got_b, "renderfarm_queue_depth", queue=TASK_QUEUE) == 0
    # a third registry in the same process is fine too (no "Duplicated timeseries")
    assert FarmMetrics(process=True).registry is not None


async def test_a_broken_database_still_answers_200_and_says_so(tmp_path: Path) -> None:
    async with served(Settings(data_dir=tmp_path / "farm")) as (ctx, client):
        metrics_for(ctx).observe("task_finished", 5.0, state="completed", frames=2)
        assert value(await scrape(client), "renderfarm_backend_up", backend="database") == 1
        async with ctx.db.session() as s:
            await s.execute(text("DROP TABLE tasks"))
            await s.commit()
        got = await scrape(client)
    assert value(got, "renderfarm_backend_up", backend="database") == 0
    assert series(got, "renderfarm_tasks") == {}
    assert series(got, "renderfarm_agents_online") == {}
    assert math.isnan(value(got, "renderfarm_outbox_backlog"))
    # what the process recorded is not lost with the database
    assert value(got, "renderfarm_frames_rendered_total", pool="default") == 2
    assert value(got, "renderfarm_queue_depth", queue=TASK_QUEUE) == 0


@contextmanager
def private_redis(tmp: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """A redis-server of this test's own on ``port`` (the shared one is never stopped)."""
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("private redis-server did not start") from None
                time.sleep(0.05)
        yield proc
    finally:
        proc.kill()
        proc.wait()


async def test_cache_degraded_follows_a_real_redis_outage(tmp_path: Path) -> None:
    port = free_port()
    settings = Settings(data_dir=tmp_path / "farm", cache_url=f"redis://127.0.0.1:{port}/0")
    try:
        await open_cache(settings.cache_url).close()
    except ValueError as exc:  # the Redis cache is issue 3's; skip only where it is not in the tree
        pytest.skip(f"no Redis cache backend in this tree: {exc}")
    with private_redis(tmp_path, port) as redis:
        async with served(settings) as (ctx, client):
            await ctx.cache.get("metrics-probe")
            assert value(await scrape(client), "renderfarm_cache_degraded") == 0
            redis.kill()
            redis.wait()
            await ctx.cache.get("metrics-probe")  # the first call that finds Redis gone
            assert value(await scrape(client), "renderfarm_cache_degraded") == 1
            with private_redis(tmp_path, port):
                deadline = time.monotonic() + 15
                while ctx.cache.degraded and time.monotonic() < deadline:
                    await ctx.cache.get("metrics-probe")
                    await asyncio.sleep(0.2)
                assert value(await scrape(client), "renderfarm_cache_degraded") == 0


async def test_metrics_route_is_described_in_openapi(tmp_path: Path) -> None:
    async with served(Settings(data_dir=tmp_path / "farm")) as (_ctx, client):
        r = await client.get("/api/openapi.json")
        doc = await r.json()
    op = doc["paths"]["/metrics"]["get"]
    assert op["x-permission"] == "public"
    assert "text/plain" in op["responses"]["200"]["content"]
