"""Shared fixtures: the corpus location, the generated sample scene, and an in-process farm."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cli.client import FarmClient
from cli.farm import RunningFarm, free_port, make_sample_scene, running_farm
from server.auth.service import create_agent_token, local_admin_token
from server.config import Settings
from tests.s3server import s3_endpoint  # noqa: F401  (a session fixture: moto's S3 server, started on demand)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL = SHARED / "blendfiles" / "real"


@pytest.fixture(scope="session", autouse=True)
def _private_cli_config(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the CLI's credentials (``renderfarm up`` stores a token) out of the real home folder,
    for this process and every process a test starts."""
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("xdg-config"))
    os.environ.pop("RENDERFARM_TOKEN", None)


@pytest.fixture(scope="session")
def corpus() -> Path:
    """The real-world .blend files, used in place (never copied into the repo)."""
    if not REAL.is_dir():
        pytest.fail(f"corpus not found at {REAL}: the repo must sit beside shared/")
    return REAL


@pytest.fixture(scope="session")
def sample_blend(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled demo scene, generated once per test session by the project's own generator."""
    path = tmp_path_factory.mktemp("sample") / "sample_scene.blend"
    return asyncio.run(make_sample_scene(path))


class Farm:
    """A running in-process farm and a client for it."""

    def __init__(self, running: RunningFarm, client: FarmClient, token: str) -> None:
        self.url = running.url
        self.ctx = running.ctx
        self.agents = running.agents
        """The farm's local node agents (``NodeAgent``)."""
        self.client = client
        self.settings = running.ctx.settings
        self.token = token
        """A personal token of the first admin (a manager of project ``default``); ``client`` sends it."""

    @property
    def auth(self) -> dict[str, str]:
        """The admin's ``Authorization`` header, for raw HTTP calls."""
        return {"Authorization": f"Bearer {self.token}"}

    async def agent_token(self, name: str, register: bool = False, pool: str = "default") -> str:
        """A new agent token bound to agent ``name``; with ``register``, the agent also registers
        (in ``pool``), as it must before it may claim a task."""
        _, token = await create_agent_token(self.ctx, name, "tests")
        if register:
            async with self.client.http.post(
                f"{self.url}/api/agent/register",
                json={"pool": pool},
                headers={"Authorization": f"Bearer {token}"},
            ) as r:
                assert r.status == 200, await r.text()
        return token


def farm_settings(data_dir: Path, backends: dict[str, Any] | None = None, **kw: object) -> Settings:
    """Settings for tests: quick heartbeats and lease checks, on ``backends`` (default: embedded)."""
    kw.setdefault("heartbeat_s", 0.5)
    return Settings(data_dir=data_dir, **(backends or {}), **kw)  # type: ignore[arg-type]


@pytest.fixture
def backends() -> dict[str, Any]:
    """The backend URLs of the farm fixtures: the embedded defaults. Test modules that run on
    both the embedded and the production backends override this fixture (see ``tests/test_e2e.py``)."""
    return {}


@pytest.fixture
async def farm(
    tmp_path: Path, request: pytest.FixtureRequest, backends: dict[str, Any]
) -> AsyncIterator[Farm]:
    """A farm with one local agent (``@pytest.mark.agents(0)`` for none) in ``tmp_path/farm``."""
    marker = request.node.get_closest_marker("agents")
    async with farm_on(tmp_path, backends, agents=marker.args[0] if marker else 1) as running:
        yield running


@contextlib.asynccontextmanager
async def farm_on(
    tmp_path: Path, backends: dict[str, Any] | None = None, agents: int = 0, **settings: Any
) -> AsyncIterator[Farm]:
    """An in-process farm in ``tmp_path/farm`` on ``backends`` (default: embedded) with ``agents``
    local agents and ``settings`` fields set; a client logged in as its first admin."""
    config = farm_settings(tmp_path / "farm", backends, **settings)
    stack = contextlib.AsyncExitStack()
    running = await stack.enter_async_context(running_farm(config, port=free_port(), agents=agents))
    token = await local_admin_token(running.ctx, "tests")
    client = await stack.enter_async_context(FarmClient(running.url, token))
    try:
        yield Farm(running, client, token)
    finally:
        await stop_within(stack, 60)


async def stop_within(stack: contextlib.AsyncExitStack, seconds: float) -> None:
    """Close ``stack``; if that takes longer than ``seconds``, print every pending asyncio task's
    stack (what the shutdown waits on) and fail, rather than hang the test session."""
    closing = asyncio.ensure_future(stack.aclose())
    done, _ = await asyncio.wait({closing}, timeout=seconds)
    if closing in done:
        closing.result()
        return
    for task in asyncio.all_tasks():
        print(f"--- pending task {task.get_name()}:", file=sys.stderr)
        task.print_stack(file=sys.stderr)
    closing.cancel()
    pytest.fail(f"the farm did not stop within {seconds:g} s (pending tasks printed above)")


def blender_pids(under: Path, marker: str = "render_task.py") -> list[int]:
    """Pids of live processes running ``marker`` with a working directory inside ``under`` (no zombies)."""
    pids = []
    root = str(under.resolve())
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cwd = os.readlink(d / "cwd")
        except OSError:
            continue
        if marker.encode() in cmd and state != "Z" and cwd.startswith(root):
            pids.append(int(d.name))
    return pids
