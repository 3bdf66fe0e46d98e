"""``/api/agent/...``: what node agents call. Every call but ``claim`` carries the attempt's lease id."""

from __future__ import annotations

import tempfile
from pathlib import Path

from aiohttp import web

from protocol.messages import TaskResult
from server.api.access import principal_of
from server.api.middleware import CTX, parse_body, parse_frame_param
from server.api.registry import route
from server.api.schemas import (
    AgentBeat,
    AgentOut,
    AgentRegister,
    AgentRegistered,
    ClaimRequest,
    HeartbeatRequest,
    ResultRequest,
)
from server.context import FarmContext
from server.errors import ApiError
from server.jobs import service
from server.nodes import service as nodes

MAX_FRAME_BYTES = 2 << 30


@route(
    "POST",
    "/api/agent/tasks/{task_id}/claim",
    permission="agent",
    body=ClaimRequest,
    summary="Lease a queued task; returns the render parameters and the input's signed URL",
)
async def claim(request: web.Request) -> web.Response:
    """409 when the task is no longer wanted: the agent drops the message."""
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    req = await parse_body(request, ClaimRequest)
    spec = await service.claim_task(
        ctx, request.match_info["task_id"], _own_name(request, req.agent), registered=True
    )
    return web.json_response(spec.to_dict())


@route(
    "POST",
    "/api/agent/tasks/{task_id}/heartbeat",
    permission="agent",
    body=HeartbeatRequest,
    summary="Extend the lease; 409 tells the agent to stop (canceled or requeued)",
    audit=False,
)
async def heartbeat(request: web.Request) -> web.Response:
    """Keeps the lease alive."""
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    req = await parse_body(request, HeartbeatRequest)
    return web.json_response(
        await service.heartbeat(ctx, request.match_info["task_id"], req.lease_id, req.current_frame)
    )


@route(
    "PUT",
    "/api/agent/tasks/{task_id}/frames/{frame}",
    permission="agent",
    request_content="application/octet-stream",
    query={"lease_id": "the attempt's lease", "ext": ".png, .exr or .jpg"},
    summary="Upload one rendered frame; stored once per job and frame (201 new, 200 already stored)",
    status=201,
    also={200: "the frame was stored before; this copy is discarded"},
)
async def put_frame(request: web.Request) -> web.Response:
    """The body is the image file."""
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    frame = parse_frame_param(request.match_info["frame"])
    lease_id = request.query.get("lease_id", "")
    fd, name = tempfile.mkstemp(suffix=".part", dir=ctx.settings.tmp_dir)
    tmp = Path(name)
    size = 0
    try:
        with open(fd, "wb") as fh:
            while chunk := await request.content.read(1 << 20):
                size += len(chunk)
                if size > MAX_FRAME_BYTES:
                    raise ApiError(413, "frame is larger than 2 GiB", "frame")
                fh.write(chunk)
        if size == 0:
            raise ApiError(400, "frame upload is empty", "frame")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    row, created = await service.store_frame(
        ctx, request.match_info["task_id"], lease_id, frame, tmp, request.query.get("ext", ".png")
    )
    return web.json_response(row, status=201 if created else 200)


@route(
    "POST",
    "/api/agent/tasks/{task_id}/result",
    permission="agent",
    body=ResultRequest,
    summary="End an attempt: completed (checked against stored frames) or failed with the log tail",
)
async def result(request: web.Request) -> web.Response:
    """The server decides the final state (a 'completed' with frames missing fails)."""
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    req = await parse_body(request, ResultRequest)
    res = TaskResult(**req.model_dump())
    return web.json_response(await service.finish_task(ctx, request.match_info["task_id"], res))


@route(
    "POST",
    "/api/agent/tasks/{task_id}/release",
    permission="agent",
    body=HeartbeatRequest,
    summary="Hand a task back when the agent stops: queued again, the attempt not counted",
)
async def release(request: web.Request) -> web.Response:
    """Used by an agent shutting down cleanly, so a restart does not use up the task's attempts."""
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    req = await parse_body(request, HeartbeatRequest)
    return web.json_response(await service.release_task(ctx, request.match_info["task_id"], req.lease_id))


@route(
    "POST",
    "/api/agent/register",
    permission="agent",
    body=AgentRegister,
    response=AgentRegistered,
    summary="An agent starting: records its capabilities; returns its queue, broker URL and intervals",
)
async def register(request: web.Request) -> web.Response:
    """A restarted agent with the same name takes its row back."""
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    req = await parse_body(request, AgentRegister)
    out = await nodes.register(
        ctx,
        _own_name(request, req.name),
        req.pool,
        req.capabilities.model_dump(),
        req.version,
        req.instance,
        req.replace,
    )
    return web.json_response(out)


@route(
    "POST",
    "/api/agent/heartbeat",
    permission="agent",
    body=AgentBeat,
    response=AgentOut,
    summary="The agent is alive (every heartbeat_s seconds), or going offline (stopping)",
    audit=False,
)
async def agent_heartbeat(request: web.Request) -> web.Response:
    """404 tells the agent to register again."""
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    req = await parse_body(request, AgentBeat)
    return web.json_response(await nodes.beat(ctx, _own_name(request, req.name), req.stopping))


def _own_name(request: web.Request, given: str | None) -> str:
    """The calling agent's name: the one its token is bound to.

    Raises:
        ApiError: 403 when the body names another agent.
    """
    name = principal_of(request).name
    if given is not None and given != name:
        raise ApiError(403, f"this agent token belongs to agent {name!r}, not {given!r}", "name")
    return name
