"""Users, projects, memberships, logins and tokens in the database.

Every function takes the :class:`server.context.FarmContext` and raises
:class:`server.errors.ApiError` (4xx naming the field at fault) for what the caller got
wrong, so that the API and the CLI show the same messages.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from server.audit import log as audit_log
from server.auth import passwords
from server.auth.cache import TTL_S, access_cache
from server.auth.permissions import PROJECT_ROLES
from server.auth.principal import Principal
from server.auth.tokens import AccessClaims, KeyRing, TokenError, new_opaque, opaque_kind, token_hash
from server.errors import ApiError
from server.persistence.retry import run_in_tx
from server.persistence.tables import ApiToken, Membership, Project, User, new_id, utcnow

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
"""User and project names: 1-64 of letters, digits, ``_ . @ -``, not starting with a symbol."""
AGENT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
"""Agent names bound to agent tokens."""
BOOTSTRAP_ADMIN = "admin"
BOOTSTRAP_ACTION = "auth.bootstrap_admin"
"""The audit action of the first admin's creation: the first row of every farm's audit log."""
DEFAULT_PROJECT = "default"
"""The project made with the first admin."""
"""User name of the admin made on the first start."""
PERSONAL_TOKEN_DAYS = 90
"""Default life of a personal API token, in days."""
MAX_TOKEN_DAYS = 365
"""Longest life of a personal API token, in days."""
LAST_USED_EVERY_S = 60.0
"""``last_used_at`` of a token is written at most this often (seconds), not on every request."""


def keyring(ctx: Any) -> KeyRing:
    """The farm's access-token key ring (made once from the settings and kept on the context)."""
    ring = getattr(ctx, "_keyring", None)
    if ring is None:
        active, keys = ctx.settings.jwt_keyring()
        ring = KeyRing(active, keys)
        ctx._keyring = ring
    return ring


ID_LIKE_RE = re.compile(r"^[0-9a-f]{32}$")
"""What ids look like; a name may not, since routes take a name or an id."""


def check_name(value: str, what: str) -> str:
    """``value`` if it is a valid user or project name.

    Raises:
        ApiError: 400 naming ``what``: not 1-64 ASCII letters, digits or ``_ . @ -`` (not
            starting with a symbol), or 32 hex digits (an id's shape).
    """
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ApiError(
            400,
            f"{what} must be 1-64 ASCII letters, digits or _ . @ - (not starting with a symbol), "
            f"not {value!r}",
            what,
        )
    if ID_LIKE_RE.match(value):
        raise ApiError(400, f"{what} must not look like an id (32 hex digits): {value!r}", what)
    return value


def check_password(password: str, field: str = "password", username: str = "") -> None:
    """Raises ApiError 400 naming ``field`` when the password breaks the policy
    (:func:`server.auth.passwords.check_policy`)."""
    try:
        passwords.check_policy(password, username)
    except ValueError as exc:
        raise ApiError(400, str(exc), field) from None


# ------------------------------------------------------------------ users


async def find_user(s: AsyncSession, ident: str) -> User | None:
    """A user by id or user name."""
    return await s.scalar(select(User).where(or_(User.id == ident, User.username == ident)))


async def get_user(s: AsyncSession, ident: str) -> User:
    """A user by id or user name. Raises ApiError 404."""
    user = await find_user(s, ident)
    if user is None:
        raise ApiError(404, f"user {ident!r} not found", "user")
    return user


async def create_user(ctx: Any, username: str, password: str, is_admin: bool = False) -> User:
    """Create a user.

    Raises:
        ApiError: 400 for a bad name or password, 409 when the name is taken.
    """
    check_name(username, "username")
    check_password(password, username=username)
    hashed = await asyncio.to_thread(passwords.hash_password, password)

    return await _insert_named(
        ctx,
        lambda: User(username=username, password_hash=hashed, is_admin=is_admin),
        User.username,
        username,
        "user",
        "username",
    )


async def _insert_named(ctx: Any, make: Any, column: Any, name: str, what: str, field: str) -> Any:
    """Insert the row ``make()`` whose ``column`` is ``name``, unique regardless of case.

    Raises:
        ApiError: 409 naming ``field`` when the name, or one differing only by case, exists.
    """

    async def tx(s: AsyncSession) -> Any:
        same = await s.scalar(select(column).where(func.lower(column) == name.lower()))
        if same is not None:  # Alice and alice would be told apart by nobody reading a list
            raise ApiError(409, f"{what} {same!r} already exists (names differ only by case)", field)
        row = make()
        s.add(row)
        await s.flush()
        return row

    try:
        return await run_in_tx(ctx.db, tx)
    except IntegrityError:
        raise ApiError(409, f"{what} {name!r} already exists", field) from None


async def _revoke_user_tokens(s: AsyncSession, user_id: str) -> None:
    await s.execute(
        update(ApiToken)
        .where(ApiToken.user_id == user_id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )


async def update_user(
    ctx: Any,
    ident: str,
    *,
    disabled: bool | None = None,
    password: str | None = None,
    is_admin: bool | None = None,
) -> User:
    """Disable or enable a user, set their password, or change the admin flag.

    Disabling and a new password revoke every token of the user at once: their
    personal and refresh tokens are marked revoked and ``token_version`` moves on, so
    access tokens already issued stop working too.

    Raises:
        ApiError: 404 no such user; 400 a password that breaks the policy; 409 when the
            change would leave the farm with no enabled admin.
    """
    hashed = None
    if password is not None:
        check_password(password, username=ident)
        hashed = await asyncio.to_thread(passwords.hash_password, password)

    async def tx(s: AsyncSession) -> User:
        user = await get_user(s, ident)
        revoke = False
        if disabled is not None and disabled != (user.disabled_at is not None):
            user.disabled_at = utcnow() if disabled else None
            revoke = revoke or disabled
        if hashed is not None:
            user.password_hash = hashed
            revoke = True
        if is_admin is not None:
            user.is_admin = is_admin
        if revoke:
            user.token_version += 1
            await _revoke_user_tokens(s, user.id)
        await s.flush()
        admins = await s.scalar(
            select(func.count()).select_from(User).where(User.is_admin.is_(True), User.disabled_at.is_(None))
        )
        if not admins:
            raise ApiError(409, "the farm must keep at least one enabled admin", "user")
        return user

    user = await run_in_tx(ctx.db, tx)
    await access_cache(ctx).bump()
    if hashed is not None and user.username == BOOTSTRAP_ADMIN:  # the generated one is void now
        (ctx.settings.data_dir / "secrets" / "initial-admin-password").unlink(missing_ok=True)
    return user


async def change_own_password(ctx: Any, principal: Principal, current: str, new: str) -> None:
    """A user changes their own password, giving the current one (revokes their tokens).

    Raises:
        ApiError: 403 when ``current`` is wrong; 400 when ``new`` breaks the policy.
    """
    async with ctx.db.session() as s:
        user = await s.get(User, principal.user_id)
    if user is None or not await asyncio.to_thread(passwords.verify_password, user.password_hash, current):
        raise ApiError(403, "current password is wrong", "current_password")
    if new == current:
        raise ApiError(400, "the new password must differ from the current one", "new_password")
    check_password(new, "new_password", user.username)
    await update_user(ctx, user.id, password=new)


async def list_users(ctx: Any) -> list[dict[str, Any]]:
    """Every user with their memberships: ``[{id, username, is_admin, disabled, created_at, projects}]``."""
    async with ctx.db.session() as s:
        users = (await s.scalars(select(User).order_by(User.username))).all()
        rows = (
            await s.execute(
                select(Membership.user_id, Project.id, Project.name, Membership.role).join(
                    Project, Project.id == Membership.project_id
                )
            )
        ).all()
    by_user: dict[str, list[dict[str, str]]] = {}
    for user_id, pid, pname, role in rows:
        by_user.setdefault(user_id, []).append({"id": pid, "name": pname, "role": role})
    return [user_out(u, by_user.get(u.id, [])) for u in users]


async def projects_of(ctx: Any, user_id: str | None) -> list[dict[str, str]]:
    """The user's projects and roles, ``[{id, name, role}]`` by name."""
    async with ctx.db.session() as s:
        rows = (
            await s.execute(
                select(Project.id, Project.name, Membership.role)
                .join(Membership, Membership.project_id == Project.id)
                .where(Membership.user_id == user_id)
                .order_by(Project.name)
            )
        ).all()
    return [{"id": i, "name": n, "role": r} for i, n, r in rows]


async def user_with_projects(ctx: Any, user: User) -> dict[str, Any]:
    """:func:`user_out` of ``user`` with their memberships."""
    return user_out(user, await projects_of(ctx, user.id))


async def username_of(ctx: Any, user_id: str | None) -> str:
    """The user name of ``user_id`` ("" when unknown)."""
    if not user_id:
        return ""
    async with ctx.db.session() as s:
        return await s.scalar(select(User.username).where(User.id == user_id)) or ""


def user_out(u: User, projects: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """The API shape of a user (never the hash)."""
    return {
        "id": u.id,
        "username": u.username,
        "is_admin": u.is_admin,
        "disabled": u.disabled_at is not None,
        "created_at": u.created_at.isoformat() + "Z",
        "projects": sorted(projects or [], key=lambda p: p["name"]),
    }


async def bootstrap_admin(ctx: Any) -> str | None:
    """On a farm with no user, create ``admin`` with a generated password, and the project
    ``default`` with the admin as its manager.

    The password is written to ``data_dir/secrets/initial-admin-password`` (mode 0600,
    created exclusively) and returned, for the caller to print once. Several servers
    starting together make one admin: the others find the name taken.

    Returns:
        The generated password, or None when a user already existed.
    """
    async with ctx.db.session() as s:
        if await s.scalar(select(func.count()).select_from(User)):
            return None
    password = secrets.token_urlsafe(18)
    # logged first, so that the log of a farm always begins with it (see GET /api/audit/verify)
    await _system_audit(ctx, BOOTSTRAP_ACTION, f"user={BOOTSTRAP_ADMIN}")
    try:
        admin = await create_user(ctx, BOOTSTRAP_ADMIN, password, is_admin=True)
    except ApiError as exc:
        if exc.status == 409:
            return None
        raise
    try:  # a first project, so that the admin (and renderfarm up) can upload and submit at once
        project = await create_project(ctx, DEFAULT_PROJECT)
        await set_member(ctx, project.id, admin.id, "manager")
    except ApiError as exc:
        if exc.status != 409:
            raise
    folder = ctx.settings.data_dir / "secrets"
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    path = folder / "initial-admin-password"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(password + "\n")
    return password


# ------------------------------------------------------------------ projects


async def find_project(s: AsyncSession, ident: str) -> Project | None:
    """A project by id or name."""
    return await s.scalar(select(Project).where(or_(Project.id == ident, Project.name == ident)))


async def create_project(ctx: Any, name: str) -> Project:
    """Create a project. Raises ApiError 400 (bad name), 409 (taken)."""
    check_name(name, "name")
    return await _insert_named(ctx, lambda: Project(name=name), Project.name, name, "project", "name")


async def project_out(s: AsyncSession, p: Project, role: str | None = None) -> dict[str, Any]:
    """``{id, name, role, members: [{user, user_id, role}]}``."""
    rows = (
        await s.execute(
            select(User.username, User.id, Membership.role)
            .join(User, User.id == Membership.user_id)
            .where(Membership.project_id == p.id)
            .order_by(User.username)
        )
    ).all()
    return {
        "id": p.id,
        "name": p.name,
        "role": role,
        "members": [{"user": u, "user_id": uid, "role": r} for u, uid, r in rows],
    }


async def set_member(ctx: Any, project_id: str, user_ident: str, role: str) -> dict[str, str]:
    """Give ``user_ident`` (id or name) ``role`` in the project (adding or changing the membership).

    Raises:
        ApiError: 400 for a role other than manager, artist, viewer; 404 no such user.
    """
    if role not in PROJECT_ROLES:
        raise ApiError(400, f"role must be one of {', '.join(PROJECT_ROLES)}, not {role!r}", "role")

    async def tx(s: AsyncSession) -> dict[str, str]:
        user = await get_user(s, user_ident)
        m = await s.scalar(
            select(Membership).where(Membership.project_id == project_id, Membership.user_id == user.id)
        )
        if m is None:
            s.add(Membership(project_id=project_id, user_id=user.id, role=role))
        else:
            m.role = role
        return {"user": user.username, "user_id": user.id, "role": role}

    try:
        out = await run_in_tx(ctx.db, tx)
    except IntegrityError:  # a concurrent add of the same member: set the role again
        out = await run_in_tx(ctx.db, tx)
    await access_cache(ctx).bump()
    return out


async def remove_member(ctx: Any, project_id: str, user_ident: str) -> None:
    """Remove a user from a project. Raises ApiError 404 (no such user or not a member)."""

    async def tx(s: AsyncSession) -> None:
        user = await get_user(s, user_ident)
        m = await s.scalar(
            select(Membership).where(Membership.project_id == project_id, Membership.user_id == user.id)
        )
        if m is None:
            raise ApiError(404, f"user {user.username!r} is not a member of this project", "user")
        await s.delete(m)

    await run_in_tx(ctx.db, tx)
    await access_cache(ctx).bump()


# ------------------------------------------------------------------ principals


async def _user_principal(
    s: AsyncSession, user: User, token_id: str | None = None, session: str | None = None
) -> Principal:
    rows = (
        await s.execute(select(Membership.project_id, Membership.role).where(Membership.user_id == user.id))
    ).all()
    return Principal(
        kind="user",
        name=user.username,
        user_id=user.id,
        is_admin=user.is_admin,
        roles={p: r for p, r in rows},
        token_id=token_id,
        session=session,
    )


async def authenticate(ctx: Any, authorization: str | None) -> Principal:
    """The principal of an ``Authorization: Bearer <token>`` header.

    Accepts a JWT access token, a personal API token (``rfp_``) or an agent token
    (``rfa_``). Refresh tokens are not accepted here.

    Raises:
        ApiError: 401 naming what is wrong: no bearer token, malformed, expired, revoked,
            signed with an unknown key, or the user disabled.
    """
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:  # the scheme is case-insensitive (RFC 9110 11.1)
        raise ApiError(
            401, "authentication required: send Authorization: Bearer <token> (see renderfarm login)"
        )
    kind = opaque_kind(token)
    if kind == "refresh":
        raise ApiError(401, "a refresh token cannot call the API; exchange it at /api/auth/refresh")
    claims = None
    if kind is None:
        try:
            claims = keyring(ctx).verify_access(token)  # signature and expiry: on every request
        except TokenError as exc:
            raise ApiError(401, str(exc)) from None
    cache = access_cache(ctx)
    key = token_hash(token)
    epoch = await cache.epoch()  # read before resolving: a change meanwhile makes the entry stale
    hit = cache.get(key, epoch)
    if hit is not None:
        return hit
    if claims is not None:
        principal = await _jwt_principal(ctx, claims)
        cache.put(key, epoch, principal, claims.expires_at - time.time())
        return principal
    principal, expires_at = await _opaque_principal(ctx, token, kind)
    ttl = (expires_at - utcnow()).total_seconds() if expires_at is not None else TTL_S
    cache.put(key, epoch, principal, ttl)
    return principal


async def _opaque_principal(ctx: Any, token: str, kind: str) -> tuple[Principal, Any]:
    now = utcnow()
    async with ctx.db.session() as s:
        row = await s.scalar(select(ApiToken).where(ApiToken.token_hash == token_hash(token)))
        if row is None or row.kind != kind:
            raise ApiError(401, "token not recognised")
        if row.revoked_at is not None:
            raise ApiError(401, "token revoked")
        if row.expires_at is not None and row.expires_at <= now:
            raise ApiError(401, "token expired")
        if row.last_used_at is None or (now - row.last_used_at).total_seconds() > LAST_USED_EVERY_S:
            await s.execute(update(ApiToken).where(ApiToken.id == row.id).values(last_used_at=now))
            await s.commit()
        if kind == "agent":
            return Principal(kind="agent", name=row.agent_name or "", token_id=row.id), row.expires_at
        user = await s.get(User, row.user_id) if row.user_id else None
        if user is None or user.disabled_at is not None:
            raise ApiError(401, "account disabled")
        return await _user_principal(s, user, token_id=row.id), row.expires_at


async def _jwt_principal(ctx: Any, claims: AccessClaims) -> Principal:
    async with ctx.db.session() as s:
        user = await s.get(User, claims.user_id)
        if user is None or user.disabled_at is not None:
            raise ApiError(401, "account disabled")
        if user.token_version != claims.version:
            raise ApiError(401, "token revoked (the password changed or the account was disabled)")
        if claims.session:
            revoked = await s.scalar(
                select(ApiToken.id)
                .where(ApiToken.family_id == claims.session, ApiToken.revoked_at.is_not(None))
                .limit(1)
            )
            if revoked is not None:
                raise ApiError(401, "token revoked (logged out)")
        return await _user_principal(s, user, session=claims.session)


# ------------------------------------------------------------------ logins and sessions


@dataclass
class Session:
    """The tokens of a login: ``{access_token, token_type, expires_in, refresh_token}``."""

    access_token: str
    refresh_token: str
    expires_in: int

    def to_dict(self) -> dict[str, Any]:
        """The JSON body of a login or refresh."""
        return {
            "access_token": self.access_token,
            "token_type": "bearer",
            "expires_in": self.expires_in,
            "refresh_token": self.refresh_token,
        }


def _issue(ctx: Any, s: AsyncSession, user: User, family: str) -> Session:
    refresh = new_opaque("refresh")
    s.add(
        ApiToken(
            kind="refresh",
            token_hash=token_hash(refresh),
            user_id=user.id,
            family_id=family,
            name="login",
            created_by=user.username,
            expires_at=utcnow() + timedelta(seconds=ctx.settings.refresh_token_ttl_s),
        )
    )
    ttl = ctx.settings.access_token_ttl_s
    access = keyring(ctx).issue_access(user.id, user.token_version, family, ttl)
    return Session(access, refresh, int(ttl))


async def login(ctx: Any, username: str, password: str) -> tuple[Session, User]:
    """Check a user name and password and open a session (throttling is the caller's).

    Raises:
        ApiError: 401 ``wrong user name or password`` for an unknown user, a wrong
            password or a disabled account alike (nothing tells them apart).
    """
    user = None
    if NAME_RE.match(username):  # else no such user (MySQL would match "admin " to "admin")
        async with ctx.db.session() as s:
            user = await s.scalar(select(User).where(User.username == username))
    stored = user.password_hash if user is not None else None
    ok = await asyncio.to_thread(passwords.verify_password, stored, password)
    if not ok or user is None or user.disabled_at is not None:
        raise ApiError(401, "wrong user name or password")
    if passwords.needs_rehash(user.password_hash):
        rehashed = await asyncio.to_thread(passwords.hash_password, password)
        async with ctx.db.session() as s:
            await s.execute(update(User).where(User.id == user.id).values(password_hash=rehashed))
            await s.commit()

    async def tx(s: AsyncSession) -> Session:
        return _issue(ctx, s, user, new_id())

    return await run_in_tx(ctx.db, tx), user


class RefreshReuse(ApiError):
    """A refresh token presented again after it was used: its whole family is now revoked."""

    def __init__(self, user_id: str | None, family: str | None) -> None:
        super().__init__(
            401, "refresh token already used: every token of that login is revoked; log in again"
        )
        self.user_id = user_id
        self.family = family


async def refresh(ctx: Any, refresh_token: str) -> tuple[Session, User]:
    """Exchange a refresh token for a new access token and the next refresh token of its family.

    Raises:
        RefreshReuse: (401) the token was used before: the family is revoked.
        ApiError: 401 unknown, revoked or expired token, or the user disabled.
    """
    h = token_hash(refresh_token) if opaque_kind(refresh_token) == "refresh" else ""
    async with ctx.db.session() as s:
        row = await s.scalar(select(ApiToken).where(ApiToken.token_hash == h, ApiToken.kind == "refresh"))
        if row is None:
            raise ApiError(401, "refresh token not recognised", "refresh_token")
        if row.revoked_at is not None:
            raise ApiError(401, "refresh token revoked; log in again", "refresh_token")
        if row.expires_at is not None and row.expires_at <= utcnow():
            raise ApiError(401, "refresh token expired; log in again", "refresh_token")
        # mark used only if nobody did before: of two concurrent uses, one wins, one is a reuse
        res = await s.execute(
            update(ApiToken).where(ApiToken.id == row.id, ApiToken.used_at.is_(None)).values(used_at=utcnow())
        )
        if res.rowcount != 1:  # type: ignore[attr-defined]
            await _revoke_family(s, row.family_id)
            await s.commit()
            await access_cache(ctx).bump()
            raise RefreshReuse(row.user_id, row.family_id)
        user = await s.get(User, row.user_id)
        if user is None or user.disabled_at is not None:
            await s.rollback()
            raise ApiError(401, "account disabled", "refresh_token")
        session = _issue(ctx, s, user, row.family_id or new_id())
        await s.commit()
        return session, user


async def _revoke_family(s: Any, family: str) -> None:
    """Revoke every token of one login (its refresh family: refresh and access tokens), uncommitted."""
    await s.execute(
        update(ApiToken)
        .where(ApiToken.family_id == family, ApiToken.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )


async def logout(ctx: Any, principal: Principal, refresh_token: str | None) -> None:
    """End a login: revoke the refresh family of ``refresh_token`` (or of the calling access token)."""
    async with ctx.db.session() as s:
        family = principal.session
        if refresh_token:
            row = await s.scalar(select(ApiToken).where(ApiToken.token_hash == token_hash(refresh_token)))
            if row is not None and row.user_id == principal.user_id:
                family = row.family_id
        if family:
            await _revoke_family(s, family)
            await s.commit()
            await access_cache(ctx).bump()


async def logout_refresh(ctx: Any, refresh_token: str) -> tuple[str | None, str | None]:
    """End the login (refresh family) that ``refresh_token`` belongs to, whatever the token's
    state (used, revoked or expired): holding one of its tokens is proof enough to end a login,
    never to extend it.

    Returns:
        ``(user_id, family)`` of the login ended, or ``(None, None)`` when the token is not a
        known refresh token.
    """
    if opaque_kind(refresh_token) != "refresh":
        return None, None
    async with ctx.db.session() as s:
        h = token_hash(refresh_token)
        row = await s.scalar(select(ApiToken).where(ApiToken.token_hash == h, ApiToken.kind == "refresh"))
        if row is None or not row.family_id:
            return None, None
        user_id, family = row.user_id, row.family_id
        await _revoke_family(s, family)
        await s.commit()
    await access_cache(ctx).bump()
    return user_id, family


# ------------------------------------------------------------------ personal and agent tokens


def token_out(t: ApiToken, username: str | None = None) -> dict[str, Any]:
    """The API shape of a token (never the token itself)."""

    def iso(d: Any) -> str | None:
        return d.isoformat() + "Z" if d is not None else None

    return {
        "id": t.id,
        "kind": t.kind,
        "name": t.name,
        "agent_name": t.agent_name,
        "user": username,
        "created_by": t.created_by,
        "created_at": iso(t.created_at),
        "expires_at": iso(t.expires_at),
        "last_used_at": iso(t.last_used_at),
        "revoked_at": iso(t.revoked_at),
    }


async def create_personal_token(
    ctx: Any, principal: Principal, name: str, expires_days: float | None = PERSONAL_TOKEN_DAYS
) -> tuple[dict[str, Any], str]:
    """A named personal API token of the calling user. Returns ``(token row as dict, token)``.

    Raises:
        ApiError: 400 for an empty or long name, or a life outside (0, 365] days.
    """
    if not name.strip() or len(name) > 255:
        raise ApiError(400, "name must be 1-255 characters", "name")
    if expires_days is None or not 1 / 24 <= expires_days <= MAX_TOKEN_DAYS:
        raise ApiError(400, f"expires_days must be from 1/24 (an hour) to {MAX_TOKEN_DAYS}", "expires_days")
    token = new_opaque("personal")
    row = ApiToken(
        kind="personal",
        token_hash=token_hash(token),
        user_id=principal.user_id,
        name=name,
        created_by=principal.name,
        expires_at=utcnow() + timedelta(days=expires_days),
    )

    async def tx(s: AsyncSession) -> None:
        s.add(row)

    await run_in_tx(ctx.db, tx)
    return token_out(row, principal.name), token


async def create_agent_token(
    ctx: Any, agent_name: str, created_by: str, name: str = ""
) -> tuple[dict[str, Any], str]:
    """An agent token bound to ``agent_name`` (the agent registers under that name only).

    Raises:
        ApiError: 400 for a bad agent name.
    """
    if not isinstance(agent_name, str) or not AGENT_NAME_RE.match(agent_name):
        raise ApiError(
            400, f"agent_name must be 1-128 letters, digits or _ . -, not {agent_name!r}", "agent_name"
        )
    token = new_opaque("agent")
    row = ApiToken(
        kind="agent",
        token_hash=token_hash(token),
        agent_name=agent_name,
        name=name or f"agent {agent_name}",
        created_by=created_by,
    )

    async def tx(s: AsyncSession) -> None:
        twin = await s.scalar(
            select(ApiToken.agent_name).where(
                ApiToken.kind == "agent",
                func.lower(ApiToken.agent_name) == agent_name.lower(),
                ApiToken.agent_name != agent_name,
            )
        )
        if twin is not None:  # node01 and Node01 would be two agents nobody tells apart
            raise ApiError(409, f"agent {twin!r} exists: names may not differ only by case", "agent_name")
        s.add(row)

    await run_in_tx(ctx.db, tx)
    return token_out(row), token


async def list_tokens(
    ctx: Any, principal: Principal, kind: str | None = None, all_users: bool = False
) -> list[dict]:
    """Tokens the caller may see: their own personal tokens; an admin also every agent token
    (``kind="agent"``) and, with ``all_users``, everyone's personal tokens. Refresh tokens are not listed."""
    q = (
        select(ApiToken, User.username)
        .outerjoin(User, User.id == ApiToken.user_id)
        .order_by(ApiToken.created_at)
    )
    if kind == "agent":
        if not principal.is_admin:
            raise ApiError(403, "only an admin lists agent tokens", "kind")
        q = q.where(ApiToken.kind == "agent")
    elif kind in (None, "personal"):
        q = q.where(ApiToken.kind == "personal")
        if all_users and not principal.is_admin:
            raise ApiError(403, "only an admin lists every user's tokens", "all")
        if not all_users:
            q = q.where(ApiToken.user_id == principal.user_id)
    else:
        raise ApiError(400, f"kind must be personal or agent, not {kind!r}", "kind")
    async with ctx.db.session() as s:
        rows = (await s.execute(q)).all()
    return [token_out(t, u) for t, u in rows]


async def revoke_token(ctx: Any, principal: Principal, token_id: str) -> dict[str, Any]:
    """Revoke a personal token (the owner's or, for an admin, anyone's) or an agent token (admin).

    Raises:
        ApiError: 404 when there is no such token the caller may see (another user's
            token answers 404 too).
    """
    async with ctx.db.session() as s:
        row = await s.get(ApiToken, token_id)
        mine = row is not None and row.kind == "personal" and row.user_id == principal.user_id
        if row is None or row.kind == "refresh" or not (mine or principal.is_admin):
            raise ApiError(404, f"token {token_id!r} not found", "token_id")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            await s.commit()
            await access_cache(ctx).bump()
        return token_out(row)


async def _system_audit(ctx: Any, action: str, target: str, **detail: Any) -> None:
    """An audit row for what the farm does by itself (no request): first admin, local tokens."""
    await audit_log.record(
        ctx,
        action=action,
        outcome="success",
        actor="renderfarm",
        actor_kind="system",
        target=target,
        detail=detail,
    )


LOCAL = "renderfarm (local)"
"""``created_by`` of the tokens an embedded farm makes for itself."""


async def local_agent_token(ctx: Any, agent_name: str) -> str:
    """A fresh token for an in-process agent of an embedded farm; the farm's earlier ones for
    that agent are revoked (so restarts do not pile up live tokens)."""
    async with ctx.db.session() as s:
        await s.execute(
            update(ApiToken)
            .where(
                ApiToken.kind == "agent",
                ApiToken.agent_name == agent_name,
                ApiToken.created_by == LOCAL,
                ApiToken.revoked_at.is_(None),
            )
            .values(revoked_at=utcnow())
        )
        await s.commit()
    await access_cache(ctx).bump()
    out, token = await create_agent_token(ctx, agent_name, LOCAL, f"local agent {agent_name}")
    await _system_audit(ctx, "auth.local_agent_token", f"token_id={out['id']}", agent_name=agent_name)
    return token


async def local_admin_token(ctx: Any, name: str, days: float = 30) -> str:
    """A personal token of the first enabled admin, for the embedded farm's own CLI use
    (``renderfarm up`` and ``renderfarm demo`` submit with it, no login needed).

    Raises:
        ApiError: 409 when the farm has no enabled admin.
    """
    async with ctx.db.session() as s:
        admin = await s.scalar(
            select(User)
            .where(User.is_admin.is_(True), User.disabled_at.is_(None))
            .order_by(User.created_at)
            .limit(1)
        )
        if admin is None:
            raise ApiError(409, "the farm has no enabled admin")
        principal = await _user_principal(s, admin)
    out, token = await create_personal_token(ctx, principal, name, days)
    await _system_audit(
        ctx, "auth.local_admin_token", f"token_id={out['id']}", user=principal.name, name=name
    )
    return token
