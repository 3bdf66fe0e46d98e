"""``/api/auth``, ``/api/me``, ``/api/users``, ``/api/projects``, ``/api/tokens``: accounts and access."""

from __future__ import annotations

import math
from typing import Any

from aiohttp import web
from sqlalchemy import select

from server.api.access import client_ip, note, principal_of, record, target_of
from server.api.auth_schemas import (
    AgentTokenCreate,
    LoginRequest,
    LogoutRequest,
    MemberOut,
    MemberSet,
    MeOut,
    PasswordChange,
    ProjectCreate,
    ProjectList,
    ProjectOut,
    RefreshRequest,
    SessionOut,
    TokenCreate,
    TokenList,
    TokenOut,
    UserCreate,
    UserList,
    UserOut,
    UserUpdate,
)
from server.api.middleware import CTX, parse_body
from server.api.registry import route
from server.audit import log as audit_log
from server.auth import service as auth
from server.auth.throttle import login_gate
from server.errors import ApiError
from server.persistence.tables import Project

LOGIN_ACTION = "auth.login"
"""Audit action of login attempts (and of wrong current passwords on a password change)."""


@route(
    "POST",
    "/api/auth/login",
    permission="public",
    body=LoginRequest,
    response=SessionOut,
    summary="Log in with a user name and password: an access token (15 min) and a refresh token",
    also={429: "too many failed logins for this account or address: retry after Retry-After seconds"},
    audit=False,
)
async def login(request: web.Request) -> web.Response:
    """Throttled per account and per client address, from the audit log's failed logins."""
    ctx = request.app[CTX]
    req = await parse_body(request, LoginRequest)
    ip = client_ip(request)
    async with login_gate(req.username, ip):  # check, verify and record: one attempt at a time
        await check_throttle(ctx, request, req.username, ip)
        try:
            session, user = await auth.login(ctx, req.username, req.password)
        except ApiError as exc:
            await record(
                ctx, request, action=LOGIN_ACTION, outcome="failure", actor=req.username, status=exc.status
            )
            raise
        await record(
            ctx,
            request,
            action=LOGIN_ACTION,
            outcome="success",
            actor=user.username,
            actor_kind="user",
            status=200,
        )
    return web.json_response(session.to_dict())


class Throttled(ApiError):
    """429: too many failed logins; ``retry_after`` in whole seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(429, message)
        self.retry_after = retry_after


async def check_throttle(ctx: Any, request: web.Request, username: str, ip: str) -> None:
    """Refuse (429, audited as ``throttled``) when the account or the address has too many
    recent failed logins (``login_max_failures``, ``login_max_failures_ip`` in ``login_window_s``).

    Raises:
        Throttled: naming which limit was reached and when to retry.
    """
    s = ctx.settings
    account, by_ip, retry_after = await audit_log.recent_failures(
        ctx, username=username, ip=ip, window_s=s.login_window_s
    )
    if account >= s.login_max_failures or by_ip >= s.login_max_failures_ip:
        wait = max(1, math.ceil(retry_after))
        who = "this account" if account >= s.login_max_failures else "this address"
        await record(ctx, request, action=LOGIN_ACTION, outcome="throttled", actor=username, status=429)
        raise Throttled(f"too many failed logins for {who}; try again in {wait} s", wait)


@route(
    "POST",
    "/api/auth/refresh",
    permission="public",
    body=RefreshRequest,
    response=SessionOut,
    summary="Exchange a refresh token for new tokens; a refresh token used twice revokes its login",
    audit=False,
)
async def refresh(request: web.Request) -> web.Response:
    """Rotation: the answer carries the next refresh token; the one sent is spent."""
    ctx = request.app[CTX]
    req = await parse_body(request, RefreshRequest)
    try:
        session, user = await auth.refresh(ctx, req.refresh_token)
    except auth.RefreshReuse as exc:
        await record(
            ctx,
            request,
            action="auth.refresh_reuse",
            outcome="denied",
            actor=await auth.username_of(ctx, exc.user_id),
            actor_kind="user",
            target=f"family={exc.family}",
            status=401,
        )
        raise
    except ApiError as exc:
        await record(
            ctx,
            request,
            action="auth.refresh",
            outcome="denied",
            status=exc.status,
            detail={"message": exc.message},
        )
        raise
    await record(
        ctx,
        request,
        action="auth.refresh",
        outcome="success",
        actor=user.username,
        actor_kind="user",
        status=200,
    )
    return web.json_response(session.to_dict())


@route(
    "POST",
    "/api/auth/logout",
    permission="self",
    body=LogoutRequest,
    status=204,
    summary="End a login: its refresh token and the access tokens it issued stop working",
)
async def logout(request: web.Request) -> web.Response:
    """Revokes the refresh family named (default: the calling access token's)."""
    ctx = request.app[CTX]
    req = await parse_body(request, LogoutRequest)
    await auth.logout(ctx, principal_of(request), req.refresh_token)
    return web.Response(status=204)


@route(
    "GET",
    "/api/me",
    permission="self",
    response=MeOut,
    summary="Who am I: user, admin flag, projects and roles",
)
async def me(request: web.Request) -> web.Response:
    """The caller's account."""
    p = principal_of(request)
    projects = await auth.projects_of(request.app[CTX], p.user_id)
    return web.json_response(
        {"id": p.user_id, "username": p.name, "is_admin": p.is_admin, "projects": projects}
    )


@route(
    "POST",
    "/api/me/password",
    permission="self",
    body=PasswordChange,
    status=204,
    summary="Change your password (give the current one); every token of yours is revoked",
    also={429: "too many wrong passwords (they count as failed logins): retry after Retry-After seconds"},
)
async def change_password(request: web.Request) -> web.Response:
    """403 when the current password is wrong; that counts as a failed login (throttled alike)."""
    ctx = request.app[CTX]
    req = await parse_body(request, PasswordChange)
    p = principal_of(request)
    ip = client_ip(request)
    async with login_gate(p.name, ip):
        await check_throttle(ctx, request, p.name, ip)
        try:
            await auth.change_own_password(ctx, p, req.current_password, req.new_password)
        except ApiError as exc:
            if exc.field == "current_password":
                await record(
                    ctx, request, action=LOGIN_ACTION, outcome="failure", actor=p.name, status=exc.status
                )
            raise
    return web.Response(status=204)


# ------------------------------------------------------------------ users (admin)


@route(
    "GET", "/api/users", permission="user:manage", response=UserList, summary="Every user and their projects"
)
async def list_users(request: web.Request) -> web.Response:
    """Admins only."""
    return web.json_response({"users": await auth.list_users(request.app[CTX])})


@route(
    "POST",
    "/api/users",
    permission="user:manage",
    body=UserCreate,
    response=UserOut,
    status=201,
    summary="Create a user (409 when the name is taken)",
)
async def create_user(request: web.Request) -> web.Response:
    """The password must have at least 10 characters."""
    ctx = request.app[CTX]
    req = await parse_body(request, UserCreate)
    user = await auth.create_user(ctx, req.username, req.password, req.is_admin)
    note(request, f"user={user.username}", user_id=user.id, is_admin=user.is_admin)
    return web.json_response(auth.user_out(user), status=201)


@route(
    "PATCH",
    "/api/users/{user_id}",
    permission="user:manage",
    body=UserUpdate,
    response=UserOut,
    summary="Disable or enable a user, set their password or admin flag (disabling or a new password "
    "revokes their tokens at once); user_id may be the user name",
)
async def update_user(request: web.Request) -> web.Response:
    """409 when it would leave no enabled admin."""
    ctx = request.app[CTX]
    req = await parse_body(request, UserUpdate)
    changes: dict[str, object] = {
        k: v for k, v in (("disabled", req.disabled), ("is_admin", req.is_admin)) if v is not None
    }
    if req.password is not None:
        changes["password_changed"] = True  # never the password itself
    note(request, changes=changes)
    user = await auth.update_user(
        ctx,
        request.match_info["user_id"],
        disabled=req.disabled,
        password=req.password,
        is_admin=req.is_admin,
    )
    note(request, f"user={user.username}", user_id=user.id)
    return web.json_response(await auth.user_with_projects(ctx, user))


# ------------------------------------------------------------------ projects


@route(
    "GET", "/api/projects", permission="self", response=ProjectList, summary="Your projects (an admin: all)"
)
async def list_projects(request: web.Request) -> web.Response:
    """With members and the caller's role in each."""
    ctx = request.app[CTX]
    p = principal_of(request)
    async with ctx.db.session() as s:
        q = select(Project).order_by(Project.name)
        if not p.is_admin:
            q = q.where(Project.id.in_(list(p.roles)))
        projects = (await s.scalars(q)).all()
        out = [await auth.project_out(s, proj, p.role_in(proj.id)) for proj in projects]
    return web.json_response({"projects": out})


@route(
    "POST",
    "/api/projects",
    permission="project:create",
    body=ProjectCreate,
    response=ProjectOut,
    status=201,
    summary="Create a project (409 when the name is taken)",
)
async def create_project(request: web.Request) -> web.Response:
    """Admins only; add members with PUT /api/projects/{project_id}/members/{user}."""
    ctx = request.app[CTX]
    req = await parse_body(request, ProjectCreate)
    proj = await auth.create_project(ctx, req.name)
    note(request, f"project={proj.name}", project_id=proj.id)
    return web.json_response({"id": proj.id, "name": proj.name, "role": "admin", "members": []}, status=201)


@route(
    "GET",
    "/api/projects/{project_id}",
    permission="project:read",
    response=ProjectOut,
    summary="A project and its members; project_id may be the name",
)
async def get_project(request: web.Request) -> web.Response:
    """404 for a project the caller is not a member of."""
    ctx = request.app[CTX]
    t = target_of(request)
    async with ctx.db.session() as s:
        proj = await s.get(Project, t.project_id)
        assert proj is not None
        return web.json_response(await auth.project_out(s, proj, principal_of(request).role_in(proj.id)))


@route(
    "PUT",
    "/api/projects/{project_id}/members/{user}",
    permission="member:manage",
    body=MemberSet,
    response=MemberOut,
    summary="Add a user to a project or change their role (manager, artist, viewer)",
)
async def set_member(request: web.Request) -> web.Response:
    """Admins and the project's managers."""
    ctx = request.app[CTX]
    req = await parse_body(request, MemberSet)
    note(request, role=req.role)
    out = await auth.set_member(
        ctx, target_of(request).project_id or "", request.match_info["user"], req.role
    )
    return web.json_response(out)


@route(
    "DELETE",
    "/api/projects/{project_id}/members/{user}",
    permission="member:manage",
    status=204,
    summary="Remove a user from a project",
)
async def remove_member(request: web.Request) -> web.Response:
    """404 when the user is not a member."""
    ctx = request.app[CTX]
    await auth.remove_member(ctx, target_of(request).project_id or "", request.match_info["user"])
    return web.Response(status=204)


# ------------------------------------------------------------------ tokens


@route(
    "GET",
    "/api/tokens",
    permission="self",
    response=TokenList,
    query={"kind": "personal (default) or agent (admins)", "all": "1: every user's personal tokens (admins)"},
    summary="Your personal API tokens (admins: agent tokens with kind=agent)",
)
async def list_tokens(request: web.Request) -> web.Response:
    """Never shows a token itself, only its record."""
    ctx = request.app[CTX]
    tokens = await auth.list_tokens(
        ctx, principal_of(request), request.query.get("kind"), request.query.get("all") in ("1", "true")
    )
    return web.json_response({"tokens": tokens})


@route(
    "POST",
    "/api/tokens",
    permission="self",
    body=TokenCreate,
    response=TokenOut,
    status=201,
    summary="Create a personal API token (for the CLI or the Blender add-on); the token is shown once",
)
async def create_token(request: web.Request) -> web.Response:
    """Named, expiring (90 days by default, at most 365), revocable."""
    ctx = request.app[CTX]
    req = await parse_body(request, TokenCreate)
    out, token = await auth.create_personal_token(ctx, principal_of(request), req.name, req.expires_days)
    note(request, f"token_id={out['id']}", name=out["name"], expires_at=out["expires_at"])
    return web.json_response({**out, "token": token}, status=201)


@route(
    "POST",
    "/api/agent-tokens",
    permission="agent-token:manage",
    body=AgentTokenCreate,
    response=TokenOut,
    status=201,
    summary="Create an agent token bound to an agent name; the token is shown once",
)
async def create_agent_token(request: web.Request) -> web.Response:
    """Admins only. The agent registers under ``agent_name`` with it, and nothing else."""
    ctx = request.app[CTX]
    req = await parse_body(request, AgentTokenCreate)
    out, token = await auth.create_agent_token(ctx, req.agent_name, principal_of(request).name, req.name)
    note(request, f"token_id={out['id']}", agent_name=req.agent_name, name=out["name"])
    return web.json_response({**out, "token": token}, status=201)


@route(
    "DELETE",
    "/api/tokens/{token_id}",
    permission="self",
    response=TokenOut,
    summary="Revoke a token: your personal token, or (admins) anyone's or an agent's",
)
async def revoke_token(request: web.Request) -> web.Response:
    """404 for a token the caller may not see."""
    ctx = request.app[CTX]
    return web.json_response(
        await auth.revoke_token(ctx, principal_of(request), request.match_info["token_id"])
    )
