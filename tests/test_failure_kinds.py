"""How the agent classifies a failed attempt (issue 5, part 4), with real Blender processes.

Each test runs one local agent (so a failure is final at once: no other agent could retry it)
and does to the real Blender process what happens on render machines: a crash (SIGSEGV), a
kill from outside (SIGKILL, what the OOM killer sends a local process), a hang (SIGSTOP: no
output any more). The out-of-memory case of a container is in tests/test_docker_farm.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from cli.client import FarmClient
from cli.farm import free_port, running_farm
from server.auth.service import local_admin_token
from tests.conftest import blender_pids, farm_settings

pytestmark = pytest.mark.blender


async def _fail_blender(tmp_path: Path, sample_blend: Path, sig: int, **settings: object) -> dict:
    """Submit a slow one-task job, send ``sig`` to its Blender once it renders, return the task."""
    config = farm_settings(tmp_path / "farm", **settings)
    async with running_farm(config, port=free_port(), agents=1) as farm:
        token = await local_admin_token(farm.ctx, "tests")
        async with FarmClient(farm.url, token) as client:
            model = await client.upload_model(sample_blend)
            job = await client.create_job(
                model_id=model["id"], frames="1-2", chunk_size=2, samples=4096, resolution_percentage=100
            )
            deadline = time.monotonic() + 120
            while True:
                [task] = await client.tasks(job["id"])
                if task.get("current_frame") is not None:
                    break
                assert time.monotonic() < deadline, "Blender never started rendering"
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            [pid] = blender_pids(config.data_dir)
            os.kill(pid, sig)
            while (await client.job(job["id"]))["state"] not in ("failed", "completed", "canceled"):
                assert time.monotonic() < deadline + 60, "the job did not end"
                await asyncio.sleep(0.2)
            [task] = await client.tasks(job["id"])
            assert blender_pids(config.data_dir) == []
            return task


async def test_a_crash_is_classified_and_its_report_attached(tmp_path: Path, sample_blend: Path) -> None:
    task = await _fail_blender(tmp_path, sample_blend, signal.SIGSEGV)
    assert task["state"] == "failed"
    assert task["failure_kind"] == "crashed"
    assert "Blender crashed (SIGSEGV) (its crash report is in the log)" in task["message"]
    log = "\n".join(task["log_tail"])
    assert "--- crash report renderfarm.crash.txt ---" in log
    assert "Fatal Python error: Segmentation fault" in log


async def test_a_kill_from_outside_is_reported_as_possibly_out_of_memory(
    tmp_path: Path, sample_blend: Path
) -> None:
    task = await _fail_blender(tmp_path, sample_blend, signal.SIGKILL)
    assert task["state"] == "failed"
    assert task["failure_kind"] == "killed"
    assert "Blender was killed by SIGKILL (possibly out of memory)" in task["message"]


async def test_a_hung_render_is_stopped_by_the_no_progress_timeout(
    tmp_path: Path, sample_blend: Path
) -> None:
    started = time.monotonic()
    task = await _fail_blender(tmp_path, sample_blend, signal.SIGSTOP, stall_timeout_s=3.0)
    assert task["state"] == "failed"
    assert task["failure_kind"] == "stalled"
    assert "Blender made no progress for 3 s and was killed" in task["message"]
    assert time.monotonic() - started < 90
