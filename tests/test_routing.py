"""GPU routing (issue 5, part 3) against a real in-process farm: agents advertise simulated GPU
backends (no GPU here; the capabilities are what a GPU machine's agent would send), and the
tests read each route's broker queue to see where the dispatcher sent every task.

Routes of pool ``default`` in these tests: ``default`` (CPU agents, queue ``renderfarm.tasks``),
``default.gpu-optix-cuda`` (an NVIDIA RTX agent: OPTIX and CUDA) and ``default.gpu-cuda``.
Some tests also run on MariaDB, RabbitMQ, Redis and S3 (``backends`` fixture).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import create_engine, text

from protocol.messages import TASK_QUEUE
from server.persistence.migrate import alembic_config
from server.scheduler.reconciler import reconcile_broker
from tests.conftest import Farm, farm_on
from tests.simagents import (
    SimAgent,
    both_backends,  # noqa: F401  (fixture)
    model_id,
    quiet,
    submit,
    take,
    task_rows,
    until,
)

pytestmark = pytest.mark.agents(0)

OPTIX_Q = "renderfarm.tasks.default.gpu-optix-cuda"
CUDA_Q = "renderfarm.tasks.default.gpu-cuda"


async def _summary(farm: Farm, job_id: str) -> dict[str, Any]:
    return await farm.client.job(job_id)


async def test_registration_answers_the_route_queue_and_refuses_unknown_backends(farm: Farm) -> None:
    cpu = await SimAgent.start(farm, "cpu-1")
    rtx = await SimAgent.start(farm, "rtx-1", ["cuda", "OPTIX", "OPTIX"])
    other = await SimAgent.start(farm, "gpu-b1", ["CUDA"], pool="blue")
    assert (cpu.registration["route"], cpu.queue) == ("default", TASK_QUEUE)
    assert (rtx.registration["route"], rtx.queue) == ("default.gpu-optix-cuda", OPTIX_Q)
    assert (other.registration["route"], other.queue) == ("blue.gpu-cuda", "renderfarm.tasks.blue.gpu-cuda")
    listed = {a["name"]: a for a in await farm.client.agents()}
    assert listed["rtx-1"]["backends"] == ["OPTIX", "CUDA"]  # normalised: upper case, no repeats
    assert listed["rtx-1"]["capabilities"]["backends"] == ["OPTIX", "CUDA"]
    assert listed["cpu-1"]["route"] == "default" and listed["cpu-1"]["backends"] == []
    async with farm.client.http.get(farm.url + "/metrics") as r:
        metrics = await r.text()
    assert f'renderfarm_queue_depth{{queue="{OPTIX_Q}"}} 0.0' in metrics  # route queues are measured

    token = await farm.agent_token("odd-1")
    bad = SimAgent(farm, "odd-1", token)
    status, body = await bad.call(
        "POST", "/api/agent/register", {"capabilities": {"backends": ["OPTIX", "VULKAN"]}}
    )
    assert status == 400 and body["error"]["field"] == "capabilities.backends", body
    assert "VULKAN" in body["error"]["message"]


async def test_bad_device_is_refused_naming_the_field(farm: Farm) -> None:
    mid = await model_id(farm)
    for device in ("gpu:vulkan", "GPU-OPTIX", "", "tpu"):
        async with farm.client.http.post(
            farm.url + "/api/jobs",
            json={"model_id": mid, "frames": "1", "device": device},
            headers=farm.auth,
        ) as r:
            body = await r.json()
        assert r.status == 400 and body["error"]["field"] == "device", (device, body)
        assert "gpu:optix" in body["error"]["message"]  # it lists the devices
    job = await submit(farm, 1, device=" GPU:OPTIX ")  # case and spaces do not matter
    assert job["device"] == "gpu:optix" and job["cpu_fallback"] is False


async def test_optix_tasks_reach_only_optix_agents(
    both_backends: dict[str, Any],  # noqa: F811
    tmp_path: Path,
) -> None:
    """gpu:optix tasks go to the OPTIX route only, never to the CUDA-only or CPU queues."""
    async with farm_on(tmp_path, both_backends) as farm:
        await SimAgent.start(farm, "cpu-1")
        await SimAgent.start(farm, "cuda-1", ["CUDA"])
        await SimAgent.start(farm, "rtx-1", ["OPTIX", "CUDA"])
        job = await submit(farm, 10, device="gpu:optix")
        assert job["device"] == "gpu:optix"
        first = await take(farm, OPTIX_Q, 4)  # the route's window: max(4, 2 x 1 agent)
        rows = {t.id: t for t in await task_rows(farm, job["id"])}
        assert {rows[t].index for t in first} == {0, 1, 2, 3}
        assert {rows[t].route for t in first} == {"default.gpu-optix-cuda"}
        assert await quiet(farm, CUDA_Q, 0.5) == [] and await quiet(farm, TASK_QUEUE, 0.2) == []


async def test_gpu_reaches_every_gpu_route_and_any_or_cpu_every_route(farm: Farm) -> None:
    farm.settings.dispatch_window = 2
    await SimAgent.start(farm, "cpu-1")
    await SimAgent.start(farm, "cuda-1", ["CUDA"])
    await SimAgent.start(farm, "rtx-1", ["OPTIX", "CUDA"])
    gpu = await submit(farm, 6, device="gpu")
    sent = {q: await take(farm, q, 2) for q in (OPTIX_Q, CUDA_Q)}
    assert await quiet(farm, TASK_QUEUE, 1.0) == []  # the CPU route gets no gpu task
    rows = {t.id: t for t in await task_rows(farm, gpu["id"])}
    assert {rows[t].route for t in sent[OPTIX_Q]} == {"default.gpu-optix-cuda"}
    assert {rows[t].route for t in sent[CUDA_Q]} == {"default.gpu-cuda"}
    await farm.client.cancel(gpu["id"])

    for device in ("any", "cpu"):
        job = await submit(farm, 6, device=device)
        got = {q: await take(farm, q, 2) for q in (TASK_QUEUE, OPTIX_Q, CUDA_Q)}  # 2 on each route
        ids = {t.id for t in await task_rows(farm, job["id"])}
        assert all(set(v) <= ids for v in got.values()), (device, got)
        await farm.client.cancel(job["id"])


async def test_gpu_job_waits_for_a_gpu_agent_then_runs(farm: Farm) -> None:
    cpu = await SimAgent.start(farm, "cpu-1")
    job = await submit(farm, 3, device="gpu:optix")

    async def says_waiting() -> bool:
        return (await _summary(farm, job["id"]))["message"] != ""

    await until(says_waiting, what="the job's waiting message")
    summary = await _summary(farm, job["id"])
    assert summary["message"] == "waiting for an agent offering gpu:optix in pool default"
    assert summary["state"] == "queued"
    assert await quiet(farm, TASK_QUEUE, 1.0) == []
    assert all(t.dispatched_at is None for t in await task_rows(farm, job["id"]))
    await cpu.beat()

    cuda = await SimAgent.start(farm, "cuda-1", ["CUDA"])  # CUDA only: still not OPTIX
    await asyncio.sleep(1.0)
    assert await quiet(farm, cuda.queue, 0.5) == []
    assert (await _summary(farm, job["id"]))["message"].startswith("waiting for an agent offering gpu:optix")

    rtx = await SimAgent.start(farm, "rtx-1", ["OPTIX", "CUDA"])
    ids = await take(farm, rtx.queue, 3)

    async def cleared() -> bool:
        return (await _summary(farm, job["id"]))["message"] == ""

    await until(cleared, what="the waiting message cleared")
    status, spec = await rtx.claim(ids[0])
    assert status == 200, spec
    assert spec["device"] == "gpu:optix" and spec["cpu_fallback"] is False


async def test_cpu_agent_claiming_a_gpu_task_gets_409_and_the_task_goes_to_a_gpu_agent(
    both_backends: dict[str, Any],  # noqa: F811
    tmp_path: Path,
) -> None:
    async with farm_on(tmp_path, both_backends) as farm:
        cpu = await SimAgent.start(farm, "cpu-1")
        rtx = await SimAgent.start(farm, "rtx-1", ["OPTIX", "CUDA"])
        job = await submit(farm, 1, device="gpu")
        [tid] = await take(farm, rtx.queue, 1)
        status, body = await cpu.claim(tid)  # as if the message had reached the CPU agent
        assert status == 409, body
        assert "device gpu" in body["error"]["message"] and "cpu-1" in body["error"]["message"]
        [again] = await take(farm, rtx.queue, 1)  # handed back and dispatched again
        assert again == tid
        status, spec = await rtx.claim(tid)
        assert status == 200, spec
        [task] = await farm.client.tasks(job["id"])
        assert task["state"] == "running" and task["agent"] == "rtx-1" and task["attempts"] == 1


async def test_cpu_fallback_is_recorded_and_shown(farm: Farm) -> None:
    rtx = await SimAgent.start(farm, "rtx-1", ["OPTIX", "CUDA"])
    job = await submit(farm, 2, device="gpu:optix", cpu_fallback=True)
    assert job["cpu_fallback"] is True and job["fallback_tasks"] == 0
    first, second = await take(farm, rtx.queue, 2)
    status, spec = await rtx.claim(first)
    assert status == 200 and spec["cpu_fallback"] is True and spec["device"] == "gpu:optix"
    await rtx.complete(spec, device="CPU", fallback=True)  # the GPU failed; the job allowed the CPU
    status, spec = await rtx.claim(second)
    assert status == 200
    await rtx.complete(spec, device="OPTIX: NVIDIA RTX 6000 (simulated)")
    summary = await _summary(farm, job["id"])
    assert summary["state"] == "completed" and summary["fallback_tasks"] == 1
    tasks = await farm.client.tasks(job["id"])
    assert [(t["device_used"], t["fallback"]) for t in tasks] == [
        ("CPU", True),
        ("OPTIX: NVIDIA RTX 6000 (simulated)", False),
    ]
    assert [t["route"] for t in tasks] == ["default.gpu-optix-cuda"] * 2


async def test_work_sent_to_the_cpu_queue_before_any_agent_moves_to_the_gpu_agents(farm: Farm) -> None:
    """With no agent online, an ``any`` job waits in the pool's CPU queue; when only GPU agents
    come, the reconciler hands those tasks back and they go to the GPU route."""
    job = await submit(farm, 6)
    await until(lambda: _dispatched(farm, job["id"], 4), what="4 tasks in the CPU queue")
    rows = await task_rows(farm, job["id"])
    assert {t.route for t in rows if t.dispatched_at} == {"default"}
    rtx = await SimAgent.start(farm, "rtx-1", ["OPTIX", "CUDA"])
    fresh = await take(farm, rtx.queue, 2)  # the new route's window (4) gets the 2 not yet sent
    assert len(set(fresh)) == 2
    for tid in fresh:
        assert (await rtx.claim(tid))[0] == 200
    assert await reconcile_broker(farm.ctx, grace_s=0) == 4  # stranded on a route nobody serves
    again = await take(farm, rtx.queue, 4)
    assert set(again) | set(fresh) == {t.id for t in rows}


async def _dispatched(farm: Farm, job_id: str, n: int) -> bool:
    return sum(t.dispatched_at is not None for t in await task_rows(farm, job_id)) == n


def test_migration_0004_gives_existing_agents_and_dispatched_tasks_their_routes(tmp_path: Path) -> None:
    """A database at revision 0003 with an agent of pool ``gpu`` and a task waiting in the broker:
    after the upgrade both have the pool as their route, jobs ask for ``any``."""
    url = f"sqlite:///{tmp_path / 'rf.db'}"
    cfg = alembic_config()
    cfg.set_main_option("sqlalchemy.url", url)
    engine = create_engine(url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003")
        conn.execute(
            text(
                "INSERT INTO models (id, filename, kind, main, sha256, size_bytes, storage_key, info,"
                " created_at) VALUES ('m', 'a.blend', 'blend', 'a.blend', 'x', 1, 'k', '{}', '2026-01-01')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO jobs (id, model_id, name, state, frames_spec, frame_count, chunk_size, priority,"
                " owner, pool, overrides, message, created_at, updated_at) VALUES ('j', 'm', 'j', 'queued',"
                " '1-2', 2, 1, 0, '', 'gpu', '{}', '', '2026-01-01', '2026-01-01')"
            )
        )
        for tid, dispatched in (("t1", "'2026-01-01'"), ("t2", "NULL")):
            conn.execute(
                text(
                    'INSERT INTO tasks (id, job_id, "index", pool, dispatched_at, frames, state, attempts,'
                    f" message, log_tail, render_seconds, updated_at) VALUES ('{tid}', 'j', 0, 'gpu',"
                    f" {dispatched}, '[1]', 'queued', 0, '', '[]', 0, '2026-01-01')"
                )
            )
        conn.execute(
            text(
                "INSERT INTO agents (id, name, pool, capabilities, version, instance, state,"
                " registered_at, last_seen_at) VALUES ('a', 'node', 'gpu', '{}', '', '', 'online',"
                " '2026-01-01', '2026-01-01')"
            )
        )
        command.upgrade(cfg, "head")
        assert conn.execute(text("SELECT route FROM agents")).scalar() == "gpu"
        routes = dict(conn.execute(text("SELECT id, route FROM tasks")).all())
        assert routes == {"t1": "gpu", "t2": None}
        assert conn.execute(text("SELECT device, cpu_fallback FROM jobs")).one() == ("any", 0)
        command.downgrade(cfg, "0003")
        command.upgrade(cfg, "head")
    engine.dispose()
