"""Jobs rendered by agents whose Blender runs in Docker containers (issue 5), end to end.

Real dockerd and the real render image (``bash docker/build-images.sh``); every test skips,
saying why, when either is missing. The agents are in-process ``NodeAgent`` objects with a
``DockerExecutor`` (one farm in this process), except for the SIGKILL test, which needs agent
processes (``renderfarm agent --executor docker``) on MariaDB, RabbitMQ, Redis and S3.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from cli.client import FarmClient
from cli.farm import RunningFarm, free_port, running_farm
from node_agent.agent import NodeAgent
from node_agent.capabilities import detect
from node_agent.executor.docker import DockerExecutor, ExecutorUnavailable
from server.auth.service import create_agent_token, local_admin_token
from tests.conftest import farm_settings

pytestmark = pytest.mark.blender
MiB = 1 << 20


def _executor(**kw: Any) -> DockerExecutor:
    try:
        return DockerExecutor(**kw)
    except ExecutorUnavailable as exc:
        pytest.skip(f"Docker farm tests skipped: {exc}")


@pytest.fixture(scope="module", autouse=True)
def _docker_ready() -> None:
    _executor(memory_bytes=512 * MiB).close()


def _containers(executor: DockerExecutor, agent: str, running_only: bool = False) -> list[Any]:
    return executor.client.containers.list(
        all=not running_only, filters={"label": f"renderfarm.agent={agent}"}
    )


@contextlib.asynccontextmanager
async def docker_agent(
    farm: RunningFarm, work: Path, name: str, **executor_kw: Any
) -> AsyncIterator[tuple[NodeAgent, DockerExecutor]]:
    """An in-process agent of ``farm`` rendering in containers; stopped (and checked to leave no
    container behind) on exit."""
    _, token = await create_agent_token(farm.ctx, name, "tests")
    executor = _executor(labels={"agent": name}, **executor_kw)
    await executor.reap_orphans({"agent": name})
    agent = NodeAgent(
        farm.url, token, farm.ctx.broker, work / name, executor, name=name, capabilities=detect()
    )
    task = asyncio.create_task(agent.run())
    try:
        yield agent, executor
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        left = _containers(executor, name)
        executor.close()
        assert left == [], f"containers left behind: {[c.short_id for c in left]}"


def _blender(code: str, *args: object) -> None:
    """Run ``code`` in a Blender (bpy) subprocess with ``args``: builds a test file."""
    subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], check=True, capture_output=True, timeout=120
    )


async def test_a_job_renders_in_containers_end_to_end(tmp_path: Path, sample_blend: Path) -> None:
    settings = farm_settings(tmp_path / "farm")
    async with (
        running_farm(settings, port=free_port(), agents=0) as farm,
        docker_agent(farm, tmp_path, "docker-1", memory_bytes=2048 * MiB) as (agent, executor),
    ):
        token = await local_admin_token(farm.ctx, "tests")
        async with FarmClient(farm.url, token) as client:
            model = await client.upload_model(sample_blend)
            job = await client.create_job(
                model_id=model["id"], frames="1-4", chunk_size=2, samples=1, resolution_percentage=25
            )
            seen_running = False
            deadline = time.monotonic() + 240
            while (await client.job(job["id"]))["state"] not in ("completed", "failed"):
                seen_running = seen_running or bool(_containers(executor, "docker-1", running_only=True))
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
            done = await client.job(job["id"])
            tasks = await client.tasks(job["id"])
            assert done["state"] == "completed", [(t["message"], t["log_tail"][-8:]) for t in tasks]
            assert done["frames_done"] == 4
            assert seen_running, "Blender never ran in a container of this agent"
            outputs = await client.outputs(job["id"])
            assert sorted(f["frame"] for f in outputs["frames"]) == [1, 2, 3, 4]
            assert all(t["attempts"] == 1 for t in tasks)
            assert all(t["device_used"].startswith("CPU") for t in tasks), tasks
            assert agent.sessions_started == 1, "the job's two tasks shared one warm container"


HOSTILE = textwrap.dedent(
    """
    import sys, bpy
    out, marker_text, marker_driver, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    bpy.ops.wm.read_factory_settings(use_empty=True)
    s = bpy.context.scene
    # a text block registered to run when the file opens (Text.use_module), which writes a file
    # next to the test and in the model's own folder, and calls the test's listener
    text = bpy.data.texts.new("autorun.py")
    text.use_module = True
    text.write(
        "import os, socket\\n"
        f"open({marker_text!r}, 'w').write('pwned')\\n"
        "open(os.path.join(os.path.dirname(__import__('bpy').data.filepath), 'pwned'), 'w')\\n"
        f"socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'pwned')\\n"
    )
    bpy.ops.mesh.primitive_cube_add()
    cube = bpy.context.object
    # a driver whose expression has a side effect: it would write a file on every evaluation
    fc = cube.driver_add("location", 0)
    fc.driver.type = "SCRIPTED"
    fc.driver.expression = f"__import__('pathlib').Path({marker_driver!r}).write_text('pwned') and 0"
    bpy.ops.object.camera_add(location=(0, -6, 0), rotation=(1.5708, 0, 0))
    s.camera = bpy.context.object
    s.render.engine = "CYCLES"
    s.cycles.samples = 1
    s.render.resolution_x, s.render.resolution_y = 64, 48
    bpy.ops.wm.save_as_mainfile(filepath=out)
    """
)


ARMED = textwrap.dedent(
    """
    import sys, bpy
    bpy.context.preferences.filepaths.use_scripts_auto_execute = True
    bpy.ops.wm.open_mainfile(filepath=sys.argv[1], use_scripts=True)
    bpy.context.scene.frame_set(2)  # evaluates the driver
    """
)


class Listener:
    """A TCP listener on the host's loopback that records every connection it accepts."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted: list[Any] = []
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, addr = self.sock.accept()
            except OSError:
                continue
            self.accepted.append(addr)
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    lst = Listener()
    yield lst
    lst.close()


async def test_a_hostile_blend_writes_nothing_outside_its_output_and_connects_nowhere(
    tmp_path: Path, listener: Listener
) -> None:
    blend = tmp_path / "hostile.blend"
    marker_text, marker_driver = tmp_path / "pwned-by-text", tmp_path / "pwned-by-driver"
    _blender(HOSTILE, blend, marker_text, marker_driver, listener.port)
    assert not marker_text.exists() and not marker_driver.exists(), "building it ran nothing"
    # control: with auto-run on, outside any container, the file does what it says
    _blender(ARMED, blend)
    assert marker_text.read_text() == "pwned" and marker_driver.read_text() == "pwned"
    assert len(listener.accepted) == 1
    for path in tmp_path.rglob("pwned*"):
        path.unlink()
    listener.accepted.clear()
    settings = farm_settings(tmp_path / "farm")
    async with (
        running_farm(settings, port=free_port(), agents=0) as farm,
        docker_agent(farm, tmp_path, "docker-h", memory_bytes=2048 * MiB),
    ):
        token = await local_admin_token(farm.ctx, "tests")
        async with FarmClient(farm.url, token) as client:
            model = await client.upload_model(blend)
            job = await client.create_job(model_id=model["id"], frames="1-2", chunk_size=1)
            done = await asyncio.wait_for(client.wait(job["id"], poll_s=0.2), 240)
    assert done["state"] == "completed", done
    assert not marker_text.exists() and not marker_driver.exists()
    assert list(tmp_path.rglob("pwned*")) == [], "a file was written by the .blend's code"
    assert listener.accepted == [], "the .blend's code reached the host"


async def test_a_render_past_its_memory_limit_fails_as_out_of_memory(tmp_path: Path) -> None:
    # bpy alone needs about 270 MiB; subdividing a cube 9 times for the render needs about 800
    blend = tmp_path / "heavy.blend"
    code = textwrap.dedent(
        """
        import sys, bpy
        bpy.ops.wm.read_factory_settings(use_empty=True)
        bpy.ops.mesh.primitive_cube_add()
        mod = bpy.context.object.modifiers.new("s", "SUBSURF")
        mod.levels, mod.render_levels = 1, 9
        bpy.ops.object.camera_add(location=(0, -6, 0), rotation=(1.5708, 0, 0))
        s = bpy.context.scene
        s.camera = bpy.context.object
        s.render.engine = "CYCLES"
        s.cycles.samples = 1
        s.render.resolution_x, s.render.resolution_y = 64, 48
        bpy.ops.wm.save_as_mainfile(filepath=sys.argv[1])
        """
    )
    _blender(code, blend)
    settings = farm_settings(tmp_path / "farm")
    async with (
        running_farm(settings, port=free_port(), agents=0) as farm,
        docker_agent(farm, tmp_path, "docker-m", memory_bytes=512 * MiB),
    ):
        token = await local_admin_token(farm.ctx, "tests")
        async with FarmClient(farm.url, token) as client:
            model = await client.upload_model(blend)
            job = await client.create_job(model_id=model["id"], frames="1", chunk_size=1)
            done = await asyncio.wait_for(client.wait(job["id"], poll_s=0.2), 240)
            [task] = await client.tasks(job["id"])
    assert done["state"] == "failed", done
    assert task["failure_kind"] == "oom", task
    assert "ran out of memory" in task["message"]
    assert done["frames_done"] == 0


@pytest.fixture
def process_farm(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A ``renderfarm server`` process on MariaDB, RabbitMQ, Redis and S3 (lease 6 s), no agent yet."""
    from tests.production import production_backends
    from tests.test_production import Farm as ProcessFarm

    with production_backends(request) as backends:
        farm = ProcessFarm(tmp_path, backends, lease_s=6)
        try:
            farm.start_server()
            yield farm
        finally:
            farm.stop()


def test_an_agent_sigkilled_mid_frame_leaves_no_container_and_the_job_completes_on_another(
    process_farm: Any, sample_blend: Path
) -> None:
    farm = process_farm
    executor = _executor(memory_bytes=512 * MiB)
    try:
        for name in ("dock-a", "dock-b"):
            farm.start_agent(name, "--executor", "docker", "--memory", "2g", "--backends", "none")
        online = farm.wait_agents_online(2)
        assert {a["capabilities"]["backends"] == [] for a in online} == {True}
        job_id = farm.submit(sample_blend, "--frames", "1-4", "--chunk", "4", "--samples", "64")
        task = farm.wait_running(job_id)
        victim = task["agent"]
        other = "dock-b" if victim == "dock-a" else "dock-a"
        assert _containers(executor, victim, running_only=True), "the render runs in a container"
        farm.agents[victim].send_signal(signal.SIGKILL)
        farm.agents[victim].wait(10)
        deadline = time.monotonic() + 15
        while _containers(executor, victim, running_only=True):
            assert time.monotonic() < deadline, "the killed agent's container kept rendering"
            time.sleep(0.2)
        job = farm.wait(job_id)
        assert job["state"] == "completed", job["message"] + farm.tail()
        [task] = farm.tasks(job_id)
        assert task["agent"] == other and task["attempts"] == 2
        stored = farm.frames(job_id)
        assert sorted(f["frame"] for f in stored) == [1, 2, 3, 4], "every frame exactly once"
        # the exited container of the killed agent is removed when an agent of that name starts again
        farm.start_agent(victim, "--executor", "docker", "--memory", "2g")
        deadline = time.monotonic() + 60
        while _containers(executor, victim):
            assert time.monotonic() < deadline, "leftover container not removed at restart"
            time.sleep(0.3)
    finally:
        executor.close()


def test_limits_the_docker_host_cannot_give_are_refused_at_start() -> None:
    with pytest.raises(ValueError, match=r"--cpus 100000 is more than the \d+ CPUs of this Docker host"):
        DockerExecutor(cpus=100_000, memory_bytes=512 * MiB)
    with pytest.raises(ValueError, match=r"memory limit \d+ MiB is more than the \d+ MiB of this Docker"):
        DockerExecutor(memory_bytes=1 << 50)
