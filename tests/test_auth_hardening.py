"""Regression tests for the findings of an attack on the accounts feature.

Each test would have caught one finding before the fixes: parallel login bursts that
slipped past the throttle, a password change that was a free password oracle, user and
project names told apart only by case (or shaped like ids), weak passwords accepted, an
agent claiming a task of another pool, audit rows that said nothing of what was made (or
missing for the first admin), an emptied audit log that verified, refused signed links
not audited, a case-sensitive ``Bearer``, token names with control or bidi characters,
``?all=1`` silently ignored for non-admins, PATCH user without projects, and an events
stream that ended silently when its reader lost access.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import aiohttp
import pytest
from sqlalchemy import select, text

from server.persistence.tables import AuditEntry, Task, User
from tests.conftest import Farm
from tests.test_auth import audit_rows, login, make_user, personal_token
from tests.test_rbac import Reply, call

pytestmark = pytest.mark.asyncio

PASSWORD = "hardening-pass-0123"
WRONG = "not-the-password-9"
BURST = 30


async def _burst_logins(farm: Farm, pairs: list[tuple[str, str]]) -> list[Reply]:
    """POST /api/auth/login once per ``(username, password)``, all at once over one session
    whose connector has no connection limit (so the requests really are concurrent)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def one(username: str, password: str) -> Reply:
            async with http.post(
                farm.url + "/api/auth/login", json={"username": username, "password": password}
            ) as r:
                return Reply(r.status, await r.json(), dict(r.headers))

        return list(await asyncio.gather(*(one(u, p) for u, p in pairs)))


def _check_throttled(replies: list[Reply], limit: int, who: str, window_s: float) -> None:
    """At most ``limit`` 401s (at least one), every other reply a 429 naming ``who`` with a
    sane Retry-After."""
    statuses = [r.status for r in replies]
    failures = statuses.count(401)
    assert 1 <= failures <= limit, statuses
    assert statuses.count(429) == len(replies) - failures, statuses
    for r in replies:
        if r.status == 429:
            assert who in r.body["error"]["message"], r.body
            retry = r.headers.get("Retry-After", "")
            assert retry.isdigit() and 0 < int(retry) <= window_s, r.headers


# ------------------------------------------------------------------ 1. parallel login bursts


@pytest.mark.agents(0)
async def test_parallel_login_burst_on_one_account_is_throttled(farm: Farm) -> None:
    s = farm.settings
    assert s.login_max_failures == 5
    await make_user(farm, "burst", PASSWORD)
    replies = await _burst_logins(farm, [("burst", f"{WRONG}{i}") for i in range(BURST)])
    _check_throttled(replies, s.login_max_failures, "this account", s.login_window_s)
    failed = await audit_rows(farm, action="auth.login", actor="burst", outcome="failure")
    assert len(failed) <= s.login_max_failures, [e.seq for e in failed]
    r = await login(farm, "burst", PASSWORD)  # the right password, too late
    assert r.status == 429, r.body
    assert "this account" in r.body["error"]["message"] and "access_token" not in r.body, r.body


@pytest.mark.agents(0)
async def test_parallel_login_burst_over_many_names_is_throttled_per_address(farm: Farm) -> None:
    s = farm.settings
    assert s.login_max_failures_ip == 20
    replies = await _burst_logins(farm, [(f"nobody{i}", WRONG) for i in range(BURST)])
    _check_throttled(replies, s.login_max_failures_ip, "this address", s.login_window_s)
    failed = await audit_rows(farm, action="auth.login", outcome="failure")
    assert len(failed) <= s.login_max_failures_ip, len(failed)


# ------------------------------------------------------------------ 2. password change


@pytest.mark.agents(0)
async def test_wrong_current_password_counts_as_a_failed_login(farm: Farm) -> None:
    await make_user(farm, "changer", PASSWORD)
    r = await login(farm, "changer", PASSWORD)
    assert r.status == 200, r.body
    bearer = r.body["access_token"]

    async def change(current: str, new: str) -> Reply:
        body = {"current_password": current, "new_password": new}
        return await call(farm, "POST", "/api/me/password", bearer, json=body)

    r = await change(PASSWORD, PASSWORD)  # the same password again: refused, not a failed login
    assert r.status == 400 and r.body["error"]["field"] == "new_password", r.body
    async with farm.ctx.db.session() as s:
        before = await s.scalar(select(User.password_hash).where(User.username == "changer"))
    for i in range(farm.settings.login_max_failures):
        r = await change(f"{WRONG}{i}", "brand-new-pass-4567")
        assert r.status == 403 and r.body["error"]["field"] == "current_password", (i, r.body)
    r = await change(PASSWORD, "brand-new-pass-4567")  # right, but after 5 wrong ones
    assert r.status == 429, r.body
    assert "this account" in r.body["error"]["message"], r.body
    assert r.headers.get("Retry-After", "").isdigit(), r.headers
    async with farm.ctx.db.session() as s:
        after = await s.scalar(select(User.password_hash).where(User.username == "changer"))
    assert after == before  # nothing changed
    failed = await audit_rows(farm, action="auth.login", actor="changer", outcome="failure")
    assert len(failed) == farm.settings.login_max_failures
    assert (await login(farm, "changer", PASSWORD)).status == 429  # the login is throttled too


# ------------------------------------------------------------------ 3. names


@pytest.mark.agents(0)
async def test_names_unique_regardless_of_case_ascii_and_never_id_shaped(farm: Farm) -> None:
    await make_user(farm, "alice", PASSWORD)
    r = await call(farm, "POST", "/api/users", farm.token, json={"username": "Alice", "password": PASSWORD})
    assert r.status == 409 and r.body["error"]["field"] == "username", r.body
    r = await call(farm, "POST", "/api/projects", farm.token, json={"name": "shots"})
    assert r.status == 201, r.body
    r = await call(farm, "POST", "/api/projects", farm.token, json={"name": "Shots"})
    assert r.status == 409 and r.body["error"]["field"] == "name", r.body
    r = await call(farm, "POST", "/api/projects", farm.token, json={"name": "DEFAULT"})
    assert r.status == 409, r.body

    hexname = "0123456789abcdef0123456789abcdef"
    r = await call(farm, "POST", "/api/users", farm.token, json={"username": hexname, "password": PASSWORD})
    assert r.status == 400 and r.body["error"]["field"] == "username", r.body
    r = await call(farm, "POST", "/api/projects", farm.token, json={"name": hexname})
    assert r.status == 400 and r.body["error"]["field"] == "name", r.body

    r = await call(farm, "POST", "/api/users", farm.token, json={"username": "élodie", "password": PASSWORD})
    assert r.status == 400 and r.body["error"]["field"] == "username", r.body
    assert "ASCII" in r.body["error"]["message"], r.body

    # "admin " and "ADMIN" are no one, even with admin's right password
    secret = farm.settings.data_dir / "secrets" / "initial-admin-password"
    admin_password = secret.read_text().strip()
    assert (await login(farm, "admin", admin_password)).status == 200  # the password is right
    for name in ("admin ", "ADMIN", " admin", "Admin"):
        r = await login(farm, name, admin_password)
        assert r.status == 401, (name, r.body)
    r = await login(farm, "élodie", PASSWORD)
    assert r.status == 401, r.body
    async with farm.ctx.db.session() as s:
        names = sorted((await s.scalars(select(User.username))).all())
    assert names == ["admin", "alice"], names


# ------------------------------------------------------------------ 4. passwords


@pytest.mark.agents(0)
async def test_weak_passwords_refused_naming_the_rule(farm: Farm) -> None:
    weak = {
        " " * 10: "spaces",
        "\u200b" * 10: "invisible",
        "abcde\u0000\u0000\u0000\u0000\u0000": "invisible",
        "P@ssw0rd!!": "too easy to guess",
        "1qaz2wsx3edc": "too easy to guess",
        "abcdeabcde": "too easy to guess",
        "longusernamelongusername": "too easy to guess",
        "aaaaaaaaaa": "different characters",
        "password12": "common",
        "1234567890": "common",
        "PASSWORD12": "common",
        "longusername": "user name",
        "LongUserName1!": "user name",
    }
    for password, rule in weak.items():
        body = {"username": "longusername", "password": password}
        r = await call(farm, "POST", "/api/users", farm.token, json=body)
        assert r.status == 400, (password, r.body)
        assert r.body["error"]["field"] == "password", (password, r.body)
        assert rule in r.body["error"]["message"], (password, r.body)
    body = {"username": "longusername", "password": "tulip-harbour-57"}
    r = await call(farm, "POST", "/api/users", farm.token, json=body)
    assert r.status == 201, r.body
    # the same rules on a change by an admin and on one's own change
    r = await call(farm, "PATCH", "/api/users/longusername", farm.token, json={"password": "aaaaaaaaaa"})
    assert r.status == 400 and r.body["error"]["field"] == "password", r.body
    r = await login(farm, "longusername", "tulip-harbour-57")
    assert r.status == 200, r.body
    body = {"current_password": "tulip-harbour-57", "new_password": "longusername"}
    r = await call(farm, "POST", "/api/me/password", r.body["access_token"], json=body)
    assert r.status == 400 and r.body["error"]["field"] == "new_password", r.body
    assert "user name" in r.body["error"]["message"], r.body


# ------------------------------------------------------------------ 5. pools


async def _upload_model(farm: Farm, blend: Path) -> str:
    """The sample scene uploaded to project ``default`` by the admin; returns the model id."""
    r = await call(
        farm,
        "POST",
        "/api/models?filename=sample.blend&project=default",
        farm.token,
        data=blend.read_bytes(),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status in (200, 201), r.body
    return r.body["id"]


async def _job(farm: Farm, model_id: str, **extra: Any) -> str:
    r = await call(farm, "POST", "/api/jobs", farm.token, json={"model_id": model_id, "frames": "1", **extra})
    assert r.status == 201, r.body
    return r.body["id"]


@pytest.mark.agents(0)
async def test_an_agent_claims_only_tasks_of_its_pool(farm: Farm, sample_blend: Path) -> None:
    job_id = await _job(farm, await _upload_model(farm, sample_blend), pool="gpu")
    r = await call(farm, "GET", f"/api/jobs/{job_id}/tasks", farm.token)
    assert r.status == 200, r.body
    (task,) = r.body["tasks"]
    cpu = await farm.agent_token("node-x")
    r = await call(farm, "POST", "/api/agent/register", cpu, json={"pool": "default"})
    assert r.status == 200, r.body
    r = await call(farm, "POST", f"/api/agent/tasks/{task['id']}/claim", cpu, json={})
    assert r.status == 409, r.body
    assert "gpu" in r.body["error"]["message"] and "default" in r.body["error"]["message"], r.body
    async with farm.ctx.db.session() as s:
        row = await s.get(Task, task["id"])
        assert row is not None
        assert (row.state, row.agent, row.attempts) == ("queued", None, 0)
    # an agent of the right pool does get it
    gpu = await farm.agent_token("node-g")
    r = await call(farm, "POST", "/api/agent/register", gpu, json={"pool": "gpu"})
    assert r.status == 200, r.body
    r = await call(farm, "POST", f"/api/agent/tasks/{task['id']}/claim", gpu, json={})
    assert r.status == 200, r.body


# ------------------------------------------------------------------ 6. audit


@pytest.mark.agents(0)
async def test_audit_rows_say_what_was_made_and_never_a_secret(farm: Farm) -> None:
    boot = await audit_rows(farm, action="auth.bootstrap_admin")
    assert [(e.actor_kind, e.outcome, e.target) for e in boot] == [("system", "success", "user=admin")], boot

    admin_password = (farm.settings.data_dir / "secrets" / "initial-admin-password").read_text().strip()
    secrets = [farm.token, admin_password]
    r = await call(farm, "POST", "/api/users", farm.token, json={"username": "auditee", "password": PASSWORD})
    assert r.status == 201, r.body
    user_id = r.body["id"]
    (row,) = await audit_rows(farm, action="accounts.create_user", outcome="success")
    assert row.target == "user=auditee" and row.detail["is_admin"] is False, row.detail
    assert row.detail["user_id"] == user_id and row.actor == "admin", row.detail

    r = await call(farm, "POST", "/api/projects", farm.token, json={"name": "audited"})
    assert r.status == 201, r.body
    (row,) = await audit_rows(farm, action="accounts.create_project", outcome="success")
    assert row.target == "project=audited" and row.detail["project_id"] == r.body["id"], row

    tok = await personal_token(farm, farm.token, "audited token")
    secrets.append(tok["token"])
    (row,) = await audit_rows(farm, action="accounts.create_token", outcome="success")
    assert row.target == f"token_id={tok['id']}" and row.detail["name"] == "audited token", row.detail

    r = await call(farm, "POST", "/api/agent-tokens", farm.token, json={"agent_name": "render-01"})
    assert r.status == 201, r.body
    secrets.append(r.body["token"])
    (row,) = await audit_rows(farm, action="accounts.create_agent_token", outcome="success")
    assert row.target == f"token_id={r.body['id']}" and row.detail["agent_name"] == "render-01", row

    r = await call(farm, "PATCH", "/api/users/auditee", farm.token, json={"is_admin": True})
    assert r.status == 200 and r.body["is_admin"] is True, r.body
    new_password = "secret-never-logged-77"
    r = await call(farm, "PATCH", "/api/users/auditee", farm.token, json={"password": new_password})
    assert r.status == 200, r.body
    promote, change = await audit_rows(farm, action="accounts.update_user", outcome="success")
    assert promote.target == change.target == "user=auditee", (promote.target, change.target)
    assert promote.detail["changes"] == {"is_admin": True}, promote.detail
    assert change.detail["changes"] == {"password_changed": True}, change.detail

    s = await login(farm, "auditee", new_password)
    assert s.status == 200, s.body
    secrets += [s.body["access_token"], s.body["refresh_token"]]
    async with farm.ctx.db.session() as db:
        dump = json.dumps(
            [list(r) for r in (await db.execute(text("SELECT * FROM audit_log"))).all()], default=str
        )
    assert "auditee" in dump  # the dump is the real table
    for secret in [PASSWORD, new_password, *secrets]:
        assert secret not in dump, secret[:12]


@pytest.mark.agents(0)
async def test_a_tampered_signed_link_is_refused_and_audited(farm: Farm) -> None:
    url = farm.ctx.storage.signed_url("outputs/someone/frame_0001.png", 60, "x.png")
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    good_sig = query["sig"]
    query["sig"] = ("0" if good_sig[0] != "0" else "1") + good_sig[1:]
    r = await call(farm, "GET", f"{parts.path}?{urlencode(query)}")
    assert r.status == 403, r.body
    rows = await audit_rows(farm, action="outputs.signed_file")
    assert [(e.outcome, e.status, e.actor_kind) for e in rows] == [("denied", 403, "anonymous")], rows
    assert rows[0].detail["path"] == parts.path and query["sig"] not in json.dumps(rows[0].detail), rows
    r = await call(farm, "GET", url)  # the untouched link passes the signature (no such object: 404)
    assert r.status == 404, r.body
    assert len(await audit_rows(farm, action="outputs.signed_file")) == 1


@pytest.mark.agents(0)
async def test_verify_reports_an_emptied_audit_log(farm: Farm) -> None:
    assert farm.ctx.db.backend == "sqlite"
    await make_user(farm, "someone", PASSWORD)  # an audited change besides the first admin's creation
    r = await call(farm, "GET", "/api/audit/verify", farm.token)
    assert r.status == 200 and r.body["ok"] is True and r.body["checked"] > 0, r.body
    async with farm.ctx.db.session() as s:
        await s.execute(text("DELETE FROM audit_log"))
        await s.execute(text("DELETE FROM audit_head"))
        await s.commit()
    r = await call(farm, "GET", "/api/audit/verify", farm.token)
    assert r.status == 200, r.body
    assert r.body["ok"] is False and "emptied" in r.body["reason"], r.body
    # one failed login by anyone writes seq 1 of a fresh chain: still not a farm's log
    r = await call(farm, "POST", "/api/auth/login", json={"username": "nobody", "password": "x" * 12})
    assert r.status == 401
    r = await call(farm, "GET", "/api/audit/verify", farm.token)
    assert r.body["ok"] is False and r.body["first_broken_seq"] == 1, r.body
    assert "does not begin with the farm's first admin" in r.body["reason"], r.body


@pytest.mark.agents(0)
async def test_the_log_begins_with_the_first_admin(farm: Farm) -> None:
    async with farm.ctx.db.session() as s:
        first = (await s.execute(select(AuditEntry).where(AuditEntry.seq == 1))).scalar_one()
    assert (first.action, first.actor, first.actor_kind) == ("auth.bootstrap_admin", "renderfarm", "system")


# ------------------------------------------------------------------ 7. the Bearer scheme


@pytest.mark.agents(0)
async def test_bearer_scheme_is_case_insensitive(farm: Farm) -> None:
    for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
        r = await call(farm, "GET", "/api/me", headers={"Authorization": f"{scheme} {farm.token}"})
        assert r.status == 200 and r.body["username"] == "admin", (scheme, r.body)
    for header in ("Basic xyz", f"Basic {farm.token}", f"Bearer{farm.token}", "Bearer ", farm.token):
        r = await call(farm, "GET", "/api/me", headers={"Authorization": header})
        assert r.status == 401, (header[:10], r.body)


# ------------------------------------------------------------------ 8. tokens


@pytest.mark.agents(0)
async def test_token_names_lives_and_all_checked(farm: Farm) -> None:
    for name in (
        "bad\u0000name",
        "evil\u202etxt.exe",
        "tab\there",
        "iso\u2066late",
        "csi\u009b31m",  # a C1 control: one byte of ESC [ on some terminals
        "nel\u0085x",
        "line\u2028sep",
        "zero\u200bwidth",
        "rlm\u200fx",
        "alm\u061cx",
        "bom\ufeffx",
    ):
        r = await call(farm, "POST", "/api/tokens", farm.token, json={"name": name})
        assert r.status == 400 and r.body["error"]["field"] == "name", (name, r.body)
        r = await call(farm, "POST", "/api/agent-tokens", farm.token, json={"agent_name": "n1", "name": name})
        assert r.status == 400 and r.body["error"]["field"] == "name", (name, r.body)
    for days in (True, 1e-300, 0, 0.01, 366, "7"):
        r = await call(farm, "POST", "/api/tokens", farm.token, json={"name": "t", "expires_days": days})
        assert r.status == 400, (days, r.body)
        # pydantic names the union's branch ("expires_days.int"): the field is its first part
        assert r.body["error"]["field"].split(".")[0] == "expires_days", (days, r.body)
    for days in (1 / 24, 1, 365):
        r = await call(farm, "POST", "/api/tokens", farm.token, json={"name": "t", "expires_days": days})
        assert r.status == 201, (days, r.body)

    await make_user(farm, "plain", PASSWORD)
    r = await login(farm, "plain", PASSWORD)
    assert r.status == 200, r.body
    bearer = r.body["access_token"]
    r = await call(farm, "GET", "/api/tokens?all=1", bearer)
    assert r.status == 403, r.body
    r = await call(farm, "GET", "/api/tokens", bearer)
    assert r.status == 200 and r.body["tokens"] == [], r.body
    r = await call(farm, "GET", "/api/tokens?all=1", farm.token)
    assert r.status == 200 and len(r.body["tokens"]) >= 4, r.body


# ------------------------------------------------------------------ 9. PATCH user answer


@pytest.mark.agents(0)
async def test_patch_user_answer_lists_projects(farm: Farm) -> None:
    await make_user(farm, "member", PASSWORD)
    r = await call(farm, "PUT", "/api/projects/default/members/member", farm.token, json={"role": "viewer"})
    assert r.status == 200, r.body
    r = await call(farm, "PATCH", "/api/users/member", farm.token, json={"disabled": False})
    assert r.status == 200, r.body
    assert [(p["name"], p["role"]) for p in r.body["projects"]] == [("default", "viewer")], r.body
    assert r.body["username"] == "member" and "password_hash" not in r.body, r.body


# ------------------------------------------------------------------ 10. events stream


@pytest.mark.agents(0)
async def test_events_stream_of_a_disabled_user_ends_with_an_error(farm: Farm, sample_blend: Path) -> None:
    job_id = await _job(farm, await _upload_model(farm, sample_blend))
    await make_user(farm, "watcher", PASSWORD)
    r = await call(farm, "PUT", "/api/projects/default/members/watcher", farm.token, json={"role": "artist"})
    assert r.status == 200, r.body
    token = (await personal_token(farm, (await login(farm, "watcher", PASSWORD)).body["access_token"]))[
        "token"
    ]

    headers = {"Authorization": f"Bearer {token}"}
    async with farm.client.http.get(f"{farm.url}/api/jobs/{job_id}/events", headers=headers) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        first = await asyncio.wait_for(resp.content.readline(), 5)
        assert first == b"event: job\n", first
        r = await call(farm, "PATCH", "/api/users/watcher", farm.token, json={"disabled": True})
        assert r.status == 200 and r.body["disabled"], r.body
        disabled_at = time.monotonic()
        lines: list[bytes] = []
        while True:
            left = disabled_at + 8 - time.monotonic()
            assert left > 0, f"no error event within 8 s: {lines}"
            line = await asyncio.wait_for(resp.content.readline(), left)
            assert line, f"the stream ended without an error event: {lines}"
            lines.append(line)
            if line == b"event: error\n":
                break
        data = await asyncio.wait_for(resp.content.readline(), 2)
        assert data.startswith(b"data: "), data
        error = json.loads(data[len(b"data: ") :])
        assert error["type"] == "error" and error["status"] == 401 and error["message"], error
        assert time.monotonic() - disabled_at < 8
        rest = await asyncio.wait_for(resp.content.read(), 5)  # then the stream ends
        assert b"event:" not in rest, rest
