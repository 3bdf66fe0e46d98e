"""Register node agents, record their heartbeats and list them.

An agent registers with its name, pool and capabilities when it starts, then
heartbeats every ``heartbeat_s`` seconds. It is *online* while its last heartbeat
is younger than ``max(3 * heartbeat_s, 15)`` seconds. An admin may disable an agent
(:func:`set_enabled`): it keeps heartbeating and shows online, but takes no new task (its
claims are refused and the dispatcher routes nothing to it); a task it is rendering when it
is disabled runs to its end and its result counts. Agents report over HTTP
(like every task report), so the server checks the agent token and the task's
lease on each call and can answer 409 at once; RabbitMQ carries only dispatch.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select

from protocol.devices import BACKENDS, route_backends, route_key
from protocol.messages import queue_for_pool
from server.context import FarmContext
from server.errors import ApiError
from server.persistence.retry import retry_on_disconnect
from server.persistence.tables import Agent, new_id, utcnow

ADVERTISED_BACKENDS = (*BACKENDS, "CPU")
"""What an agent may list in ``capabilities.backends``: the GPU backends, and ``CPU`` (which
every agent has; it routes nothing)."""


def advertised_backends(values: list[str] | tuple[str, ...]) -> list[str]:
    """``values`` upper case, without repeats, in :data:`ADVERTISED_BACKENDS` order.

    Raises:
        ValueError: naming the values that are not backends.
    """
    unknown = [v for v in values if str(v).strip().upper() not in ADVERTISED_BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; known: {', '.join(ADVERTISED_BACKENDS)}")
    have = {str(v).strip().upper() for v in values}
    return [b for b in ADVERTISED_BACKENDS if b in have]


def online_after(ctx: FarmContext):  # type: ignore[no-untyped-def]
    """The oldest heartbeat time (naive UTC) of an agent still counted online."""
    return utcnow() - timedelta(seconds=max(3 * ctx.settings.heartbeat_s, 15.0))


def agent_dict(a: Agent, online_since: Any) -> dict[str, Any]:
    """The API shape of an agent row."""
    return {
        "id": a.id,
        "name": a.name,
        "pool": a.pool,
        "route": a.route or a.pool,
        "backends": route_backends(a.route or a.pool),
        "version": a.version,
        "capabilities": a.capabilities or {},
        "online": a.state == "online" and a.last_seen_at >= online_since,
        "enabled": a.enabled is not False,
        "current_task_id": a.current_task_id,
        "registered_at": a.registered_at.isoformat() + "Z",
        "last_seen_at": a.last_seen_at.isoformat() + "Z",
    }


def agent_broker_url(ctx: FarmContext) -> str | None:
    """The broker URL agents in other processes consume from; ``None`` for the in-process broker."""
    url = ctx.settings.agent_broker_url or ctx.settings.broker_url
    return None if urlsplit(url).scheme == "memory" else url


@retry_on_disconnect
async def register(
    ctx: FarmContext,
    name: str,
    pool: str,
    capabilities: dict[str, Any],
    version: str,
    instance: str = "",
    replace: bool = False,
) -> dict[str, Any]:
    """Record an agent (by name: a restarted agent takes its row back) and tell it how to work.

    Two live processes may not share a name: while the row's agent is online with another
    ``instance``, registering is refused (409) unless ``replace``.

    The agent's **route** is its pool and the GPU backends of ``capabilities["backends"]``
    (:func:`protocol.devices.route_key`: ``default`` for a CPU agent, ``default.gpu-optix-cuda``
    for one with OPTIX and CUDA); it consumes that route's queue, where the dispatcher sends
    the tasks whose device its backends satisfy.

    Raises:
        ApiError: 409 for a name in use by a live process; 400 for an unknown backend.

    Returns:
        ``{"agent": <agent>, "route": str, "queue": str, "broker_url": str | None,
        "heartbeat_s": float, "lease_s": float}``; ``broker_url`` is ``None`` when the server
        uses the in-process broker, which agents in other processes cannot reach.
    """
    now = utcnow()
    try:
        backends = advertised_backends(capabilities.get("backends") or [])
    except ValueError as exc:
        raise ApiError(400, f"capabilities.backends: {exc}", "capabilities.backends") from None
    capabilities = {**capabilities, "backends": backends}
    route = route_key(pool, backends)
    async with ctx.db.session() as s:
        agent = await s.scalar(select(Agent).where(Agent.name == name))
        if agent is None:
            agent = Agent(id=new_id(), name=name, registered_at=now)
            s.add(agent)
        elif (
            not replace
            and instance
            and agent.instance
            and agent.instance != instance
            and agent.state == "online"
            and agent.last_seen_at >= online_after(ctx)
        ):
            age = (now - agent.last_seen_at).total_seconds()
            raise ApiError(
                409,
                f"an agent named {name!r} is already online (another process, seen {age:.0f} s ago); "
                "choose another --name, or stop that one",
                "name",
            )
        agent.instance = instance
        agent.pool, agent.route, agent.capabilities, agent.version = pool, route, capabilities, version
        agent.state, agent.last_seen_at, agent.current_task_id = "online", now, None
        await s.commit()
        out = agent_dict(agent, online_after(ctx))
    await ctx.wake_dispatcher()  # the pool's window grows with its agents
    return {
        "agent": out,
        "route": route,
        "queue": queue_for_pool(route),
        "broker_url": agent_broker_url(ctx),
        "heartbeat_s": ctx.settings.heartbeat_s,
        "lease_s": ctx.settings.lease_s,
    }


@retry_on_disconnect
async def beat(ctx: FarmContext, name: str, stopping: bool = False) -> dict[str, Any]:
    """Record that the agent is alive (or, with ``stopping``, that it went offline cleanly).

    Raises:
        ApiError: 404 when the agent never registered (it must register again).
    """
    async with ctx.db.session() as s:
        agent = await s.scalar(select(Agent).where(Agent.name == name))
        if agent is None:
            raise ApiError(404, f"agent {name!r} is not registered", "name")
        agent.last_seen_at = utcnow()
        agent.state = "offline" if stopping else "online"
        await s.commit()
        return agent_dict(agent, online_after(ctx))


@retry_on_disconnect
async def set_enabled(ctx: FarmContext, name: str, enabled: bool) -> dict[str, Any]:
    """Enable or disable the agent ``name`` (either is allowed again, and changes nothing then).

    A disabled agent takes no new task: the dispatcher routes nothing to it and its claims
    are refused (409, and the task goes to another agent). A task it is rendering runs to its
    end: its heartbeats, frames and result are accepted as before. It stays registered,
    heartbeats and shows online; registering again (a restart) keeps it disabled.

    Returns:
        The agent (:func:`agent_dict`), ``enabled`` as set.

    Raises:
        ApiError: 404 when no agent of that name ever registered.
    """
    async with ctx.db.session() as s:
        agent = await s.scalar(select(Agent).where(Agent.name == name))
        if agent is None:
            raise ApiError(404, f"agent {name!r} is not registered", "name")
        changed = agent.enabled != enabled
        agent.enabled = enabled
        await s.commit()
        out = agent_dict(agent, online_after(ctx))
    if changed:
        await ctx.wake_dispatcher()  # enabled: its routes open again; disabled: they shrink
    return out


@retry_on_disconnect
async def list_agents(ctx: FarmContext) -> list[dict[str, Any]]:
    """Every registered agent, online ones first, then by name."""
    since = online_after(ctx)
    async with ctx.db.session() as s:
        rows = (await s.scalars(select(Agent).order_by(Agent.name))).all()
    out = [agent_dict(a, since) for a in rows]
    return sorted(out, key=lambda a: (not a["online"], a["name"]))
