"""Agent registration and heartbeats over the API, the agent list, and the `renderfarm server` /
`renderfarm agent` commands refusing unusable settings."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import func, select, update

from cli.farm import free_port
from node_agent.agent import NodeAgent, ServerError
from node_agent.executor.local import LocalExecutor
from server.app import create_app
from server.auth.service import create_agent_token, local_admin_token
from server.config import Settings
from server.context import FarmContext
from server.persistence.tables import Agent, utcnow
from tests.conftest import farm_settings
from tests.production import admin_token, agent_token

RENDERFARM = str(Path(sys.executable).with_name("renderfarm"))  # the venv's console script
CAPS = {
    "cpu_cores": 8,
    "memory_bytes": 1 << 34,
    "gpus": [],
    "backends": ["CPU"],
    "blender": "5.0.1",
    "tags": ["a"],
}


class Api:
    """The API app of a farm (no scheduler loops, no agents) and a test client for it."""

    def __init__(self, ctx: FarmContext, client: TestClient, admin: str) -> None:
        self.ctx = ctx
        self.client = client
        self.admin = admin
        """A personal token of the first admin (lists the agents)."""

    async def agent_token(self, name: str) -> str:
        """A new agent token bound to agent ``name``."""
        _, token = await create_agent_token(self.ctx, name, "tests")
        return token


@contextlib.asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[Api]:
    """The API app (no scheduler loops, no agents) on a loopback port."""
    ctx = FarmContext.from_settings(settings)
    async with TestClient(TestServer(create_app(ctx, run_scheduler=False))) as client:
        yield Api(ctx, client, await local_admin_token(ctx, "tests"))


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with served(farm_settings(tmp_path / "farm")) as served_api:
        yield served_api


async def _post(client: TestClient, path: str, token: str | None, body: dict[str, Any]) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    r = await client.post(path, json=body, headers=headers)
    return r.status, await r.json()


async def _agents(api: Api) -> dict[str, dict[str, Any]]:
    r = await api.client.get("/api/agents", headers={"Authorization": f"Bearer {api.admin}"})
    assert r.status == 200
    return {a["name"]: a for a in (await r.json())["agents"]}


async def _seen_ago(ctx: FarmContext, name: str, seconds: float) -> None:
    async with ctx.db.session() as s:
        await s.execute(
            update(Agent).where(Agent.name == name).values(last_seen_at=utcnow() - timedelta(seconds=seconds))
        )
        await s.commit()


# ---------------------------------------------------------------- API


async def test_register_then_listed_online_with_capabilities(api: Api) -> None:
    ctx, client = api.ctx, api.client
    status, reg = await _post(
        client,
        "/api/agent/register",
        await api.agent_token("render-01.studio"),
        {"name": "render-01.studio", "pool": "gpu", "capabilities": CAPS, "version": "0.3"},
    )
    assert status == 200, reg
    assert reg["queue"] == "renderfarm.tasks.gpu"
    assert reg["broker_url"] is None  # memory:// cannot be reached from another process
    assert reg["heartbeat_s"] == ctx.settings.heartbeat_s and reg["lease_s"] == ctx.settings.lease_s
    assert reg["agent"]["online"] is True
    agents = await _agents(api)
    assert list(agents) == ["render-01.studio"]
    a = agents["render-01.studio"]
    assert a["online"] is True and a["pool"] == "gpu" and a["version"] == "0.3"
    assert a["capabilities"] == CAPS
    assert a["id"] == reg["agent"]["id"] and a["current_task_id"] is None
    assert a["last_seen_at"].endswith("Z")


async def test_wrong_or_missing_token_is_401(api: Api) -> None:
    client = api.client
    body = {"name": "n1", "pool": "default"}
    good = await api.agent_token("n1")
    for token in (None, "wrong", good + "x", "rfa_" + "0" * 43):
        status, err = await _post(client, "/api/agent/register", token, body)
        assert status == 401, token
        assert "token" in err["error"]["message"]
        status, _ = await _post(client, "/api/agent/heartbeat", token, {"name": "n1"})
        assert status == 401
    assert await _agents(api) == {}


async def test_a_revoked_agent_token_is_401(api: Api) -> None:
    client = api.client
    info, token = await create_agent_token(api.ctx, "n1", "tests")
    status, _ = await _post(client, "/api/agent/register", token, {"name": "n1"})
    assert status == 200
    r = await client.delete(f"/api/tokens/{info['id']}", headers={"Authorization": f"Bearer {api.admin}"})
    assert r.status == 200 and (await r.json())["revoked_at"] is not None
    for path in ("/api/agent/register", "/api/agent/heartbeat"):
        status, err = await _post(client, path, token, {"name": "n1"})
        assert status == 401, path
        assert "revoked" in err["error"]["message"]


async def test_an_agent_registers_only_under_its_tokens_name(api: Api) -> None:
    client = api.client
    token = await api.agent_token("n1")
    status, err = await _post(client, "/api/agent/register", token, {"name": "n2"})
    assert status == 403 and err["error"]["field"] == "name"
    assert "'n1'" in err["error"]["message"] and "'n2'" in err["error"]["message"]
    status, err = await _post(client, "/api/agent/heartbeat", token, {"name": "n2"})
    assert status == 403 and err["error"]["field"] == "name"
    assert await _agents(api) == {}
    status, reg = await _post(client, "/api/agent/register", token, {"pool": "gpu"})  # no name: the token's
    assert status == 200 and reg["agent"]["name"] == "n1"
    status, beat = await _post(client, "/api/agent/heartbeat", token, {})
    assert status == 200 and beat["name"] == "n1"
    assert list(await _agents(api)) == ["n1"]


async def test_a_user_token_cannot_call_agent_routes(api: Api) -> None:
    status, err = await _post(api.client, "/api/agent/register", api.admin, {"name": "n1"})
    assert status == 403 and "agent token" in err["error"]["message"]
    status, _ = await _post(api.client, "/api/agent/heartbeat", api.admin, {"name": "n1"})
    assert status == 403
    assert await _agents(api) == {}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "bad name!", "pool": "default"}, "name"),
        ({"name": "", "pool": "default"}, "name"),
        ({"name": "-leading-dash"}, "name"),
        ({"name": "ok", "pool": "GPU Pool"}, "pool"),
        ({"name": "ok", "pool": "x" * 65}, "pool"),
        ({"name": "ok", "capabilities": {"cpu_cores": -1}}, "capabilities.cpu_cores"),
        ({"name": "ok", "colour": "red"}, "colour"),
    ],
)
async def test_invalid_registration_is_400_naming_the_field(
    api: Api, body: dict[str, Any], field: str
) -> None:
    status, err = await _post(api.client, "/api/agent/register", await api.agent_token("ok"), body)
    assert status == 400, err
    assert err["error"]["field"] == field
    assert field in err["error"]["message"]
    assert await _agents(api) == {}


async def test_heartbeats_unknown_agent_stopping_and_staleness(api: Api) -> None:
    ctx, client = api.ctx, api.client
    status, err = await _post(
        client, "/api/agent/heartbeat", await api.agent_token("ghost"), {"name": "ghost"}
    )
    assert status == 404 and err["error"]["field"] == "name" and "ghost" in err["error"]["message"]

    n1, n2 = await api.agent_token("n1"), await api.agent_token("n2")
    await _post(client, "/api/agent/register", n1, {"name": "n1"})
    await _post(client, "/api/agent/register", n2, {"name": "n2"})
    status, beat = await _post(client, "/api/agent/heartbeat", n1, {"name": "n1"})
    assert status == 200 and beat["online"] is True and beat["name"] == "n1"

    status, beat = await _post(client, "/api/agent/heartbeat", n1, {"name": "n1", "stopping": True})
    assert status == 200 and beat["online"] is False
    agents = await _agents(api)
    assert agents["n1"]["online"] is False and agents["n2"]["online"] is True
    r = await client.get("/api/agents", headers={"Authorization": f"Bearer {api.admin}"})
    assert [a["name"] for a in (await r.json())["agents"]] == ["n2", "n1"]  # online ones first
    status, beat = await _post(client, "/api/agent/heartbeat", n1, {"name": "n1"})
    assert beat["online"] is True  # a heartbeat brings it back

    # online while the last heartbeat is younger than max(3 x heartbeat_s, 15) s
    assert ctx.settings.heartbeat_s * 3 < 15
    await _seen_ago(ctx, "n1", 10)
    await _seen_ago(ctx, "n2", 16)
    agents = await _agents(api)
    assert agents["n1"]["online"] is True and agents["n2"]["online"] is False
    ctx.settings.heartbeat_s = 10.0  # now 30 s
    await _seen_ago(ctx, "n1", 31)
    await _seen_ago(ctx, "n2", 20)
    agents = await _agents(api)
    assert agents["n1"]["online"] is False and agents["n2"]["online"] is True


async def test_reregistering_reuses_the_row(api: Api) -> None:
    ctx, client = api.ctx, api.client
    token = await api.agent_token("n1")
    _, first = await _post(
        client, "/api/agent/register", token, {"name": "n1", "capabilities": {"cpu_cores": 2}}
    )
    await _post(client, "/api/agent/heartbeat", token, {"name": "n1", "stopping": True})
    await asyncio.sleep(0.01)
    status, again = await _post(
        client, "/api/agent/register", token, {"name": "n1", "pool": "gpu", "capabilities": {"cpu_cores": 16}}
    )
    assert status == 200
    assert again["agent"]["id"] == first["agent"]["id"]
    assert again["agent"]["registered_at"] == first["agent"]["registered_at"]
    assert again["agent"]["last_seen_at"] > first["agent"]["last_seen_at"]
    assert again["agent"]["online"] is True and again["agent"]["pool"] == "gpu"
    assert again["agent"]["capabilities"]["cpu_cores"] == 16
    async with ctx.db.session() as s:
        assert await s.scalar(select(func.count()).select_from(Agent)) == 1


async def test_two_live_processes_cannot_share_a_name(api: Api) -> None:
    ctx, client = api.ctx, api.client
    token = await api.agent_token("dup")
    other = await api.agent_token("dup")  # a second token bound to the same name, as a second machine's
    status, _ = await _post(client, "/api/agent/register", token, {"name": "dup", "instance": "aaa"})
    assert status == 200
    status, _ = await _post(client, "/api/agent/register", token, {"name": "dup", "instance": "aaa"})
    assert status == 200, "the same process may register again"
    for tok in (token, other):
        status, body = await _post(client, "/api/agent/register", tok, {"name": "dup", "instance": "bbb"})
        assert status == 409 and body["error"]["field"] == "name"
        assert "already online" in body["error"]["message"]
    status, _ = await _post(
        client, "/api/agent/register", token, {"name": "dup", "instance": "bbb", "replace": True}
    )
    assert status == 200, "an in-process agent of the same farm takes its name back"
    await _seen_ago(ctx, "dup", 3600)  # the holder went silent: the name is free
    status, _ = await _post(client, "/api/agent/register", other, {"name": "dup", "instance": "ccc"})
    assert status == 200
    await _post(client, "/api/agent/heartbeat", other, {"name": "dup", "stopping": True})
    status, _ = await _post(client, "/api/agent/register", token, {"name": "dup", "instance": "ddd"})
    assert status == 200, "a clean stop frees the name at once"


async def test_registration_names_the_networked_broker(tmp_path: Path) -> None:
    amqp = "amqp://farm:s3cret@rabbit.internal:5672/render"
    settings = farm_settings(tmp_path / "farm", broker_url=amqp)
    async with served(settings) as api:  # nothing connects to the broker here
        ctx, client = api.ctx, api.client
        token = await api.agent_token("n1")
        status, reg = await _post(client, "/api/agent/register", token, {"name": "n1"})
        assert status == 200 and reg["broker_url"] == amqp and reg["queue"] == "renderfarm.tasks"
        ctx.settings.agent_broker_url = "amqp://agent:other@10.0.0.5:5672/render"
        status, reg = await _post(client, "/api/agent/register", token, {"name": "n1"})
        assert reg["broker_url"] == "amqp://agent:other@10.0.0.5:5672/render"
        r = await client.get("/api/agents", headers={"Authorization": f"Bearer {api.admin}"})
        assert r.status == 200
        assert "s3cret" not in await r.text()  # the list never shows the broker's credentials


async def test_node_agent_registers_heartbeats_and_goes_offline_when_stopped(
    api: Api, tmp_path: Path
) -> None:
    ctx, client = api.ctx, api.client
    url = str(client.make_url("")).rstrip("/")
    agent = NodeAgent(
        url,
        await api.agent_token("node-7"),
        ctx.broker,
        tmp_path / "agent",
        LocalExecutor(None),
        capabilities=CAPS,
    )  # no name: it learns its token's
    runner = asyncio.create_task(agent.run())
    try:
        for _ in range(100):  # online in the database, and the agent has read the server's answer
            if (await _agents(api)).get("node-7", {}).get("online") and agent.registration:
                break
            await asyncio.sleep(0.05)
        a = (await _agents(api))["node-7"]
        assert a["online"] is True and a["capabilities"]["cpu_cores"] == 8
        assert agent.registration["queue"] == "renderfarm.tasks"
        assert agent.name == "node-7"
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
    assert (await _agents(api))["node-7"]["online"] is False

    bad = NodeAgent(url, "wrong", ctx.broker, tmp_path / "bad", LocalExecutor(None), name="node-8")
    with pytest.raises(ServerError) as info:
        await asyncio.wait_for(bad.run(), 10)  # a refusal is final: no retrying
    assert info.value.status == 401
    other = NodeAgent(
        url, await api.agent_token("node-9"), ctx.broker, tmp_path / "o", LocalExecutor(None), name="node-8"
    )
    with pytest.raises(ServerError) as info:
        await asyncio.wait_for(other.run(), 10)  # another agent's token: refused, final too
    assert info.value.status == 403
    assert "node-8" not in await _agents(api)


# ---------------------------------------------------------------- commands


def _cli(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [RENDERFARM, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def test_server_with_a_bad_database_url_exits_2_naming_it(tmp_path: Path) -> None:
    res = _cli(
        "server", "--data-dir", str(tmp_path / "d"), "--port", str(free_port()), "--database-url", "nope://x"
    )
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "nope://x" in out and "Traceback" not in out


def test_server_with_an_unreachable_broker_exits_2_with_the_password_hidden(tmp_path: Path) -> None:
    res = _cli(
        "server",
        "--data-dir",
        str(tmp_path / "d"),
        "--port",
        str(free_port()),
        "--broker-url",
        "amqp://guest:secret@127.0.0.1:1/",
    )
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "broker" in out and "127.0.0.1:1" in out and "guest:***@" in out
    assert "secret" not in out and "Traceback" not in out


def test_server_with_a_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "farm.toml"
    cfg.write_text('lease_s = 30\nbrokr_url = "amqp://x"\n')
    res = _cli("server", "--config", str(cfg), "--data-dir", str(tmp_path / "d"), "--port", str(free_port()))
    assert res.returncode == 2 and "brokr_url" in res.stdout + res.stderr


@pytest.fixture
def farm_process(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """`renderfarm up --agents 0` (memory broker) as a process, and an agent token for ``far-1``
    created by its admin (``POST /api/agent-tokens``)."""
    port = free_port()
    data_dir = tmp_path / "farm"
    proc = subprocess.Popen(
        [RENDERFARM, "up", "--agents", "0", "--port", str(port), "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")},  # its CLI login: not the user's
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail("renderfarm up exited: " + (proc.stdout.read() if proc.stdout else ""))
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("renderfarm up did not answer within 60 s")
                time.sleep(0.2)
        yield url, agent_token(url, admin_token(url, data_dir), "far-1")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_agent_refuses_a_server_with_the_in_process_broker(
    farm_process: tuple[str, str], tmp_path: Path
) -> None:
    url, token = farm_process
    common = ["--server", url, "--name", "far-1", "--work-dir", str(tmp_path / "w")]
    res = _cli("agent", *common, "--token", token)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "in-process broker" in out and "--broker-url" in out and "Traceback" not in out

    res = _cli("agent", *common, "--token", "wrong")
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "cannot register" in out and "token" in out and "Traceback" not in out

    res = _cli(
        "agent", "--server", url, "--name", "far-2", "--work-dir", str(tmp_path / "w"), "--token", token
    )
    out = res.stdout + res.stderr
    assert res.returncode == 2, out  # a name other than its token's
    assert "far-1" in out and "far-2" in out and "Traceback" not in out


@pytest.mark.agents(0)
async def test_an_agent_that_cannot_start_after_registering_signs_off(farm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The in-process farm's broker cannot be reached from another process: the agent registers,
    fails, and must not stay listed online (nor be routed tasks)."""
    from rich.console import Console

    from cli.agent import run_agent

    token = await farm.agent_token("ghost")
    with pytest.raises(ValueError, match="in-process broker"):
        await run_agent(
            farm.url,
            token,
            None,
            None,
            "default",
            [],
            tmp_path / "ghost",
            None,
            Console(quiet=True),
            backends=["OPTIX"],
        )
    agents = await farm.client.agents()
    [ghost] = [a for a in agents if a["name"] == "ghost"]
    assert ghost["online"] is False, ghost
