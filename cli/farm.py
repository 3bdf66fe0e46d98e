"""Run the whole embedded farm in one process: API, scheduler and N local node agents."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from sqlalchemy import text

from node_agent.agent import NodeAgent
from node_agent.capabilities import detect
from node_agent.executor.base import BlenderRun
from node_agent.executor.local import LocalExecutor
from server.app import create_app
from server.auth.service import local_agent_token
from server.config import Settings
from server.context import FarmContext
from templates import template_path

log = logging.getLogger(__name__)


@dataclass
class RunningFarm:
    """A farm started by :func:`running_farm`: its URL, context and local agents."""

    url: str
    ctx: FarmContext
    agents: list[NodeAgent] = field(default_factory=list)


def free_port(host: str = "127.0.0.1") -> int:
    """An unused TCP port on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def running_farm(
    settings: Settings, host: str = "127.0.0.1", port: int = 3000, agents: int = 1, warm: bool = True
) -> AsyncIterator[RunningFarm]:
    """Start the API, the scheduler and ``agents`` local node agents; stop them all on exit.

    ``warm``: the agents keep one Blender process across consecutive tasks of a job
    (``NodeAgent(warm=...)``).

    Raises:
        ValueError: naming a backend URL that cannot be used or a backend that does not answer.
        OSError: when the port is taken.
    """
    settings.loopback_only = host in ("127.0.0.1", "localhost", "::1")
    ctx = FarmContext.from_settings(settings)
    try:
        await check_backends(ctx)
    except BaseException:
        await ctx.close()
        raise
    app = create_app(ctx)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"  # noqa: S104
        node_tasks = []
        made: list[NodeAgent] = []
        caps = detect(settings.blender) if agents else {}
        for i in range(agents):
            name = f"{socket.gethostname()}-local-{i + 1}"
            agent = NodeAgent(
                url,
                await local_agent_token(ctx, name),
                ctx.broker,
                settings.data_dir / "agents" / f"agent-{i + 1}",
                LocalExecutor(settings.blender),
                name=name,
                capabilities=caps,
                replace=True,
                warm=warm,
            )
            made.append(agent)
            node_tasks.append(asyncio.create_task(agent.run(), name=f"agent-{i + 1}"))
        try:
            yield RunningFarm(url, ctx, made)
        finally:
            for t in node_tasks:
                t.cancel()
            for t in node_tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
    finally:
        await runner.cleanup()


async def check_backends(ctx: FarmContext, timeout_s: float = 15.0) -> None:
    """Make sure every backend answers before the farm starts, so a wrong URL fails at once.

    Raises:
        ValueError: naming the backend and its URL (password redacted) with the reason.
    """
    from server.config import redact_url

    s = ctx.settings

    async def db_ping() -> None:
        async with ctx.db.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    checks = [
        ("database", s.database_url, db_ping),
        ("broker", s.broker_url, ctx.broker.check),
        ("cache", s.cache_url, ctx.cache.ping),
        ("storage", s.storage_url, ctx.storage.check),
    ]
    for name, url, check in checks:
        try:
            await asyncio.wait_for(check(), timeout_s)
        except Exception as exc:
            why = f"no answer within {timeout_s:g} s" if isinstance(exc, TimeoutError) else str(exc)
            raise ValueError(f"{name} {redact_url(url)} is not usable: {why}") from exc


async def make_sample_scene(path: Path, blender: str | None = None) -> Path:
    """Generate the bundled animated demo scene (24 frames, 320x240, Cycles 16 samples) at ``path``.

    Raises:
        RuntimeError: with Blender's last log lines when generation fails.
    """
    path = path.resolve()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RuntimeError(f"cannot write {path}: {exc.strerror or exc}") from exc
    with tempfile.TemporaryDirectory(prefix="renderfarm-sample-") as home:  # Blender's HOME: its
        outcome = await LocalExecutor(blender).run(  # .config and .cache stay out of the user's folder
            BlenderRun(
                script=template_path("sample_scene.py"),
                args=[str(path)],
                cwd=Path(home),
                timeout_s=300,
                stall_timeout_s=120,
            ),
            on_line=lambda _line: None,
        )
    if not outcome.ok or not path.is_file():
        why = f"Blender {outcome.reason}" + (f" with code {outcome.exit_code}" if outcome.exit_code else "")
        if outcome.ok:
            why = "Blender exited without writing it (is the configured Blender a real Blender?)"
        raise RuntimeError(
            f"could not generate the sample scene ({why}):\n" + "\n".join(outcome.log_tail[-10:])
        )
    return path
