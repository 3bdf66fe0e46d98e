"""``/api/agents``: the node agents that registered, their capabilities, whether they are online
and enabled; admins enable and disable them."""

from __future__ import annotations

from aiohttp import web

from server.api.access import note
from server.api.middleware import CTX, parse_body
from server.api.registry import route
from server.api.schemas import AgentList, AgentOut, AgentUpdate
from server.context import FarmContext
from server.nodes import service as nodes


@route(
    "GET",
    "/api/agents",
    permission="node:read",
    summary="Registered node agents, online ones first",
    response=AgentList,
)
async def list_agents(request: web.Request) -> web.Response:
    """Online: heartbeat within max(3 x heartbeat_s, 15) seconds."""
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    return web.json_response({"agents": await nodes.list_agents(ctx)})


@route(
    "PATCH",
    "/api/agents/{name}",
    permission="agent-token:manage",
    body=AgentUpdate,
    response=AgentOut,
    summary="Enable or disable a node agent: disabled, it takes no new task; one it renders runs to its end",
)
async def update_agent(request: web.Request) -> web.Response:
    """Admins only. 404 for an agent that never registered. A disabled agent keeps heartbeating
    and shows online with ``enabled: false``; its claims are refused (409) and the dispatcher
    routes nothing to it."""
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    req = await parse_body(request, AgentUpdate)
    name = request.match_info["name"]
    note(request, f"agent={name}", enabled=req.enabled)
    return web.json_response(await nodes.set_enabled(ctx, name, req.enabled))
