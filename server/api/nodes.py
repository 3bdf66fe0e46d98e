"""``/api/agents``: the node agents that registered, their capabilities and whether they are online."""

from __future__ import annotations

from aiohttp import web

from server.api.middleware import CTX
from server.api.registry import route
from server.api.schemas import AgentList
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
