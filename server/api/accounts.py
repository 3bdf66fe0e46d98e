"""``/api/auth``, ``/api/me``, ``/api/users``, ``/api/projects``, ``/api/tokens``: accounts and access."""

from __future__ import annotations

import ipaddress
import math
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel
from sqlalchemy import select

from server.api.access import PRINCIPAL, client_ip, note, principal_of, record, target_of
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
from server.api.middleware import CTX, error_response, parse_body
from server.api.registry import route
from server.audit import log as audit_log
from server.auth import service as auth
from server.auth.principal import Principal
from server.auth.throttle import login_gate
from server.auth.tokens import opaque_kind
from server.errors import ApiError
from server.persistence.tables import Project

M = TypeVar("M", bound=BaseModel)

LOGIN_ACTION = "auth.login"
"""Audit action of login attempts (and of wrong current passwords on a password change)."""

REFRESH_COOKIE = "rf_refresh"
"""The cookie that holds the refresh token of a login made with ``"cookie": true`` (the web UI)."""
COOKIE_PATH = "/api/auth"
"""The cookie's ``Path``: the browser sends it to the refresh and logout routes only."""
CSRF_HEADER = "X-Requested-With"
CSRF_VALUE = "renderfarm"
"""The header (and its value) a request authenticated by the cookie must carry: a cross-site
form or a simple cross-site ``fetch`` cannot set it (a custom header needs a CORS preflight,
which this server never grants)."""


# ------------------------------------------------------------------ the refresh cookie


def is_https(request: web.Request) -> bool:
    """Whether the client reached the farm over https.

    True when the connection itself is TLS (``request.secure``), or when the peer is one of
    the ``trusted_proxies`` (settings, as for the client's address) and the first value of
    its ``X-Forwarded-Proto`` is ``https`` (the scheme the client used at the outermost proxy).
    """
    if request.secure:
        return True
    networks = request.app[CTX].settings.proxy_networks()
    if not networks:
        return False
    try:
        peer = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return False
    if not any(peer in n for n in networks):
        return False
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return proto == "https"


def own_origin(request: web.Request) -> str:
    """This server's origin as the browser sees it: ``scheme://host[:port]`` (lower case)."""
    return f"{'https' if is_https(request) else 'http'}://{request.host}".lower()


def check_cookie_csrf(request: web.Request) -> None:
    """Refuse a cookie-authenticated request that a page of another site could have sent.

    Raises:
        ApiError: 403 when ``X-Requested-With: renderfarm`` is missing, or when an ``Origin``
            header is present and is not :func:`own_origin` (the scheme counts: an
            ``https://`` page is not this ``http://`` server, nor the reverse).
    """
    if request.headers.get(CSRF_HEADER) != CSRF_VALUE:
        raise ApiError(
            403,
            f"a request authenticated by the {REFRESH_COOKIE} cookie must send the header "
            f"{CSRF_HEADER}: {CSRF_VALUE} (cross-site request forgery defence)",
        )
    origin = request.headers.get("Origin")
    if origin is not None and origin.rstrip("/").lower() != own_origin(request):
        raise ApiError(
            403,
            f"cross-origin request from {origin!r} refused: the {REFRESH_COOKIE} cookie is only "
            f"accepted from {own_origin(request)!r}",
        )


def set_refresh_cookie(resp: web.StreamResponse, request: web.Request, token: str) -> None:
    """Put ``token`` in the ``rf_refresh`` cookie of ``resp``: ``HttpOnly``, ``SameSite=Strict``,
    ``Path=/api/auth``, ``Max-Age`` = the refresh token's life in seconds (``refresh_token_ttl_s``),
    ``Secure`` when the request came over https (:func:`is_https`)."""
    resp.set_cookie(
        REFRESH_COOKIE,
        token,
        max_age=int(request.app[CTX].settings.refresh_token_ttl_s),
        path=COOKIE_PATH,
        httponly=True,
        samesite="Strict",
        secure=is_https(request),
    )


def clear_refresh_cookie(resp: web.StreamResponse, request: web.Request) -> None:
    """Make the browser drop the ``rf_refresh`` cookie (``Max-Age=0``, same attributes)."""
    resp.set_cookie(
        REFRESH_COOKIE,
        "",
        max_age=0,
        expires="Thu, 01 Jan 1970 00:00:00 GMT",
        path=COOKIE_PATH,
        httponly=True,
        samesite="Strict",
        secure=is_https(request),
    )


async def optional_body(request: web.Request, model: type[M]) -> M:
    """:func:`parse_body`, or ``model()`` (its defaults) when the request has no body at all.

    Raises:
        ApiError: as :func:`parse_body` for a body that is sent.
    """
    if not request.body_exists:
        return model()
    return await parse_body(request, model)


@route(
    "POST",
    "/api/auth/login",
    permission="public",
    body=LoginRequest,
    response=SessionOut,
    summary="Log in with a user name and password: an access token (15 min) and a refresh token "
    '(with "cookie": true the refresh token is set as the HttpOnly cookie rf_refresh instead)',
    also={429: "too many failed logins for this account or address: retry after Retry-After seconds"},
    audit=False,
)
async def login(request: web.Request) -> web.Response:
    """Throttled per account and per client address, from the audit log's failed logins.

    With ``"cookie": true`` the body's ``refresh_token`` is null and the token is set as the
    ``rf_refresh`` cookie (:func:`set_refresh_cookie`), for a browser page that must not hold it.
    """
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
    return session_response(request, session, req.cookie)


def session_response(request: web.Request, session: auth.Session, cookie: bool) -> web.Response:
    """The JSON answer of a login or refresh; with ``cookie``, the refresh token goes in the
    ``rf_refresh`` cookie and the body's ``refresh_token`` is null."""
    body = session.to_dict()
    if not cookie:
        return web.json_response(body)
    resp = web.json_response({**body, "refresh_token": None}, headers={"Cache-Control": "no-store"})
    set_refresh_cookie(resp, request, session.refresh_token)
    return resp


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
    summary="Exchange a refresh token for new tokens; a refresh token used twice revokes its login. "
    "Without refresh_token in the body the rf_refresh cookie is used (send X-Requested-With: renderfarm)",
    also={403: "cookie used without X-Requested-With: renderfarm, or from another origin"},
    audit=False,
)
async def refresh(request: web.Request) -> web.Response:
    """Rotation: the answer carries the next refresh token; the one sent is spent.

    Without ``refresh_token`` in the body (or with no body), the ``rf_refresh`` cookie is the
    refresh token: the request must pass :func:`check_cookie_csrf`, the next token is set as
    the cookie (the body's ``refresh_token`` is null), and a refused cookie is cleared.
    """
    ctx = request.app[CTX]
    req = await optional_body(request, RefreshRequest)
    token = req.refresh_token
    via_cookie = token is None
    if token is None:
        token = request.cookies.get(REFRESH_COOKIE)
        if not token:
            raise ApiError(
                400,
                f"send refresh_token in the body, or the {REFRESH_COOKIE} cookie (log in with "
                '"cookie": true)',
                "refresh_token",
            )
        try:
            check_cookie_csrf(request)
        except ApiError as exc:
            await record(
                ctx,
                request,
                action="auth.refresh",
                outcome="denied",
                status=exc.status,
                detail={"message": exc.message, "cookie": True},
            )
            raise
    try:
        session, user = await auth.refresh(ctx, token)
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
        return _refused(request, exc, via_cookie)
    except ApiError as exc:
        await record(
            ctx,
            request,
            action="auth.refresh",
            outcome="denied",
            status=exc.status,
            detail={"message": exc.message},
        )
        return _refused(request, exc, via_cookie)
    await record(
        ctx,
        request,
        action="auth.refresh",
        outcome="success",
        actor=user.username,
        actor_kind="user",
        status=200,
    )
    return session_response(request, session, via_cookie)


def _refused(request: web.Request, exc: ApiError, via_cookie: bool) -> web.Response:
    """Raise ``exc`` for a body token; for the cookie, answer it and clear the dead cookie."""
    if not via_cookie:
        raise exc
    resp = error_response(exc)
    clear_refresh_cookie(resp, request)
    return resp


@route(
    "POST",
    "/api/auth/logout",
    permission="public",
    body=LogoutRequest,
    status=204,
    summary="End a login: its refresh token and the access tokens it issued stop working. Send the "
    "access token (Authorization: Bearer), or only the rf_refresh cookie with X-Requested-With: "
    "renderfarm; the cookie is cleared",
    also={
        400: "nothing names a login to end (no bearer token and no rf_refresh cookie), or an agent token",
        401: "the bearer token is not valid, or a refresh_token sent without it",
        403: "cookie used without X-Requested-With: renderfarm, or from another origin",
    },
)
async def logout(request: web.Request) -> web.Response:
    """Revokes the refresh family named, and clears the ``rf_refresh`` cookie (``Max-Age=0``).

    Public in the route table, since the cookie alone may end its login; who is logged out is
    decided here:

    * with a bearer token: the family of the body's ``refresh_token`` if it is the caller's,
      else the calling access token's (as before), and the cookie's login if it is the caller's;
    * with no bearer token (or one no longer valid, e.g. an expired access token) and no body
      token: the login of the ``rf_refresh`` cookie, after :func:`check_cookie_csrf`.

    Raises:
        ApiError: 400 nothing to end, or an agent token; 401 a bad bearer token and no cookie
            to fall back on, or a body ``refresh_token`` without a bearer token; 403 the cookie
            path's CSRF checks.
    """
    ctx = request.app[CTX]
    req = await optional_body(request, LogoutRequest)
    cookie = request.cookies.get(REFRESH_COOKIE) or None
    if cookie is not None and opaque_kind(cookie) != "refresh":
        cookie = None  # not a refresh token: nothing a logout could end with it
    p: Principal | None = None
    authorization = request.headers.get("Authorization")
    if authorization is not None:
        try:
            p = await auth.authenticate(ctx, authorization)
        except ApiError:
            if cookie is None or req.refresh_token:
                raise
    if p is not None:
        request[PRINCIPAL] = p
        if p.kind != "user":
            raise ApiError(400, "an agent token has no login to end (an admin revokes agent tokens)")
        await auth.logout(ctx, p, req.refresh_token)
        if cookie is not None and not req.refresh_token:
            await auth.logout(ctx, p, cookie)  # the cookie's login too, when it is the caller's
    elif req.refresh_token:
        raise ApiError(
            401, "authentication required: send the access token (Authorization: Bearer) with refresh_token"
        )
    elif cookie is not None:
        check_cookie_csrf(request)
        user_id, family = await auth.logout_refresh(ctx, cookie)
        if user_id is not None:
            name = await auth.username_of(ctx, user_id)
            request[PRINCIPAL] = Principal(kind="user", name=name, user_id=user_id)
            note(request, f"family={family}", cookie=True)
    else:
        raise ApiError(
            400,
            f"no login to end: send the access token (Authorization: Bearer), or the {REFRESH_COOKIE} "
            f"cookie with {CSRF_HEADER}: {CSRF_VALUE}",
        )
    resp = web.Response(status=204)
    clear_refresh_cookie(resp, request)
    return resp


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
