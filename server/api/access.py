"""The one mechanism that enforces every route's permission, and audits what it lets through.

For each request to a registered route, :func:`auth_middleware`:

1. authenticates the bearer token (``public`` routes need none) into a
   :class:`server.auth.principal.Principal`, stored as ``request["principal"]``;
2. checks the route's permission (:mod:`server.auth.permissions`) on the object the
   route names (its ``scope``, :mod:`server.api.registry`):

   * an object of a project the caller has no role in answers **404**, exactly as an
     object that does not exist (the project's objects are invisible, not forbidden);
   * a role that lacks the permission (a viewer cancelling, an artist cancelling
     another's job) answers **403**;
   * an agent token may call only ``agent`` routes, and only on tasks leased to it
     (**409** otherwise, which tells the agent to drop the task); a user token may not
     call ``agent`` routes (**403**);

3. writes an audit row for every refused access (401, 403 and the 404 above) and every
   state-changing request (not GET/HEAD/OPTIONS), with its outcome.

The target of the check is left in ``request["target"]`` (:class:`Target`) for the handler.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from sqlalchemy import select

from server.api.middleware import CTX, parse_body
from server.api.registry import RouteInfo
from server.api.schemas import JobCreate
from server.audit import log as audit_log
from server.auth import service as auth
from server.auth.permissions import ADMIN_PERMISSIONS, allows
from server.auth.principal import Principal
from server.errors import ApiError, not_found
from server.persistence.tables import Job, Model, Project, Task

log = logging.getLogger(__name__)
PRINCIPAL = web.RequestKey("principal", object)
TARGET = web.RequestKey("target", object)
NOTE = web.RequestKey("audit_note", dict)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass
class Target:
    """The object a request acts on: its kind, id as given, project and owner."""

    kind: str
    ident: str
    project_id: str | None
    owner_id: str | None = None


class Denied(ApiError):
    """A refused access (audited). ``hidden`` marks a 404 given for another project's object."""

    def __init__(self, status: int, message: str, field: str | None = None, hidden: bool = False) -> None:
        super().__init__(status, message, field)
        self.hidden = hidden


def note(request: web.Request, target: str | None = None, **detail: Any) -> None:
    """Say more in the request's audit row: what was made (``target``, e.g. ``job_id=...``) and
    facts about the change (``detail``; never a secret)."""
    current = request.get(NOTE) or {}
    if target is not None:
        current["target"] = target
    current.setdefault("detail", {}).update(detail)
    request[NOTE] = current


def principal_of(request: web.Request) -> Principal:
    """The authenticated caller of ``request`` (set by the middleware)."""
    p = request.get(PRINCIPAL)
    if not isinstance(p, Principal):
        raise ApiError(401, "authentication required")
    return p


def target_of(request: web.Request) -> Target:
    """The object the permission was checked on (set by the middleware)."""
    t = request.get(TARGET)
    if not isinstance(t, Target):
        raise RuntimeError("route has no target")
    return t


async def resolve_target(ctx: Any, request: web.Request, info: RouteInfo, p: Principal) -> Target | None:
    """The object ``info.scope`` names in ``request``, or None for ``any``.

    Raises:
        ApiError: 404 when the object does not exist; 400 for an upload that names no
            project while the caller has several; 400 for a job body that is not valid.
    """
    scope = info.scope
    m = request.match_info
    if scope == "any" or scope is None:
        return None
    ident = m.get(f"{scope}_id", "")
    known = _owners(ctx).get((scope, ident)) if scope in ("job", "task", "model") else None
    if known is not None:
        return Target(scope, ident, *known)
    target = await _resolve_target(ctx, request, info, p)
    if target is not None and target.kind == scope and scope in ("job", "task", "model"):
        _remember(ctx, (scope, ident), (target.project_id, target.owner_id))
    return target


OWNERS_CACHED = 100_000
"""Job, task and model -> (project, owner) pairs remembered per process (they never change)."""


def _owners(ctx: Any) -> OrderedDict[tuple[str, str], tuple[str | None, str | None]]:
    cache = getattr(ctx, "_owners", None)
    if cache is None:
        cache = ctx._owners = OrderedDict()
    return cache


def _remember(ctx: Any, key: tuple[str, str], value: tuple[str | None, str | None]) -> None:
    cache = _owners(ctx)
    cache[key] = value
    if len(cache) > OWNERS_CACHED:
        cache.popitem(last=False)


async def _resolve_target(ctx: Any, request: web.Request, info: RouteInfo, p: Principal) -> Target | None:
    scope = info.scope
    m = request.match_info
    async with ctx.db.session() as s:
        if scope == "job":
            row = (await s.execute(select(Job.project_id, Job.owner_id).where(Job.id == m["job_id"]))).first()
            if row is None:
                raise not_found("job", m["job_id"])
            return Target("job", m["job_id"], row[0], row[1])
        if scope == "task":
            row = (
                await s.execute(
                    select(Job.project_id, Job.owner_id)
                    .join(Task, Task.job_id == Job.id)
                    .where(Task.id == m["task_id"])
                )
            ).first()
            if row is None:
                raise not_found("task", m["task_id"])
            return Target("task", m["task_id"], row[0], row[1])
        if scope == "model":
            row = (
                await s.execute(select(Model.project_id, Model.owner_id).where(Model.id == m["model_id"]))
            ).first()
            if row is None:
                raise not_found("model", m["model_id"])
            return Target("model", m["model_id"], row[0], row[1])
        if scope == "project":
            proj = await auth.find_project(s, m["project_id"])
            if proj is None:
                raise not_found("project", m["project_id"])
            return Target("project", m["project_id"], proj.id)
        if scope == "upload":
            name = request.query.get("project")
            if name:
                proj = await auth.find_project(s, name)
                if proj is None:
                    raise ApiError(404, f"project {name!r} not found", "project")
                return Target("project", name, proj.id)
            mine = p.projects_with(info.permission)
            if len(mine) == 1:
                return Target("project", mine[0], mine[0])
            if not mine and not p.is_admin:
                raise Denied(
                    403, f"you hold {info.permission} in no project (ask a manager for the artist role)"
                )
            names = (await s.scalars(select(Project.name).where(Project.id.in_(mine)))).all()
            hint = f" (one of: {', '.join(sorted(names))})" if names else ""
            raise ApiError(400, f"name the project with ?project=NAME{hint}", "project")
        if scope == "job-create":
            body = await parse_body(request, JobCreate)
            row = (
                await s.execute(select(Model.project_id, Model.owner_id).where(Model.id == body.model_id))
            ).first()
            if row is None:
                raise not_found("model", body.model_id)
            return Target("model", body.model_id, row[0], row[1])
    raise RuntimeError(f"unknown scope {scope!r}")


async def authorize(ctx: Any, request: web.Request, info: RouteInfo) -> Principal | None:
    """Authenticate and check ``info.permission`` for ``request``; returns the principal.

    Raises:
        Denied: 401, 403, 404 (another project's object) or 409 (an agent's foreign task).
        ApiError: 404 for an object that does not exist, 400 for a bad scope parameter.
    """
    if info.permission == "public":
        return None
    try:
        p = await auth.authenticate(ctx, request.headers.get("Authorization"))
    except ApiError as exc:
        raise Denied(exc.status, exc.message) from None
    request[PRINCIPAL] = p
    if info.permission == "agent":
        if p.kind != "agent":
            raise Denied(403, "this route is for node agents (use an agent token)")
        await _check_agent_task(ctx, request, p)
        return p
    if p.kind != "user":
        raise Denied(403, "an agent token may only call /api/agent routes")
    if info.permission == "self":
        return p
    if info.permission in ADMIN_PERMISSIONS:
        if not p.is_admin:
            raise Denied(403, f"only an admin may do this ({info.permission})")
        return p
    if info.scope == "any":
        if not p.is_admin and not p.projects_with(info.permission):
            raise Denied(403, f"you hold {info.permission} in no project")
        return p
    target = await resolve_target(ctx, request, info, p)
    assert target is not None
    request[TARGET] = target
    role = p.role_in(target.project_id)
    if role is None:  # another project's object: answer as if it did not exist
        field = "project" if info.scope == "upload" else f"{target.kind}_id"  # as for a missing one
        raise Denied(404, not_found(target.kind, target.ident).message, field, hidden=True)
    if not allows(role, info.permission, owns=target.owner_id is not None and target.owner_id == p.user_id):
        own = (
            " on jobs of others"
            if info.permission in ("job:cancel", "job:update") and role == "artist"
            else ""
        )
        raise Denied(403, f"your role {role} may not {info.permission}{own} in this project")
    return p


async def _check_agent_task(ctx: Any, request: web.Request, p: Principal) -> None:
    task_id = request.match_info.get("task_id")
    if task_id is None or request.path.endswith("/claim"):
        return
    async with ctx.db.session() as s:
        agent = await s.scalar(select(Task.agent).where(Task.id == task_id))
    if agent is not None and agent != p.name:
        raise Denied(409, f"task {task_id!r} is not leased to agent {p.name!r}")


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Enforce each route's permission (see the module docstring) and audit the outcome."""
    info: RouteInfo | None = getattr(handler, "route_info", None)
    if info is None:  # aiohttp's own 404/405
        return await handler(request)
    ctx = request.app[CTX]
    try:
        await authorize(ctx, request, info)
    except Denied as exc:
        await audit_request(ctx, request, info, exc.status, "denied", exc.message)
        raise
    if request.method in SAFE_METHODS:
        try:
            return await handler(request)
        except ApiError as exc:  # a read refused by the handler itself (a signed link's signature)
            if exc.status in (401, 403):
                await audit_request(ctx, request, info, exc.status, "denied", exc.message)
            raise
    if not info.audit:
        return await handler(request)
    try:
        resp = await handler(request)
    except ApiError as exc:
        await audit_request(ctx, request, info, exc.status, "failure", exc.message)
        raise
    except web.HTTPException as exc:
        await audit_request(ctx, request, info, exc.status, "success" if exc.status < 400 else "failure")
        raise
    except Exception:
        await audit_request(ctx, request, info, 500, "failure", "internal error")
        raise
    await audit_request(ctx, request, info, resp.status, "success" if resp.status < 400 else "failure")
    return resp


def client_of(request: web.Request) -> tuple[str, str]:
    """``(ip, user agent)`` of a request.

    The IP is the peer's address, unless the peer is one of the ``trusted_proxies``
    (settings): then it is the last address of ``X-Forwarded-For`` (RFC 7239's
    predecessor, as nginx and HAProxy append it) that is not a trusted proxy itself.
    """
    return client_ip(request), request.headers.get("User-Agent", "")[:255]


def client_ip(request: web.Request) -> str:
    """The client's address (see :func:`client_of`)."""
    peer = request.remote or ""
    networks = request.app[CTX].settings.proxy_networks()
    if not networks or not _within(peer, networks):
        return peer
    hops = [
        h.strip() for h in ",".join(request.headers.getall("X-Forwarded-For", [])).split(",") if h.strip()
    ]
    for hop in reversed(hops):
        if not _within(hop, networks):
            return hop[:64]
    return peer


def _within(addr: str, networks: list[Any]) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in n for n in networks)


async def audit_request(
    ctx: Any, request: web.Request, info: RouteInfo, status: int, outcome: str, message: str = ""
) -> None:
    """Append the audit row of a request; an audit failure is logged, never raised."""
    p = request.get(PRINCIPAL)
    t = request.get(TARGET)
    p = p if isinstance(p, Principal) else None
    t = t if isinstance(t, Target) else None
    target = "/".join(f"{k}={v}" for k, v in request.match_info.items()) or (t.ident if t else "")
    detail: dict[str, Any] = {"method": request.method, "path": request.path[:255]}
    if message:
        detail["message"] = message[:500]
    extra = request.get(NOTE)
    if isinstance(extra, dict):
        target = extra.get("target") or target
        detail.update(extra.get("detail") or {})
    await record(
        ctx,
        request,
        action=info.action,
        outcome=outcome,
        actor=p.name if p else "",
        actor_kind=p.kind if p else "anonymous",
        target=target,
        project_id=t.project_id if t else None,
        status=status,
        detail=detail,
    )


async def record(ctx: Any, request: web.Request, **fields: Any) -> None:
    """Append one audit row about ``request`` (its IP and user agent added); never raises."""
    ip, agent = client_of(request)
    try:
        await audit_log.record(ctx, ip=ip, user_agent=agent, **fields)
    except Exception:
        log.exception("audit row not written: %s", fields.get("action"))
