"""Warm Blender (issue 5, part 6): one Blender process renders consecutive tasks of a job.

Real Blender (the bpy module) through the in-process farm. A warm process killed in the
middle of a task is replaced by a fresh one that renders only the frames not stored yet,
and every frame ends stored exactly once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from cli.client import FarmClient
from cli.farm import free_port, running_farm
from server.auth.service import local_admin_token
from server.persistence.tables import Frame
from tests.conftest import blender_pids, farm_settings

pytestmark = pytest.mark.blender


async def _frames_stored(ctx, job_id: str) -> list[int]:  # type: ignore[no-untyped-def]
    async with ctx.db.session() as s:
        return sorted((await s.scalars(select(Frame.frame).where(Frame.job_id == job_id))).all())


@pytest.mark.parametrize("warm", [True, False])
async def test_one_process_per_job_when_warm_one_per_task_when_not(
    tmp_path: Path, sample_blend: Path, warm: bool
) -> None:
    settings = farm_settings(tmp_path / "farm")
    async with running_farm(settings, port=free_port(), agents=1, warm=warm) as farm:
        token = await local_admin_token(farm.ctx, "tests")
        async with FarmClient(farm.url, token) as client:
            model = await client.upload_model(sample_blend)
            job = await client.create_job(
                model_id=model["id"], frames="1-4", chunk_size=1, samples=1, resolution_percentage=10
            )
            done = await asyncio.wait_for(client.wait(job["id"], poll_s=0.2), 240)
            assert done["state"] == "completed", done
            assert await _frames_stored(farm.ctx, job["id"]) == [1, 2, 3, 4]
            [agent] = farm.agents
            assert agent.sessions_started == (1 if warm else 4)
            tasks = await client.tasks(job["id"])
            assert all(t["state"] == "completed" and t["attempts"] == 1 for t in tasks)

            # another job: a new process (the warm one belonged to the first job)
            job2 = await client.create_job(
                model_id=model["id"], frames="5", chunk_size=1, samples=1, resolution_percentage=10
            )
            assert (await asyncio.wait_for(client.wait(job2["id"], poll_s=0.2), 240))["state"] == "completed"
            assert agent.sessions_started == (2 if warm else 5)


async def test_a_warm_process_killed_mid_task_is_replaced_and_no_frame_is_lost_or_doubled(
    tmp_path: Path, sample_blend: Path
) -> None:
    settings = farm_settings(tmp_path / "farm")
    async with running_farm(settings, port=free_port(), agents=1, warm=True) as farm:
        token = await local_admin_token(farm.ctx, "tests")
        async with FarmClient(farm.url, token) as client:
            model = await client.upload_model(sample_blend)
            # task 1 (frames 1-4) warms the process up; it is killed during task 2 (frames 5-8),
            # once frame 5 is stored
            job = await client.create_job(
                model_id=model["id"], frames="1-8", chunk_size=4, samples=16, resolution_percentage=50
            )
            [agent] = farm.agents
            deadline = time.monotonic() + 180
            while (await client.job(job["id"]))["frames_done"] < 5:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            pids = blender_pids(settings.data_dir)
            assert len(pids) == 1, pids
            os.kill(pids[0], signal.SIGKILL)
            done = await asyncio.wait_for(client.wait(job["id"], poll_s=0.2), 240)
            assert done["state"] == "completed", done
            assert await _frames_stored(farm.ctx, job["id"]) == [1, 2, 3, 4, 5, 6, 7, 8]
            tasks = sorted(await client.tasks(job["id"]), key=lambda t: t["index"])
            assert [t["attempts"] for t in tasks] == [1, 1], "retried inside the attempt, not requeued"
            assert agent.sessions_started == 2
            assert tasks[1]["frames"] == [5, 6, 7, 8]
            log = "\n".join(tasks[1]["log_tail"])
            assert "the warm Blender process died (killed by SIGKILL)" in log
