"""Simulated node agents for routing and failure-policy tests: real HTTP calls to a farm.

A :class:`SimAgent` registers through ``POST /api/agent/register`` with the capabilities
it is given (GPU backends are advertised, not detected: no GPU is needed) and claims,
heartbeats, uploads and reports through the agent API, exactly as ``node_agent`` does,
minus Blender. :func:`take` reads task messages from a route's broker queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import select

from server.persistence.tables import Model, Task
from tests.conftest import Farm
from tests.production import production_backends


@pytest.fixture(params=["embedded", "production"])
def both_backends(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """Embedded backends, then MariaDB + RabbitMQ + Redis + S3 (a fresh database and vhost)."""
    if request.param == "embedded":
        yield {}
        return
    with production_backends(request) as urls:
        yield urls


def png() -> bytes:
    """A small real PNG (the server checks the signature)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


class SimAgent:
    """One agent (its own agent token) talking to ``farm`` over HTTP."""

    def __init__(self, farm: Farm, name: str, token: str) -> None:
        self.farm, self.name, self.token = farm, name, token
        self.registration: dict[str, Any] = {}

    @classmethod
    async def start(
        cls, farm: Farm, name: str, backends: list[str] | None = None, pool: str = "default"
    ) -> SimAgent:
        """A new agent token for ``name``, registered in ``pool`` offering ``backends``
        (simulated GPUs: one ``{"name": "Simulated <backend>"}`` per backend)."""
        token = await farm.agent_token(name)
        agent = cls(farm, name, token)
        caps = {
            "cpu_cores": 4,
            "backends": backends or [],
            "gpus": [{"name": f"Simulated {b}", "backends": [b]} for b in backends or []],
        }
        status, body = await agent.call("POST", "/api/agent/register", {"pool": pool, "capabilities": caps})
        assert status == 200, body
        agent.registration = body
        return agent

    @property
    def queue(self) -> str:
        """The broker queue the server told it to consume."""
        return self.registration["queue"]

    async def call(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        """``(status, JSON body)`` of one request with this agent's token."""
        headers = {"Authorization": f"Bearer {self.token}"}
        if body is not None:
            kw["json"] = body
        async with self.farm.client.http.request(method, self.farm.url + path, headers=headers, **kw) as r:
            return r.status, await r.json(content_type=None)

    async def beat(self) -> None:
        """``POST /api/agent/heartbeat``: still online."""
        status, body = await self.call("POST", "/api/agent/heartbeat", {})
        assert status == 200, body

    async def claim(self, task_id: str) -> tuple[int, Any]:
        return await self.call("POST", f"/api/agent/tasks/{task_id}/claim", {})

    async def heartbeat(self, task_id: str, lease_id: str) -> tuple[int, Any]:
        return await self.call("POST", f"/api/agent/tasks/{task_id}/heartbeat", {"lease_id": lease_id})

    async def fail(
        self, task_id: str, lease_id: str, kind: str = "crashed", message: str = "Blender crashed"
    ) -> dict[str, Any]:
        """Report a failed attempt; returns the server's answer (``state`` queued or failed)."""
        status, body = await self.call(
            "POST",
            f"/api/agent/tasks/{task_id}/result",
            {"lease_id": lease_id, "status": "failed", "kind": kind, "message": message},
        )
        assert status == 200, body
        return body

    async def complete(
        self, spec: dict[str, Any], device: str = "CPU", fallback: bool = False
    ) -> dict[str, Any]:
        """Upload every frame of the claimed ``spec`` and report it completed."""
        for frame in spec["frames"]:
            status, body = await self.call(
                "PUT",
                f"/api/agent/tasks/{spec['task_id']}/frames/{frame}?ext=.png&lease_id={spec['lease_id']}",
                data=png(),
            )
            assert status in (200, 201), body
        status, body = await self.call(
            "POST",
            f"/api/agent/tasks/{spec['task_id']}/result",
            {"lease_id": spec["lease_id"], "status": "completed", "device": device, "fallback": fallback},
        )
        assert status == 200, body
        return body


async def model_id(farm: Farm) -> str:
    """A model row written straight into the database (nothing renders in these tests)."""
    async with farm.ctx.db.session() as s:
        m = Model(
            filename="a.blend", kind="blend", main="a.blend", sha256="0" * 64, size_bytes=1, storage_key="k"
        )
        s.add(m)
        await s.commit()
        return m.id


async def submit(farm: Farm, tasks: int, **fields: Any) -> dict[str, Any]:
    """A job of ``tasks`` one-frame tasks through ``POST /api/jobs``; ``fields`` are more of its body."""
    return await farm.client.create_job(
        model_id=await model_id(farm), frames=f"1-{tasks}", chunk_size=1, **fields
    )


async def take(farm: Farm, queue: str, n: int, timeout_s: float = 10.0) -> list[str]:
    """The task ids of the next ``n`` messages of ``queue`` (acknowledged), in delivery order.

    Raises:
        AssertionError: fewer arrived within ``timeout_s`` seconds.
    """
    got: list[str] = []

    async def read() -> None:
        async for delivery in farm.ctx.broker.consume(queue, prefetch=1):
            got.append(json.loads(delivery.body)["task_id"])
            await delivery.ack()
            if len(got) >= n:
                return

    try:
        await asyncio.wait_for(read(), timeout_s)
    except TimeoutError:
        raise AssertionError(f"{len(got)} of {n} message(s) on {queue} within {timeout_s} s: {got}") from None
    return got


async def quiet(farm: Farm, queue: str, seconds: float) -> list[str]:
    """Task ids arriving on ``queue`` within ``seconds`` (acknowledged); [] when none did."""
    got: list[str] = []

    async def read() -> None:
        async for delivery in farm.ctx.broker.consume(queue, prefetch=1):
            got.append(json.loads(delivery.body)["task_id"])
            await delivery.ack()

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(read(), seconds)
    return got


async def task_rows(farm: Farm, job_id: str) -> list[Task]:
    """The job's task rows, in frame order."""
    async with farm.ctx.db.session() as s:
        return list((await s.scalars(select(Task).where(Task.job_id == job_id).order_by(Task.index))).all())


async def until(check: Any, timeout_s: float = 10.0, what: str = "condition") -> None:
    """Wait until ``await check()`` is true.

    Raises:
        AssertionError: not within ``timeout_s`` seconds.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not await check():
        if loop.time() > end:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        await asyncio.sleep(0.1)
