"""A farm of separate processes on the production backends, and the faults it must survive.

One ``renderfarm server`` process and ``renderfarm agent`` processes render real jobs
(real Blender) through MariaDB, RabbitMQ, Redis and S3 (moto's server). Faults are
made with the real services and processes: RabbitMQ's connections closed, RabbitMQ
stopped, a Redis server killed, the server and an agent SIGKILLed.

The agents get no storage credentials (their environment has no ``AWS_*``): they
fetch inputs through presigned URLs and upload frames to the server. Each agent has an
agent token of its own, bound to its name, made by the first admin (logged in with the
password the server generated); the test's own calls and ``renderfarm submit`` send a
personal token of that admin.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from cli.farm import free_port
from tests.conftest import blender_pids
from tests.production import (
    PrivateRedis,
    admin_token,
    agent_token,
    backend_env,
    production_backends,
    rabbitmqctl,
)

pytestmark = [pytest.mark.blender, pytest.mark.slow]
RENDERFARM = str(Path(sys.executable).with_name("renderfarm"))
JWT_KEYS = "k1:" + os.urandom(24).hex()  # set on the server, as a farm of several servers would


def _http(
    method: str, url: str, body: Any = None, timeout: float = 10, token: str | None = None
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


class Farm:
    """A server process and agent processes sharing one set of backends, with their logs."""

    def __init__(self, tmp: Path, backends: dict[str, Any], **settings: Any) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = backend_env(
            backends,
            jwt_keys=JWT_KEYS,
            heartbeat_s=1,
            reconcile_s=2,
            **settings,
        )
        self.env["XDG_CONFIG_HOME"] = str(tmp / "config")  # no CLI credentials of the user's
        self.env.pop("RENDERFARM_TOKEN", None)
        self.token = ""
        """A personal token of the first admin (set once the server has started)."""
        self.server: subprocess.Popen[bytes] | None = None
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: list[Path] = []

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{name}.log"
        self.logs.append(log)
        with open(log, "ab") as fh:
            return subprocess.Popen([RENDERFARM, "-v", *args], env=env, stdout=fh, stderr=subprocess.STDOUT)

    def start_server(self, timeout_s: float = 60) -> None:
        """Start ``renderfarm server`` and wait until ``/healthz`` answers 200; the first time,
        log in as its first admin and keep a personal token in ``token``."""
        self.server = self._spawn(
            "server",
            ["server", "--port", str(self.port), "--data-dir", str(self.tmp / "server")],
            self.env,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.server.poll() is None, "server exited:\n" + self.tail()
            try:
                if _http("GET", self.url + "/healthz", timeout=2)[0] == 200:
                    if not self.token:
                        self.token = admin_token(self.url, self.tmp / "server")
                    return
            except OSError:
                pass
            time.sleep(0.2)
        pytest.fail("server did not answer /healthz:\n" + self.tail())

    def kill_server(self) -> None:
        """SIGKILL the server (no clean shutdown)."""
        assert self.server is not None
        self.server.send_signal(signal.SIGKILL)
        self.server.wait(10)
        self.server = None

    def start_agent(self, name: str, *extra: str) -> None:
        """Start ``renderfarm agent`` with an agent token of its own (bound to ``name``) and no
        storage credentials in its environment; ``extra``: more options of the command."""
        env = {
            k: v
            for k, v in self.env.items()
            if not k.startswith("AWS_") and k not in ("RENDERFARM_STORAGE_URL", "RENDERFARM_JWT_KEYS")
        }
        self.agents[name] = self._spawn(
            name,
            [
                "agent",
                "--server",
                self.url,
                "--token",
                agent_token(self.url, self.token, name),
                "--name",
                name,
                "--work-dir",
                str(self.tmp / name),
                *extra,
            ],
            env,
        )

    def wait_agents_online(self, n: int, timeout_s: float = 60) -> list[dict[str, Any]]:
        """Wait until ``n`` agents are online; returns them."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in self.agents.items():
                assert proc.poll() is None, f"agent {name} exited:\n" + self.tail()
            status, body = _http("GET", self.url + "/api/agents", token=self.token)
            online = [a for a in body.get("agents", [])] if status == 200 else []
            online = [a for a in online if a["online"]]
            if len(online) >= n:
                return online
            time.sleep(0.3)
        pytest.fail(f"{n} agents never came online:\n" + self.tail())

    def submit(self, blend: Path, *args: str) -> str:
        """``renderfarm submit``; returns the job id."""
        res = subprocess.run(
            [RENDERFARM, "submit", str(blend), "--server", self.url, *args],
            capture_output=True,
            text=True,
            timeout=300,
            env={**self.env, "RENDERFARM_TOKEN": self.token},
        )
        assert res.returncode == 0, res.stderr + "\n" + self.tail()
        return res.stdout.strip().splitlines()[-1]

    def job(self, job_id: str) -> dict[str, Any]:
        """``GET /api/jobs/{id}`` (asserting 200)."""
        status, body = _http("GET", f"{self.url}/api/jobs/{job_id}", token=self.token)
        assert status == 200, body
        return body

    def tasks(self, job_id: str) -> list[dict[str, Any]]:
        """The job's tasks from the database."""
        status, body = _http("GET", f"{self.url}/api/jobs/{job_id}/tasks", token=self.token)
        assert status == 200, body
        return body["tasks"]

    def wait(self, job_id: str, timeout_s: float = 240) -> dict[str, Any]:
        """Wait until the job finishes; returns its summary."""
        deadline = time.monotonic() + timeout_s
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, AssertionError):
                job = self.job(job_id)
                if job["state"] in ("completed", "failed", "canceled"):
                    return job
            time.sleep(0.5)
        pytest.fail(f"job {job_id} did not finish: {job}\n" + self.tail())

    def wait_running(self, job_id: str, timeout_s: float = 120) -> dict[str, Any]:
        """Wait until a task of the job is rendering a frame; returns that task."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for t in self.tasks(job_id):
                if t["state"] == "running" and t["current_frame"] is not None:
                    return t
            time.sleep(0.2)
        pytest.fail("no task started rendering:\n" + self.tail())

    def frames(self, job_id: str) -> list[dict[str, Any]]:
        """The stored frames of the job."""
        status, body = _http("GET", f"{self.url}/api/jobs/{job_id}/outputs", token=self.token)
        assert status == 200, body
        return body["frames"]

    def tail(self, lines: int = 25) -> str:
        """The last lines of every process log (for failure messages)."""
        out = []
        for log in self.logs:
            text = log.read_text(errors="replace").splitlines() if log.exists() else []
            out.append(f"--- {log.name}\n" + "\n".join(text[-lines:]))
        return "\n".join(out)

    def stop(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL)."""
        procs = [p for p in [self.server, *self.agents.values()] if p is not None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A redis-server of this test's own (a fault test may kill it)."""
    r = PrivateRedis(tmp_path / "redis")
    r.start()
    yield r
    r.stop()


@pytest.fixture
def farm(tmp_path: Path, request: pytest.FixtureRequest, redis_server: PrivateRedis) -> Iterator[Farm]:
    """A server and two agents (``agent-a``, ``agent-b``) on fresh production backends."""
    marker = request.node.get_closest_marker("farm_settings")
    settings = dict(marker.kwargs) if marker else {}
    with production_backends(request, redis_server) as backends:
        f = Farm(tmp_path, backends, **settings)
        try:
            f.start_server()
            f.start_agent("agent-a")
            f.start_agent("agent-b")
            f.wait_agents_online(2)
            yield f
        finally:
            f.stop()


def _check_frames(farm: Farm, job_id: str, frames: list[int]) -> None:
    """Every frame stored exactly once, and each a real image."""
    stored = farm.frames(job_id)
    assert sorted(f["frame"] for f in stored) == frames
    assert len({f["sha256"] for f in stored}) == len(frames)


def test_a_server_and_two_agent_processes_render_a_job(
    farm: Farm, sample_blend: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    job_id = farm.submit(sample_blend, "--frames", "1-4", "--chunk", "1", "--wait", "--download", str(out))
    job = farm.job(job_id)
    assert job["state"] == "completed" and job["frames_done"] == 4
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == [f"frame_00000{i}.png" for i in range(1, 5)]
    assert len({p.read_bytes() for p in pngs}) == 4
    with Image.open(pngs[0]) as im:
        assert im.size == (320, 240)
    tasks = farm.tasks(job_id)
    assert {t["agent"] for t in tasks} == {"agent-a", "agent-b"}, "both agent processes rendered"
    assert all(t["attempts"] == 1 for t in tasks)
    # status reads come from Redis; the task status route serves the cached entry
    status, body = _http("GET", f"{farm.url}/api/tasks/{tasks[0]['id']}/status", token=farm.token)
    assert status == 200 and body["state"] == "completed"
    assert _http("GET", f"{farm.url}/api/tasks/{tasks[0]['id']}/status")[0] == 401
    status, metrics = _http("GET", f"{farm.url}/metrics")
    assert status == 200 and "renderfarm_agents_online" in metrics


def test_rabbitmq_connections_closed_mid_job(farm: Farm, sample_blend: Path) -> None:
    job_id = farm.submit(sample_blend, "--frames", "1-6", "--chunk", "1")
    farm.wait_running(job_id)
    rabbitmqctl("close_all_connections", "renderfarm test: connections closed mid-job")
    job = farm.wait(job_id)
    assert job["state"] == "completed", job["message"]
    _check_frames(farm, job_id, list(range(1, 7)))


def test_redis_stopped_mid_job_then_back(farm: Farm, sample_blend: Path, redis_server: PrivateRedis) -> None:
    job_id = farm.submit(sample_blend, "--frames", "1-4", "--chunk", "1")
    task = farm.wait_running(job_id)
    redis_server.stop()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 4:  # status calls keep answering while Redis is gone
        assert _http("GET", f"{farm.url}/api/jobs/{job_id}", token=farm.token)[0] == 200
        assert _http("GET", f"{farm.url}/api/tasks/{task['id']}/status", token=farm.token)[0] == 200
        time.sleep(0.2)
    status, health = _http("GET", f"{farm.url}/healthz")
    assert status == 200 and health["status"] == "degraded" and health["cache"].startswith("degraded")
    assert "renderfarm_cache_degraded 1.0" in _http("GET", f"{farm.url}/metrics")[1]
    redis_server.start()
    job = farm.wait(job_id)
    assert job["state"] == "completed", job["message"]
    import redis as redis_py

    r = redis_py.Redis.from_url(redis_server.url)
    deadline = time.monotonic() + 20
    cached = None
    while time.monotonic() < deadline:  # the reconciler rewrites what the cache missed
        raw = r.get(f"job:{job_id}")
        cached = json.loads(raw) if raw else None
        if cached and cached["state"] == "completed" and cached["frames_done"] == 4:
            break
        time.sleep(0.5)
    assert cached is not None and cached["state"] == "completed" and cached["frames_done"] == 4, cached
    assert _http("GET", f"{farm.url}/healthz")[1]["status"] == "ok"
    _check_frames(farm, job_id, [1, 2, 3, 4])


def test_server_sigkilled_mid_job_and_started_again(farm: Farm, sample_blend: Path) -> None:
    job_id = farm.submit(sample_blend, "--frames", "1-6", "--chunk", "1")
    farm.wait_running(job_id)
    farm.kill_server()
    time.sleep(2)
    farm.start_server()
    job = farm.wait(job_id)
    assert job["state"] == "completed", job["message"]
    tasks = farm.tasks(job_id)
    assert [t["attempts"] for t in tasks] == [1] * 6, "no task lost or run twice"
    _check_frames(farm, job_id, list(range(1, 7)))


@pytest.mark.farm_settings(lease_s=6)
def test_agent_sigkilled_mid_frame_task_completes_on_the_other(farm: Farm, sample_blend: Path) -> None:
    job_id = farm.submit(sample_blend, "--frames", "1-4", "--chunk", "4")
    task = farm.wait_running(job_id)
    victim = task["agent"]
    other = "agent-b" if victim == "agent-a" else "agent-a"
    farm.agents[victim].send_signal(signal.SIGKILL)
    farm.agents[victim].wait(10)
    deadline = time.monotonic() + 5
    while blender_pids(farm.tmp / victim) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert blender_pids(farm.tmp / victim) == [], "the killed agent's Blender died with it"
    t_kill = time.monotonic()
    job = farm.wait(job_id)
    assert job["state"] == "completed", job["message"]
    [task] = farm.tasks(job_id)
    assert task["agent"] == other and task["attempts"] == 2
    assert time.monotonic() - t_kill >= 3, "requeued only when the lease ended"
    _check_frames(farm, job_id, [1, 2, 3, 4])


def test_rabbitmq_down_at_submit_job_waits_and_completes(farm: Farm, sample_blend: Path) -> None:
    rabbitmqctl("stop_app")
    try:
        job_id = farm.submit(sample_blend, "--frames", "1-2", "--chunk", "1")
        time.sleep(3)
        job = farm.job(job_id)
        assert job["state"] == "queued" and job["frames_done"] == 0
        status, health = _http("GET", f"{farm.url}/healthz")
        assert status == 200 and health["broker"] != "ok"
    finally:
        rabbitmqctl("start_app")
    job = farm.wait(job_id)
    assert job["state"] == "completed", job["message"]
    _check_frames(farm, job_id, [1, 2])
