"""``renderfarm agent``: one node agent in its own process, on a networked broker."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from node_agent.agent import NodeAgent, ServerError
from node_agent.capabilities import detect
from node_agent.executor.base import Executor
from node_agent.executor.local import LocalExecutor
from node_agent.inputs import DEFAULT_MAX_BYTES, InputCache
from server.broker import open_broker
from server.config import DEFAULT_DATA_DIR, redact_url

_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Parse a size such as ``8g``, ``512m``, ``1.5G``, ``2GiB`` or ``1048576`` (bytes) into
    bytes; the units are powers of 1024 (k, m, g, t, optionally followed by ``b``/``ib``).

    Raises:
        ValueError: not a positive number with an optional unit.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if m is None or (not m.group(2) and text.strip().lower().endswith("ib")):
        raise ValueError(f"{text!r} is not a size (e.g. 8g, 512m, 1.5g)")
    value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    if value <= 0:
        raise ValueError(f"{text!r} is not a positive size")
    return value


@dataclass(frozen=True)
class ExecutorOptions:
    """How the agent runs Blender (``renderfarm agent --executor ...``).

    Attributes:
        kind: ``"local"`` (a subprocess) or ``"docker"`` (a container per task).
        image: the render image (docker).
        memory_bytes: memory limit of a container, in bytes (docker; None: 3/4 of the machine's).
        cpus: CPUs a container may use (docker; None: all).
        pids: limit on processes and threads in a container (docker).
        gpus: None, ``"all"`` or NVIDIA device ids (docker).
    """

    kind: str = "local"
    image: str | None = None
    memory_bytes: int | None = None
    cpus: float | None = None
    pids: int | None = None
    gpus: str | list[str] | None = None


def check_gpus(gpus: str | list[str] | None, caps: dict[str, Any], backends: list[str] | None) -> None:
    """Refuse a ``--gpus`` choice this machine cannot honour.

    Raises:
        ValueError: GPUs are asked for (``all`` or ids) while none was detected, or with
            ``--backends none``; or an id is neither the index nor the UUID of a detected GPU.
    """
    if gpus is None:
        return
    if backends == []:
        raise ValueError("--gpus gives the containers GPUs, but --backends none advertises none")
    found = caps.get("gpus") or []
    if not found:
        raise ValueError(
            "--gpus asks for NVIDIA GPUs, but none was detected here (NVML / nvidia-smi); "
            "leave --gpus out for CPU rendering"
        )
    if isinstance(gpus, list):
        known = {str(g.get("index")) for g in found} | {str(g.get("uuid")) for g in found if g.get("uuid")}
        unknown = [g for g in gpus if g not in known]
        if unknown:
            raise ValueError(
                f"--gpus {','.join(unknown)}: no such GPU here; the detected ones are "
                + ", ".join(f"{g.get('index')} ({g.get('name')})" for g in found)
            )


def make_executor(options: ExecutorOptions, blender: str | None) -> Executor:
    """The executor ``options`` ask for.

    Raises:
        BlenderNotFound: no Blender for the local executor; for docker its subclass
            ``ExecutorUnavailable``: dockerd does not answer or the image is missing.
        ValueError: an unknown kind, or a bad limit.
    """
    if options.kind == "local":
        return LocalExecutor(blender)
    if options.kind == "docker":
        from node_agent.executor.docker import DEFAULT_IMAGE, DEFAULT_PIDS, DockerExecutor

        return DockerExecutor(
            image=options.image or DEFAULT_IMAGE,
            memory_bytes=options.memory_bytes,
            cpus=options.cpus,
            pids=options.pids or DEFAULT_PIDS,
            gpus=options.gpus,
        )
    raise ValueError(f"unknown executor {options.kind!r} (local or docker)")


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
    executor: ExecutorOptions | None = None,
    warm: bool = True,
    backends: list[str] | None = None,
) -> None:
    """Register with ``server``, then consume the pool's queue until SIGINT/SIGTERM.

    The broker URL comes from ``broker_url`` or else from the server's answer to the
    registration. On SIGTERM the task in progress is handed back to the server.

    ``warm``: keep one Blender process (or container) across consecutive tasks of a job.
    ``backends``: the Cycles GPU backends to advertise instead of the detected ones. With the
    Docker executor and no ``gpus`` option, the detected NVIDIA GPUs are all given to the
    containers; when no backend is advertised, none is.

    Raises:
        ValueError: the server refused the token or the registration, stayed unreachable for
            60 s, or uses the in-process broker (which agents in other processes cannot reach);
            or the broker URL is not usable.
        BlenderNotFound: the executor cannot run Blender (for docker: ``ExecutorUnavailable``,
            dockerd does not answer or the render image is missing).
    """
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    assert me is not None
    for sig in (signal.SIGINT, signal.SIGTERM):  # from the start: also while registering
        loop.add_signal_handler(sig, me.cancel)
    known: dict[str, str] = {}  # the name the server knows the agent by, once registered
    try:
        name = await _serve(
            server,
            token,
            broker_url,
            name,
            pool,
            tags,
            work_dir,
            blender,
            console,
            input_cache_bytes,
            executor or ExecutorOptions(),
            warm,
            backends,
            known,
        )
    except asyncio.CancelledError:
        name = known.get("name") or name
    console.print(f"agent {name} stopped" if name else "agent stopped", highlight=False)


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
    executor_options: ExecutorOptions | None = None,
    warm: bool = True,
    backends: list[str] | None = None,
    known: dict[str, str] | None = None,
) -> str:
    work = work_dir or DEFAULT_DATA_DIR / "agent"  # replaced by agent-<name> once the name is known
    options = executor_options or ExecutorOptions()
    caps = detect(blender, tags, backends)
    check_gpus(options.gpus, caps, backends)
    if options.kind == "docker" and options.gpus is None and caps["gpus"] and caps["backends"]:
        options = dataclasses.replace(options, gpus="all")  # the GPUs it advertises, in its containers
    executor = make_executor(options, blender)
    image_blender = getattr(getattr(executor, "info", None), "version", "")
    if image_blender:  # the render image's Blender, not this machine's
        caps["blender"] = image_blender
    agent = NodeAgent(
        server,
        token,
        None,
        work,
        executor,
        name=name,
        pool=pool,
        capabilities=caps,  # type: ignore[arg-type]
        input_cache_bytes=input_cache_bytes,
        warm=warm,
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
    if known is not None:
        known["name"] = name
    if work_dir is None:
        agent.work_dir = DEFAULT_DATA_DIR / f"agent-{name}"
        agent.inputs = InputCache(agent.work_dir / "inputs", max_bytes=agent.inputs.max_bytes)
    try:
        await _prepare_executor(executor, agent.work_dir, name, console)
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
    except BaseException:
        await _sign_off(agent, token)  # registered, but taking nothing: not to be counted online
        raise
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


async def _sign_off(agent: NodeAgent, token: str) -> None:
    """Tell the server the agent went offline (it registered, then could not start), so that no
    task is routed to it and its next start is not kept waiting; errors are ignored."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
        agent._http = http
        try:
            await asyncio.wait_for(agent._beat(stopping=True), 10)
        except Exception:  # noqa: S110 (best effort: the server forgets it after the online window)
            pass
        finally:
            agent._http = None


async def _prepare_executor(executor: Executor, work_dir: Path, name: str, console: Any) -> None:
    """For an executor with containers (``reap_orphans``): label them with the agent's name,
    stage scripts in the work folder (a path the Docker daemon sees the same when the agent
    runs in a container with that folder mounted at the same path), and remove containers an
    earlier process of this agent left behind."""
    reap = getattr(executor, "reap_orphans", None)
    if reap is None:
        return
    executor.labels = {**getattr(executor, "labels", {}), "agent": name}  # type: ignore[attr-defined]
    if getattr(executor, "stage_dir", None) is None:
        executor.stage_dir = work_dir / "exec"  # type: ignore[attr-defined]
    removed = await reap({"agent": name})
    if removed:
        console.print(
            f"agent {name}: removed {len(removed)} container(s) left by a previous run", highlight=False
        )
