"""``renderfarm agent``: one node agent in its own process, on a networked broker."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp

from node_agent.agent import NodeAgent, ServerError
from node_agent.capabilities import detect
from node_agent.executor.local import LocalExecutor
from node_agent.inputs import DEFAULT_MAX_BYTES, InputCache
from server.broker import open_broker
from server.config import DEFAULT_DATA_DIR, redact_url


async def run_agent(
    server: str,
    token: str,
    broker_url: str | None,
    name: str | None,
    pool: str,
    tags: list[str],
    work_dir: Path | None,
    blender: str | None,
    console: Any,
    input_cache_bytes: int = DEFAULT_MAX_BYTES,
) -> None:
    """Register with ``server``, then consume the pool's queue until SIGINT/SIGTERM.

    The broker URL comes from ``broker_url`` or else from the server's answer to the
    registration. On SIGTERM the task in progress is handed back to the server.

    Raises:
        ValueError: the server refused the token or the registration, stayed unreachable for
            60 s, or uses the in-process broker (which agents in other processes cannot reach);
            or the broker URL is not usable.
    """
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    assert me is not None
    for sig in (signal.SIGINT, signal.SIGTERM):  # from the start: also while registering
        loop.add_signal_handler(sig, me.cancel)
    try:
        name = await _serve(
            server, token, broker_url, name, pool, tags, work_dir, blender, console, input_cache_bytes
        )
    except asyncio.CancelledError:
        pass
    console.print(f"agent {name or ''} stopped")


async def _serve(
    server: str,
    token: str,
    broker_url: str | None,
    name: str | None,
    pool: str,
    tags: list[str],
    work_dir: Path | None,
    blender: str | None,
    console: Any,
    input_cache_bytes: int = DEFAULT_MAX_BYTES,
) -> str:
    work = work_dir or DEFAULT_DATA_DIR / "agent"  # replaced by agent-<name> once the name is known
    caps = detect(blender, tags)
    agent = NodeAgent(
        server,
        token,
        None,
        work,
        LocalExecutor(blender),
        name=name,
        pool=pool,
        capabilities=caps,  # type: ignore[arg-type]
        input_cache_bytes=input_cache_bytes,
    )

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
        agent._http = http
        try:
            reg = await agent.register(give_up_s=60)
        except ServerError as exc:
            raise ValueError(f"cannot register with {server}: {exc.message or exc}") from None
        finally:
            agent._http = None
    name = agent.name
    if work_dir is None:
        agent.work_dir = DEFAULT_DATA_DIR / f"agent-{name}"
        agent.inputs = InputCache(agent.work_dir / "inputs", max_bytes=agent.inputs.max_bytes)
    url = broker_url or reg.get("broker_url")
    if not url:
        raise ValueError(
            f"the server at {server} uses the in-process broker (memory://), which agents in other "
            "processes cannot reach; start it with --broker-url amqp://... (RabbitMQ)"
        )
    broker = open_broker(url)
    try:
        await asyncio.wait_for(broker.check(), 30)
    except Exception as exc:
        await broker.close()
        raise ValueError(f"broker {redact_url(url)} is not usable: {exc}") from exc
    agent.broker = broker
    console.print(
        f"agent {name} registered with {server} (pool {pool}, {caps['cpu_cores']} cores, "
        f"{len(caps['gpus'])} GPU(s)); taking tasks from {redact_url(url)}",
        highlight=False,
    )
    try:
        await agent.run()  # until SIGINT/SIGTERM cancels it (a task in progress is handed back)
    finally:
        await broker.close()
    return name
