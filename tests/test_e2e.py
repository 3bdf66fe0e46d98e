"""End to end with real Blender: the CLI against `renderfarm up`, and cancel during a render.

Every test runs twice: on the embedded backends (SQLite, in-process queue and cache, a
folder) and on the production ones (MariaDB, RabbitMQ, Redis, S3 through moto's server).

`renderfarm up` logs the CLI in to itself (a personal token of the first admin in the
CLI's credentials): every test gets a credentials folder of its own (``XDG_CONFIG_HOME``),
so that nothing is read from or written to the user's.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from cli.client import FarmClient
from cli.farm import free_port, running_farm
from server.auth.service import create_agent_token, local_admin_token
from tests.conftest import Farm, blender_pids, farm_settings
from tests.production import backend_env, production_backends

pytestmark = pytest.mark.blender
RENDERFARM = [str(Path(sys.executable).with_name("renderfarm"))]  # the installed console script


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RENDERFARM, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def own_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The CLI's credentials folder for this test (``renderfarm up`` stores its login there)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("RENDERFARM_TOKEN", raising=False)
    return tmp_path / "config"


@pytest.fixture(params=["embedded", "production"])
def backends(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Both sets of backends (overrides the embedded-only fixture of conftest)."""
    if request.param == "embedded":
        yield {}
        return
    with production_backends(request) as urls:
        yield urls


@pytest.fixture
def farm_process(tmp_path: Path, request: pytest.FixtureRequest, backends: dict):  # type: ignore[no-untyped-def]
    """`renderfarm up` as a separate process on a free port; stopped with SIGTERM.

    ``@pytest.mark.up_args(...)`` adds options to ``renderfarm up``.
    """
    port = free_port()
    marker = request.node.get_closest_marker("up_args")
    extra = list(marker.args) if marker else []
    proc = subprocess.Popen(
        [*RENDERFARM, "up", "--port", str(port), "--data-dir", str(tmp_path / "farm"), *extra],
        env=backend_env(backends),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail("renderfarm up exited: " + (proc.stdout.read() if proc.stdout else ""))
        try:
            import urllib.request

            with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.2)
    yield url
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()


def test_cli_submit_wait_download_renders_four_distinct_frames(
    farm_process: str, sample_blend: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    res = _cli(
        "submit",
        str(sample_blend),
        "--frames",
        "1-4",
        "--chunk",
        "2",
        "--resolution",
        "50",
        "--server",
        farm_process,
        "--wait",
        "--download",
        str(out),
    )
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip().splitlines()[-1]
    files = sorted(out.iterdir())
    assert [f.name for f in files] == [f"frame_00000{i}.png" for i in range(1, 5)]
    pixels = []
    for f in files:
        with Image.open(f) as im:
            im.verify()
        with Image.open(f) as im:
            assert im.size == (160, 120)  # 320x240 at 50 %
            pixels.append(im.convert("RGB").tobytes())
    for a, b in itertools.combinations(pixels, 2):
        assert a != b  # the sample scene is animated: every frame differs

    res = _cli("status", job_id, "--server", farm_process)
    assert res.returncode == 0 and "completed" in res.stderr and "100.0%" in res.stderr
    again = tmp_path / "again"
    res = _cli("download", job_id, str(again), "--server", farm_process)
    assert res.returncode == 0, res.stderr
    assert [p.read_bytes() for p in sorted(again.iterdir())] == [p.read_bytes() for p in files]


def test_cli_errors_are_clear_and_exit_non_zero(farm_process: str, sample_blend: Path, corpus: Path) -> None:
    res = _cli("submit", str(sample_blend), "--frames", "1-10x0", "--server", farm_process)
    assert res.returncode == 2 and "1-10x0" in res.stderr and "frames" in res.stderr
    res = _cli("submit", str(corpus / "basic_file.blend"), "--frames", "1", "--server", farm_process)
    assert res.returncode == 2 and "no camera" in res.stderr
    res = _cli("submit", str(corpus / "corrupt_only_magic.blend"), "--frames", "1", "--server", farm_process)
    assert res.returncode == 2 and "corrupt" in res.stderr
    res = _cli("status", "nope", "--server", farm_process)
    assert res.returncode == 2 and "not found" in res.stderr
    res = _cli("status", "nope", "--server", "http://127.0.0.1:9")
    assert res.returncode == 2 and "cannot reach" in res.stderr


@pytest.mark.up_args("--task-timeout", "4")
def test_cli_failed_job_exits_1_with_the_reason(farm_process: str, sample_blend: Path) -> None:
    """A render past the hard timeout is killed; the job fails and `submit --wait` says why."""
    res = _cli(
        "submit",
        str(sample_blend),
        "--frames",
        "1",
        "--samples",
        "1000000",
        "--resolution",
        "1000",  # 3200x2400: adaptive sampling cannot converge within the 4 s
        "--server",
        farm_process,
        "--wait",
    )
    assert res.returncode == 1, res.stderr
    assert "failed" in res.stderr and "timed out after 4 s" in res.stderr


async def test_cancel_stops_blender_within_5_s_and_leaves_no_process(farm: Farm, sample_blend: Path) -> None:
    model = await farm.client.upload_model(sample_blend)
    job = await farm.client.create_job(
        model_id=model["id"], frames="1-3", chunk_size=3, samples=1_000_000, resolution_percentage=100
    )
    deadline = time.monotonic() + 60
    while not blender_pids(farm.settings.data_dir):
        assert time.monotonic() < deadline, "Blender never started"
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.5)  # let it get into the render
    assert blender_pids(farm.settings.data_dir)
    t0 = time.monotonic()
    canceled = await farm.client.cancel(job["id"])
    assert canceled["state"] == "canceled"
    while blender_pids(farm.settings.data_dir):
        assert time.monotonic() - t0 < 5, "Blender still running 5 s after cancel"
        await asyncio.sleep(0.05)
    stopped_after = time.monotonic() - t0
    assert stopped_after < 5
    await asyncio.sleep(1)
    assert blender_pids(farm.settings.data_dir) == []
    final = await farm.client.job(job["id"])
    assert final["state"] == "canceled" and final["frames_done"] == 0
    [task] = await farm.client.tasks(job["id"])
    assert task["state"] == "canceled"
    # the attempt folder is cleaned up
    attempts = farm.settings.data_dir / "agents" / "agent-1" / "attempts"
    for _ in range(50):  # polling a folder: there is no event to wait on
        if not any(attempts.iterdir()):
            break
        await asyncio.sleep(0.1)
    assert list(attempts.iterdir()) == []


async def test_a_restarted_farm_finishes_queued_and_orphaned_tasks(
    tmp_path: Path, sample_blend: Path, backends: dict
) -> None:
    """Stopping the embedded farm loses its in-process queue; the database brings the work back."""
    data = tmp_path / "farm"
    async with running_farm(farm_settings(data, backends, lease_s=2), port=free_port(), agents=0) as first:
        async with FarmClient(first.url, await local_admin_token(first.ctx, "tests")) as c:
            model = await c.upload_model(sample_blend)
            job = await c.create_job(
                model_id=model["id"], frames="1-2", chunk_size=1, resolution_percentage=25
            )
            task = (await c.tasks(job["id"]))[0]
            # an agent takes the first task and dies: no heartbeat, no result
            _, doomed = await create_agent_token(first.ctx, "doomed", "tests")
            async with c.http.post(
                f"{first.url}/api/agent/register", headers={"Authorization": f"Bearer {doomed}"}, json={}
            ) as r:
                assert r.status == 200
            async with c.http.post(
                f"{first.url}/api/agent/tasks/{task['id']}/claim",
                json={"agent": "doomed"},
                headers={"Authorization": f"Bearer {doomed}"},
            ) as r:
                assert r.status == 200
    async with running_farm(farm_settings(data, backends, lease_s=2), port=free_port(), agents=1) as second:
        async with FarmClient(second.url, await local_admin_token(second.ctx, "tests")) as c:
            final = await asyncio.wait_for(c.wait(job["id"], poll_s=0.2), 120)
            assert final["state"] == "completed" and final["frames_done"] == 2
            tasks = await c.tasks(job["id"])
            assert tasks[0]["attempts"] == 2 and tasks[1]["attempts"] == 1


def test_killing_the_farm_leaves_no_blender_behind(
    tmp_path: Path, sample_blend: Path, backends: dict
) -> None:
    port = free_port()
    data = tmp_path / "farm"
    proc = subprocess.Popen(
        [*RENDERFARM, "up", "--port", str(port), "--data-dir", str(data)],
        env=backend_env(backends),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        res = None
        for _ in range(100):
            res = _cli("submit", str(sample_blend), "--frames", "1", "--samples", "1000000", "--server", url)
            if res.returncode == 0:
                break
            time.sleep(0.2)
        assert res is not None and res.returncode == 0, res.stderr if res else ""
        deadline = time.monotonic() + 60
        while not blender_pids(data):
            assert time.monotonic() < deadline, "Blender never started"
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 3
    while blender_pids(data) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert blender_pids(data) == []


async def test_a_clean_stop_hands_the_running_task_back(
    tmp_path: Path, sample_blend: Path, backends: dict
) -> None:
    data = tmp_path / "farm"
    async with running_farm(farm_settings(data, backends), port=free_port(), agents=1) as farm:
        async with FarmClient(farm.url, await local_admin_token(farm.ctx, "tests")) as c:
            model = await c.upload_model(sample_blend)
            job = await c.create_job(model_id=model["id"], frames="1", samples=1_000_000)
            for _ in range(600):
                if blender_pids(data):
                    break
                await asyncio.sleep(0.1)
            assert blender_pids(data), "Blender never started"
    assert blender_pids(data) == []
    async with running_farm(farm_settings(data, backends), port=free_port(), agents=0) as farm:
        async with FarmClient(farm.url, await local_admin_token(farm.ctx, "tests")) as c:
            [task] = await c.tasks(job["id"])
            assert task["state"] == "queued" and task["attempts"] == 0
            assert "released" in task["message"]
            # and a second farm on the same data dir is refused
            with pytest.raises(ValueError, match="in use by another renderfarm"):
                async with running_farm(farm_settings(data, backends), port=free_port(), agents=0):
                    pass


@pytest.mark.up_args("--agents", "0")
def test_cli_download_of_an_unfinished_job_and_bad_destinations(
    farm_process: str, sample_blend: Path, tmp_path: Path
) -> None:
    res = _cli("submit", str(sample_blend), "--frames", "1-2", "--server", farm_process)
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip().splitlines()[-1]
    res = _cli("download", job_id, str(tmp_path / "early"), "--server", farm_process)
    assert res.returncode == 1 and "is queued: 0 of 2 frame(s)" in res.stderr
    res = _cli("download", job_id, "/proc/no/such/dir", "--server", farm_process)
    assert res.returncode == 2 and "cannot write frames into /proc/no/such/dir" in res.stderr
    assert "Traceback" not in res.stderr
    res = _cli("download", "nosuchjob", str(tmp_path / "none"), "--server", farm_process)
    assert res.returncode == 2 and not (tmp_path / "none").exists()
    for bad in ("127.0.0.1:3000", "ftp://x"):
        res = _cli("status", job_id, "--server", bad)
        assert res.returncode == 2 and "is not a server URL" in res.stderr
    res = _cli("cancel", f"../jobs/{job_id}", "--server", farm_process)
    assert res.returncode == 2 and "not found" in res.stderr  # ids cannot walk to other routes


def test_cli_download_never_replaces_other_files_silently(
    farm_process: str, sample_blend: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    res = _cli(
        "submit",
        str(sample_blend),
        "--frames",
        "1",
        "--resolution",
        "25",
        "--server",
        farm_process,
        "--download",
        str(out),
    )
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip().splitlines()[-1]
    frame = out / "frame_000001.png"
    rendered = frame.read_bytes()
    res = _cli("download", job_id, str(out), "--server", farm_process)
    assert res.returncode == 0 and frame.read_bytes() == rendered  # same content: a no-op
    frame.write_bytes(b"precious comp")
    res = _cli("download", job_id, str(out), "--server", farm_process)
    assert res.returncode == 2 and "--overwrite" in res.stderr
    assert frame.read_bytes() == b"precious comp"
    res = _cli("download", job_id, str(out), "--overwrite", "--server", farm_process)
    assert res.returncode == 0 and frame.read_bytes() == rendered
