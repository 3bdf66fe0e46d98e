"""Tokens, sessions, throttling and lockout, against a running farm over HTTP.

Access tokens forged or stale in every way we know are refused; refresh tokens rotate
and a reused one revokes its login; personal and agent tokens are shown once, revocable
and expiring; logins are throttled per account and per address; disabling a user or
changing a password ends every token at once; the first start makes one admin with a
generated password; the audit log's hash chain shows a changed row.
"""

from __future__ import annotations

import asyncio
import base64
import json
import stat
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jwt
import pytest
from sqlalchemy import func, select, update

from cli.client import FarmClient
from cli.farm import free_port, running_farm
from server.api.registry import ROUTES
from server.audit import log as audit_log
from server.auth import service as auth
from server.auth.tokens import token_hash
from server.persistence.tables import ApiToken, AuditEntry, User, utcnow
from tests.conftest import Farm, farm_settings
from tests.test_rbac import Reply, call

pytestmark = pytest.mark.asyncio

PASSWORD = "auth-password-0123"
NEW_PASSWORD = "auth-password-4567"
NEWER_PASSWORD = "auth-password-89ab"


async def make_user(farm: Farm, name: str, password: str = PASSWORD) -> str:
    """Create a user as the admin; returns its id."""
    r = await call(farm, "POST", "/api/users", farm.token, json={"username": name, "password": password})
    assert r.status == 201, r.body
    return r.body["id"]


async def login(farm: Farm, name: str, password: str = PASSWORD) -> Reply:
    """POST /api/auth/login."""
    return await call(farm, "POST", "/api/auth/login", json={"username": name, "password": password})


async def session(farm: Farm, name: str, password: str = PASSWORD) -> dict[str, Any]:
    """A successful login's body: ``{access_token, refresh_token, ...}``."""
    r = await login(farm, name, password)
    assert r.status == 200, r.body
    return r.body


async def refresh(farm: Farm, refresh_token: str) -> Reply:
    """POST /api/auth/refresh."""
    return await call(farm, "POST", "/api/auth/refresh", json={"refresh_token": refresh_token})


async def me(farm: Farm, token: str) -> int:
    """The status of GET /api/me with ``token``; a refusal must be a JSON 401/403 body."""
    r = await call(farm, "GET", "/api/me", token)
    if r.status != 200:
        assert r.body["error"]["status"] == r.status and r.body["error"]["message"], r.body
    return r.status


async def personal_token(farm: Farm, bearer: str, name: str = "cli") -> dict[str, Any]:
    """POST /api/tokens: ``{id, name, token, expires_at, ...}``."""
    r = await call(farm, "POST", "/api/tokens", bearer, json={"name": name})
    assert r.status == 201, r.body
    return r.body


def b64(value: dict[str, Any] | bytes) -> str:
    """Base64url without padding of JSON (a dict) or bytes, as in a JWT."""
    raw = value if isinstance(value, bytes) else json.dumps(value, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


async def audit_rows(farm: Farm, **where: Any) -> list[AuditEntry]:
    """Audit rows whose columns equal ``where``, oldest first."""
    async with farm.ctx.db.session() as s:
        q = select(AuditEntry).order_by(AuditEntry.seq)
        for k, v in where.items():
            q = q.where(getattr(AuditEntry, k) == v)
        return list((await s.scalars(q)).all())


# ------------------------------------------------------------------ access tokens


@pytest.mark.agents(0)
@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # HS512 with a 256-bit key
async def test_forged_expired_and_stale_access_tokens_are_refused(farm: Farm) -> None:
    uid = await make_user(farm, "alice")
    good = (await session(farm, "alice"))["access_token"]
    assert await me(farm, good) == 200
    claims = jwt.decode(good, options={"verify_signature": False})
    assert claims["sub"] == uid and claims["typ"] == "access"
    ring = auth.keyring(farm.ctx)
    kid, key = ring.active, ring.keys[ring.active]
    assert jwt.get_unverified_header(good)["kid"] == kid
    admin_id = (await call(farm, "GET", "/api/me", farm.token)).body["id"]
    now = int(time.time())

    def signed(c: dict[str, Any], secret: str = key, **kw: Any) -> str:
        kw.setdefault("headers", {"kid": kid})
        kw.setdefault("algorithm", "HS256")
        return jwt.encode(c, secret, **kw)

    # what we craft with the farm's own key is accepted, so each refusal below is about the change made
    assert await me(farm, signed(claims)) == 200
    head, payload, sig = good.split(".")
    other = "an-attacker-secret-that-is-long-enough"
    forged = {
        "alg none (PyJWT)": jwt.encode(claims, None, algorithm="none", headers={"kid": kid}),
        "alg none by hand": f"{b64({'alg': 'none', 'typ': 'JWT', 'kid': kid})}.{b64(claims)}.",
        "alg None by hand, signature kept": f"{b64({'alg': 'None', 'kid': kid})}.{b64(claims)}.{sig}",
        "alg none, no kid": f"{b64({'alg': 'none'})}.{b64(claims)}.",
        "wrong key, the farm's kid": signed(claims, other),
        "wrong key, no kid": jwt.encode(claims, other, algorithm="HS256"),
        "wrong key, unknown kid": signed(claims, other, headers={"kid": "attacker"}),
        "the farm's key under an unknown kid": signed(claims, headers={"kid": "attacker"}),
        "HS512 with the farm's key": signed(claims, algorithm="HS512"),
        "expired": signed({**claims, "iat": now - 3600, "exp": now - 60}),
        "expired (issued by the farm's key ring)": ring.issue_access(uid, claims["ver"], claims["sid"], -60),
        "no exp": signed({k: v for k, v in claims.items() if k != "exp"}),
        "another issuer": signed({**claims, "iss": "someone-else"}),
        "not an access token": signed({**claims, "typ": "refresh"}),
        "tampered payload: the admin's id": f"{head}.{b64({**claims, 'sub': admin_id})}.{sig}",
        "tampered payload: later expiry": f"{head}.{b64({**claims, 'exp': now + 10**6})}.{sig}",
        "tampered header: other kid": f"{b64({'alg': 'HS256', 'typ': 'JWT', 'kid': 'x'})}.{payload}.{sig}",
        "truncated signature": good[:-4],
        "not a JWT": "not-a-token",
        "a user that does not exist": signed({**claims, "sub": "0" * 32}),
    }
    denied_before = len(await audit_rows(farm, outcome="denied", status=401))
    refused = {name: await me(farm, token) for name, token in forged.items()}
    assert refused == dict.fromkeys(forged, 401)
    for header in ("", "Bearer", "Bearer ", f"Basic {good}", f"bearer{good}", good):
        r = await call(farm, "GET", "/api/me", headers={"Authorization": header} if header else {})
        assert r.status == 401, (header, r.body)
    denied = await audit_rows(farm, outcome="denied", status=401)
    assert len(denied) - denied_before >= len(forged), "every refused token is audited"

    # a token of an older token_version: the password changed since it was issued
    r = await call(farm, "PATCH", "/api/users/alice", farm.token, json={"password": NEW_PASSWORD})
    assert r.status == 200, r.body
    assert await me(farm, good) == 401
    later = ring.issue_access(uid, claims["ver"], "", 600)  # the old ver, signed by the farm, no session
    assert await me(farm, later) == 401
    fresh = (await session(farm, "alice", NEW_PASSWORD))["access_token"]
    assert await me(farm, fresh) == 200
    assert jwt.decode(fresh, options={"verify_signature": False})["ver"] > claims["ver"]


# ------------------------------------------------------------------ refresh tokens and logout


@pytest.mark.agents(0)
async def test_refresh_rotation_reuse_and_logout(farm: Farm) -> None:
    await make_user(farm, "bob")
    await make_user(farm, "carol")
    first = await session(farm, "bob")
    assert first["token_type"] == "bearer" and first["refresh_token"].startswith("rfr_")
    r = await refresh(farm, first["refresh_token"])
    assert r.status == 200, r.body
    second = r.body
    assert second["refresh_token"] != first["refresh_token"]
    assert await me(farm, second["access_token"]) == 200
    other = await session(farm, "bob")  # another login of the same user

    # the spent refresh token again: 401, and its whole login is revoked
    r = await refresh(farm, first["refresh_token"])
    assert r.status == 401, r.body
    assert (await refresh(farm, second["refresh_token"])).status == 401
    assert await me(farm, first["access_token"]) == 401
    assert await me(farm, second["access_token"]) == 401
    reuse = await audit_rows(farm, action="auth.refresh_reuse")
    assert reuse and reuse[-1].outcome == "denied", reuse
    # ... but not the other login
    assert await me(farm, other["access_token"]) == 200
    r = await refresh(farm, other["refresh_token"])
    assert r.status == 200, r.body
    other = r.body

    # refresh tokens are no bearer tokens, access tokens no refresh tokens
    assert await me(farm, other["refresh_token"]) == 401
    assert (await refresh(farm, other["access_token"])).status in (400, 401)
    assert (await refresh(farm, "rfr_" + "A" * 43)).status == 401
    assert await me(farm, other["access_token"]) == 200

    # logout naming the refresh token
    s = await session(farm, "bob")
    r = await call(
        farm, "POST", "/api/auth/logout", s["access_token"], json={"refresh_token": s["refresh_token"]}
    )
    assert r.status == 204
    assert (await refresh(farm, s["refresh_token"])).status == 401
    assert await me(farm, s["access_token"]) == 401
    # logout with the access token alone ends its own login
    s = await session(farm, "bob")
    r = await call(farm, "POST", "/api/auth/logout", s["access_token"], json={})
    assert r.status == 204
    assert await me(farm, s["access_token"]) == 401
    assert (await refresh(farm, s["refresh_token"])).status == 401
    # another user's refresh token in bob's logout ends nothing of theirs
    c = await session(farm, "carol")
    s = await session(farm, "bob")
    r = await call(
        farm, "POST", "/api/auth/logout", s["access_token"], json={"refresh_token": c["refresh_token"]}
    )
    assert r.status == 204
    assert await me(farm, c["access_token"]) == 200
    assert (await refresh(farm, c["refresh_token"])).status == 200
    # and none of that touched bob's remaining login
    assert await me(farm, other["access_token"]) == 200

    # the same refresh token twice at once: one wins, and the other's reuse revokes the winner's login too
    race = await session(farm, "bob")
    replies = await asyncio.gather(*(refresh(farm, race["refresh_token"]) for _ in range(2)))
    assert sorted(r.status for r in replies) == [200, 401], [r.body for r in replies]
    [winner] = [r.body for r in replies if r.status == 200]
    assert (await refresh(farm, winner["refresh_token"])).status == 401
    assert await me(farm, winner["access_token"]) == 401


# ------------------------------------------------------------------ personal and agent tokens


@pytest.mark.agents(0)
async def test_personal_tokens_shown_once_revoked_and_expiring(farm: Farm) -> None:
    await make_user(farm, "pat")
    await make_user(farm, "eve")
    access = (await session(farm, "pat"))["access_token"]
    made = await personal_token(farm, access)
    token = made["token"]
    assert token.startswith("rfp_")
    assert await me(farm, token) == 200

    r = await call(farm, "GET", "/api/tokens", access)
    assert r.status == 200
    [listed] = [t for t in r.body["tokens"] if t["id"] == made["id"]]
    assert listed.get("token") is None and token not in json.dumps(r.body)
    async with farm.ctx.db.session() as s:
        row = await s.get(ApiToken, made["id"])
        assert row is not None and row.token_hash == token_hash(token)
        assert token not in json.dumps(
            {c.name: str(getattr(row, c.name)) for c in ApiToken.__table__.columns}
        )

    # another user cannot see or revoke it
    eve = (await session(farm, "eve"))["access_token"]
    r = await call(farm, "DELETE", f"/api/tokens/{made['id']}", eve)
    assert r.status == 404, r.body
    r = await call(farm, "GET", "/api/tokens", eve)
    assert made["id"] not in {t["id"] for t in r.body["tokens"]}
    assert await me(farm, token) == 200

    r = await call(farm, "DELETE", f"/api/tokens/{made['id']}", access)
    assert r.status == 200 and r.body["revoked_at"], r.body
    assert await me(farm, token) == 401

    # expired: set in the past in the database before its first use ...
    stale = await personal_token(farm, access, "stale")
    async with farm.ctx.db.session() as s:
        await s.execute(
            update(ApiToken)
            .where(ApiToken.id == stale["id"])
            .values(expires_at=utcnow() - timedelta(minutes=1))
        )
        await s.commit()
    assert await me(farm, stale["token"]) == 401
    # ... and one that expires while in use (a principal is not reused past its token's expiry)
    short = await personal_token(farm, access, "short")  # the shortest life asked for is an hour ...
    async with farm.ctx.db.session() as s:  # ... so make it end in 2 s, before its first use
        await s.execute(
            update(ApiToken)
            .where(ApiToken.id == short["id"])
            .values(expires_at=utcnow() + timedelta(seconds=2))
        )
        await s.commit()
    assert await me(farm, short["token"]) == 200
    await asyncio.sleep(2.5)
    assert await me(farm, short["token"]) == 401

    for days in (0, -1, 366, 1e-300, 0.01, True):
        r = await call(farm, "POST", "/api/tokens", access, json={"name": "x", "expires_days": days})
        assert r.status == 400, (days, r.body)


@pytest.mark.agents(0)
async def test_agent_tokens_bound_to_a_name_and_revocable(farm: Farm) -> None:
    r = await call(farm, "POST", "/api/agent-tokens", farm.token, json={"agent_name": "node-1"})
    assert r.status == 201, r.body
    token, token_id = r.body["token"], r.body["id"]
    assert token.startswith("rfa_")
    r = await call(farm, "POST", "/api/agent/register", token, json={"name": "node-2"})
    assert r.status == 403, r.body
    r = await call(farm, "POST", "/api/agent/register", token, json={"name": "node-1"})
    assert r.status == 200, r.body
    r = await call(farm, "POST", "/api/agent/heartbeat", token, json={"name": "node-2"})
    assert r.status == 403, r.body
    r = await call(farm, "POST", "/api/agent/heartbeat", token, json={})
    assert r.status == 200, r.body
    r = await call(farm, "GET", "/api/agents", farm.token)
    assert [a["name"] for a in r.body["agents"]] == ["node-1"]

    # a user who is not an admin neither sees nor revokes it
    await make_user(farm, "ned")
    ned = (await session(farm, "ned"))["access_token"]
    assert (await call(farm, "DELETE", f"/api/tokens/{token_id}", ned)).status == 404
    assert (await call(farm, "GET", "/api/tokens?kind=agent", ned)).status == 403
    r = await call(farm, "GET", "/api/tokens?kind=agent", farm.token)
    assert token_id in {t["id"] for t in r.body["tokens"]} and token not in json.dumps(r.body)

    r = await call(farm, "DELETE", f"/api/tokens/{token_id}", farm.token)
    assert r.status == 200, r.body
    r = await call(farm, "POST", "/api/agent/register", token, json={})
    assert r.status == 401, r.body
    r = await call(farm, "POST", "/api/agent/heartbeat", token, json={})
    assert r.status == 401, r.body


# ------------------------------------------------------------------ login throttling


@pytest.mark.agents(0)
async def test_login_throttled_per_account(farm: Farm) -> None:
    s = farm.settings
    assert (s.login_max_failures, s.login_max_failures_ip, s.login_window_s) == (5, 20, 900)
    await make_user(farm, "victim")
    await make_user(farm, "bystander")
    wrong = await login(farm, "victim", "not-the-password")
    unknown = await login(farm, "no-such-user", "not-the-password")
    assert wrong.status == unknown.status == 401 and wrong.body == unknown.body  # nothing tells them apart
    for _ in range(4):
        assert (await login(farm, "victim", "not-the-password")).status == 401
    r = await login(farm, "victim")  # the 6th attempt, with the right password
    assert r.status == 429, r.body
    assert r.body["error"]["status"] == 429 and "access_token" not in r.body
    retry = r.headers.get("Retry-After", "")
    assert retry.isdigit() and 0 < int(retry) <= s.login_window_s, retry
    assert (await login(farm, "victim", "not-the-password")).status == 429
    # another account is not affected (6 failures from this address, under the limit of 20)
    assert (await login(farm, "bystander")).status == 200

    rows = await audit_rows(farm, action="auth.login")
    by = {(e.actor, e.outcome) for e in rows}
    assert {("victim", "failure"), ("victim", "throttled"), ("bystander", "success")} <= by, by
    assert {e.ip for e in rows} == {"127.0.0.1"}
    assert [e.status for e in rows if e.outcome == "throttled"] == [429, 429]
    assert len([e for e in rows if e.actor == "victim" and e.outcome == "failure"]) == 5

    # a successful login starts the account's count afresh
    await make_user(farm, "kim")
    for _ in range(4):
        assert (await login(farm, "kim", "not-the-password")).status == 401
    assert (await login(farm, "kim")).status == 200
    for _ in range(4):
        assert (await login(farm, "kim", "not-the-password")).status == 401
    assert (await login(farm, "kim")).status == 200
    for _ in range(5):
        assert (await login(farm, "kim", "not-the-password")).status == 401
    assert (await login(farm, "kim")).status == 429


@pytest.mark.agents(0)
async def test_login_throttled_per_address(farm: Farm) -> None:
    farm.settings.login_max_failures_ip = 3
    for name in ("u1", "u2", "u3"):
        await make_user(farm, name)
    assert (await login(farm, "u1", "not-the-password")).status == 401
    assert (await login(farm, "u2", "not-the-password")).status == 401
    assert (await login(farm, "ghost", "not-the-password")).status == 401
    r = await login(farm, "u3")  # an account with no failure of its own
    assert r.status == 429, r.body
    retry = r.headers.get("Retry-After", "")
    assert retry.isdigit() and 0 < int(retry) <= farm.settings.login_window_s, retry
    rows = await audit_rows(farm, action="auth.login", outcome="throttled")
    assert [(e.actor, e.status, e.ip) for e in rows] == [("u3", 429, "127.0.0.1")]


# ------------------------------------------------------------------ lockout


async def _all_refused(farm: Farm, s: dict[str, Any], personal: str) -> None:
    assert await me(farm, s["access_token"]) == 401
    assert await me(farm, personal) == 401
    assert (await refresh(farm, s["refresh_token"])).status == 401


@pytest.mark.agents(0)
async def test_disabling_or_a_new_password_ends_every_token(farm: Farm) -> None:
    await make_user(farm, "dana")
    s = await session(farm, "dana")
    personal = (await personal_token(farm, s["access_token"]))["token"]
    assert await me(farm, s["access_token"]) == 200 and await me(farm, personal) == 200

    r = await call(farm, "PATCH", "/api/users/dana", farm.token, json={"disabled": True})
    assert r.status == 200 and r.body["disabled"] is True, r.body
    await _all_refused(farm, s, personal)
    assert (await login(farm, "dana")).status == 401
    r = await call(farm, "PATCH", "/api/users/dana", farm.token, json={"disabled": False})
    assert r.status == 200 and r.body["disabled"] is False, r.body
    await _all_refused(farm, s, personal)  # enabling again revives nothing

    # the admin sets a new password
    s = await session(farm, "dana")
    personal = (await personal_token(farm, s["access_token"]))["token"]
    assert await me(farm, personal) == 200
    r = await call(farm, "PATCH", "/api/users/dana", farm.token, json={"password": NEW_PASSWORD})
    assert r.status == 200, r.body
    await _all_refused(farm, s, personal)
    assert (await login(farm, "dana")).status == 401

    # dana changes her own password
    s = await session(farm, "dana", NEW_PASSWORD)
    personal = (await personal_token(farm, s["access_token"]))["token"]
    r = await call(
        farm,
        "POST",
        "/api/me/password",
        s["access_token"],
        json={"current_password": "not-the-password", "new_password": NEWER_PASSWORD},
    )
    assert r.status == 403, r.body
    assert await me(farm, s["access_token"]) == 200 and await me(farm, personal) == 200
    r = await call(
        farm,
        "POST",
        "/api/me/password",
        s["access_token"],
        json={"current_password": NEW_PASSWORD, "new_password": NEWER_PASSWORD},
    )
    assert r.status == 204, r.body
    await _all_refused(farm, s, personal)
    assert (await login(farm, "dana", NEW_PASSWORD)).status == 401
    assert await me(farm, (await session(farm, "dana", NEWER_PASSWORD))["access_token"]) == 200


# ------------------------------------------------------------------ first start


COMMON_PASSWORDS = ("admin", "password", "renderfarm", "changeme", "admin123", "Admin1234!", "")


async def _users(ctx: Any) -> list[str]:
    async with ctx.db.session() as s:
        return list((await s.scalars(select(User.username).order_by(User.username))).all())


async def test_first_start_makes_one_admin_with_a_generated_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "farm"
    secret = data / "secrets" / "initial-admin-password"
    async with running_farm(farm_settings(data), port=free_port(), agents=0) as running:
        out = capsys.readouterr().out
        assert secret.is_file()
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert stat.S_IMODE(secret.parent.stat().st_mode) == 0o700
        password = secret.read_text().strip()
        assert len(password) >= 16 and password in out
        assert await _users(running.ctx) == ["admin"]
        running.ctx.settings.login_max_failures = running.ctx.settings.login_max_failures_ip = 100
        async with FarmClient(running.url) as client:
            farm: Any = SimpleNamespace(url=running.url, client=client)
            for guess in COMMON_PASSWORDS:
                for user in ("admin", "root", "renderfarm"):
                    r = await login(farm, user, guess or "x")
                    assert r.status in (400, 401), (user, guess, r.status)
            s = await session(farm, "admin", password)
            r = await call(farm, "GET", "/api/me", s["access_token"])
            assert r.body["is_admin"] is True
            assert [p["name"] for p in r.body["projects"]] == ["default"]
            r = await call(farm, "GET", "/api/users", s["access_token"])
            assert [u["username"] for u in r.body["users"]] == ["admin"]
    before = (secret.read_text(), secret.stat().st_mtime_ns)

    async with running_farm(farm_settings(data), port=free_port(), agents=0) as running:
        out = capsys.readouterr().out
        assert "created the first admin" not in out and password not in out
        assert await _users(running.ctx) == ["admin"]
        assert (secret.read_text(), secret.stat().st_mtime_ns) == before
        async with FarmClient(running.url) as client:
            farm = SimpleNamespace(url=running.url, client=client)
            # the wrong guesses above (over 20) still count after a restart: this address is throttled
            assert (await login(farm, "admin", password)).status == 429
            running.ctx.settings.login_max_failures_ip = 100
            assert (await login(farm, "admin", password)).status == 200

    # another farm gets another password
    other = tmp_path / "other"
    async with running_farm(farm_settings(other), port=free_port(), agents=0):
        capsys.readouterr()
    assert (other / "secrets" / "initial-admin-password").read_text().strip() != password


# ------------------------------------------------------------------ audit chain


@pytest.mark.agents(0)
async def test_audit_chain_verifies_and_names_a_changed_row(farm: Farm) -> None:
    await make_user(farm, "auditee")
    assert (await login(farm, "auditee", "not-the-password")).status == 401
    access = (await session(farm, "auditee"))["access_token"]
    assert (await call(farm, "GET", "/api/users", access)).status == 403
    await personal_token(farm, access)
    assert await me(farm, "forged") == 401

    has_route = any(i.method == "GET" and i.path == "/api/audit/verify" for i, _ in ROUTES)

    async def verify() -> dict[str, Any]:
        direct = await audit_log.verify(farm.ctx)
        if not has_route:
            return {k: getattr(direct, k) for k in ("ok", "checked", "first_broken_seq", "reason")}
        r = await call(farm, "GET", "/api/audit/verify", farm.token)
        assert r.status == 200, r.body
        assert (r.body["ok"], r.body["first_broken_seq"]) == (direct.ok, direct.first_broken_seq)
        return r.body

    async with farm.ctx.db.session() as s:
        rows = await s.scalar(select(func.count()).select_from(AuditEntry))
    assert rows and rows >= 6
    v = await verify()
    assert v["ok"] is True and v["first_broken_seq"] is None and v["checked"] >= rows, v

    [failed] = await audit_rows(farm, action="auth.login", outcome="failure", actor="auditee")
    async with farm.ctx.db.session() as s:
        await s.execute(update(AuditEntry).where(AuditEntry.seq == failed.seq).values(actor="someone-else"))
        await s.commit()
    v = await verify()
    assert v["ok"] is False and v["first_broken_seq"] == failed.seq and v["reason"], v
    assert v["checked"] == failed.seq - 1, v
