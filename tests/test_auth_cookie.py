"""Refresh tokens held in the HttpOnly cookie ``rf_refresh`` (for the web UI), over HTTP.

A login with ``"cookie": true`` sets the cookie (HttpOnly, SameSite=Strict, Path=/api/auth,
Max-Age the refresh token's life, Secure over https) and returns no refresh token in the body;
refresh and logout use the cookie only with ``X-Requested-With: renderfarm`` and from the
server's own origin; a reused cookie revokes its login as a reused body token does; a login
without the flag is as before.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from http.cookies import SimpleCookie
from typing import Any

import aiohttp
import pytest

from server.api.accounts import REFRESH_COOKIE
from tests.conftest import Farm
from tests.test_auth import PASSWORD, audit_rows, make_user, me, refresh
from tests.test_rbac import Reply

pytestmark = pytest.mark.asyncio

UI = {"X-Requested-With": "renderfarm"}
"""The header the web UI sends with cookie-authenticated requests."""


@pytest.fixture
async def browser() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that keeps cookies as a browser does (``unsafe``: also for 127.0.0.1)."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        yield http


async def post(http: aiohttp.ClientSession, farm: Farm, path: str, **kw: Any) -> Reply:
    """POST ``path``; the reply with every ``Set-Cookie`` joined by newlines under ``set-cookie``."""
    async with http.post(farm.url + path, **kw) as r:
        body = await r.json() if r.content_type == "application/json" else await r.read()
        headers = dict(r.headers)
        headers["set-cookie"] = "\n".join(r.headers.getall("Set-Cookie", []))
        return Reply(r.status, body, headers)


def jar_value(http: aiohttp.ClientSession) -> str | None:
    """The ``rf_refresh`` cookie the client holds now (None when it holds none)."""
    for c in http.cookie_jar:
        if c.key == REFRESH_COOKIE:
            return c.value
    return None


def parse_set_cookie(header: str) -> Any:
    """The ``rf_refresh`` morsel of a ``Set-Cookie`` header value."""
    cookie: SimpleCookie = SimpleCookie()
    cookie.load(header)
    assert REFRESH_COOKIE in cookie, header
    return cookie[REFRESH_COOKIE]


async def cookie_login(http: aiohttp.ClientSession, farm: Farm, name: str) -> Reply:
    """A web UI's login: ``"cookie": true``."""
    r = await post(
        http, farm, "/api/auth/login", json={"username": name, "password": PASSWORD, "cookie": True}
    )
    assert r.status == 200, r.body
    return r


async def with_cookie(farm: Farm, path: str, value: str, headers: dict[str, str] | None = None) -> Reply:
    """POST ``path`` sending ``rf_refresh=value`` by hand (a stolen or old cookie), no cookie jar."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        h = {"Cookie": f"{REFRESH_COOKIE}={value}", **UI, **(headers or {})}
        return await post(http, farm, path, headers=h)


# ------------------------------------------------------------------ login


@pytest.mark.agents(0)
async def test_cookie_login_sets_a_strict_httponly_cookie_and_no_body_token(
    farm: Farm, browser: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    await make_user(farm, "ui")
    r = await cookie_login(browser, farm, "ui")
    assert r.body["refresh_token"] is None and r.body["access_token"], r.body
    assert r.body["expires_in"] == int(farm.settings.access_token_ttl_s)
    assert r.headers.get("Cache-Control") == "no-store"
    m = parse_set_cookie(r.headers["set-cookie"])
    assert m.value.startswith("rfr_")
    assert m["httponly"] is True
    assert m["samesite"] == "Strict"
    assert m["path"] == "/api/auth"
    assert int(m["max-age"]) == int(farm.settings.refresh_token_ttl_s)
    assert not m["secure"], "plain http: a Secure cookie would never be sent back"
    assert jar_value(browser) == m.value
    assert await me(farm, r.body["access_token"]) == 200

    # https as a trusted proxy reports it: Secure; the same header from anyone else: not
    h = {"X-Forwarded-Proto": "https"}
    r = await post(
        browser,
        farm,
        "/api/auth/login",
        json={"username": "ui", "password": PASSWORD, "cookie": True},
        headers=h,
    )
    assert r.status == 200 and not parse_set_cookie(r.headers["set-cookie"])["secure"], r.headers
    monkeypatch.setattr(farm.settings, "trusted_proxies", "127.0.0.1")
    r = await post(
        browser,
        farm,
        "/api/auth/login",
        json={"username": "ui", "password": PASSWORD, "cookie": True},
        headers=h,
    )
    assert r.status == 200 and parse_set_cookie(r.headers["set-cookie"])["secure"] is True, r.headers


@pytest.mark.agents(0)
async def test_login_without_the_cookie_flag_is_unchanged(farm: Farm, browser: aiohttp.ClientSession) -> None:
    await make_user(farm, "cli")
    for body in (
        {"username": "cli", "password": PASSWORD},
        {"username": "cli", "password": PASSWORD, "cookie": False},
    ):
        r = await post(browser, farm, "/api/auth/login", json=body)
        assert r.status == 200, r.body
        assert r.body["refresh_token"].startswith("rfr_") and r.body["token_type"] == "bearer"
        assert r.headers["set-cookie"] == "", r.headers
        assert jar_value(browser) is None
        assert (await refresh(farm, r.body["refresh_token"])).status == 200
    r = await post(
        browser, farm, "/api/auth/login", json={"username": "cli", "password": PASSWORD, "cookie": "yes"}
    )
    assert r.status == 400 and r.body["error"]["field"] == "cookie", r.body


# ------------------------------------------------------------------ refresh


@pytest.mark.agents(0)
async def test_refresh_by_cookie_rotates_it(farm: Farm, browser: aiohttp.ClientSession) -> None:
    await make_user(farm, "ui")
    await cookie_login(browser, farm, "ui")
    first = jar_value(browser)
    seen = {first}
    for _ in range(2):  # no body at all, then an empty JSON object
        kw: dict[str, Any] = {"headers": UI} if len(seen) == 1 else {"headers": UI, "json": {}}
        r = await post(browser, farm, "/api/auth/refresh", **kw)
        assert r.status == 200, r.body
        assert r.body["refresh_token"] is None and r.body["access_token"], r.body
        m = parse_set_cookie(r.headers["set-cookie"])
        assert m["httponly"] is True and m["samesite"] == "Strict" and m["path"] == "/api/auth"
        assert jar_value(browser) == m.value and m.value not in seen
        seen.add(m.value)
        assert await me(farm, r.body["access_token"]) == 200
    rows = await audit_rows(farm, action="auth.refresh", outcome="success", actor="ui")
    assert len(rows) == 2, rows
    # the same origin (as a browser sends it on a same-origin fetch) is fine
    r = await post(browser, farm, "/api/auth/refresh", headers={**UI, "Origin": farm.url})
    assert r.status == 200, r.body
    # the body path still wins over the cookie
    r = await post(browser, farm, "/api/auth/login", json={"username": "ui", "password": PASSWORD})
    body_token = r.body["refresh_token"]
    before = jar_value(browser)
    r = await post(browser, farm, "/api/auth/refresh", json={"refresh_token": body_token})
    assert r.status == 200 and r.body["refresh_token"].startswith("rfr_"), r.body
    assert r.headers["set-cookie"] == "" and jar_value(browser) == before


@pytest.mark.agents(0)
async def test_cookie_refresh_needs_the_header_and_the_own_origin(
    farm: Farm, browser: aiohttp.ClientSession
) -> None:
    await make_user(farm, "ui")
    await cookie_login(browser, farm, "ui")
    value = jar_value(browser)
    host = farm.url.split("://", 1)[1]
    refused = {
        "no X-Requested-With": {},
        "another X-Requested-With": {"X-Requested-With": "XMLHttpRequest"},
        "another site": {**UI, "Origin": "http://evil.example"},
        "another scheme, same host": {**UI, "Origin": f"https://{host}"},
        "another port": {**UI, "Origin": "http://127.0.0.1:1"},
        "an opaque origin": {**UI, "Origin": "null"},
    }
    for why, headers in refused.items():
        r = await post(browser, farm, "/api/auth/refresh", headers=headers)
        assert r.status == 403, (why, r.body)
        assert r.body["error"]["status"] == 403 and r.body["error"]["message"], (why, r.body)
        assert jar_value(browser) == value, f"{why}: the cookie was not spent"
    r = await post(browser, farm, "/api/auth/refresh")
    assert "X-Requested-With: renderfarm" in r.body["error"]["message"], r.body
    r = await post(browser, farm, "/api/auth/refresh", headers=refused["another scheme, same host"])
    assert "rf_refresh" in r.body["error"]["message"] and farm.url in r.body["error"]["message"], r.body
    denied = await audit_rows(farm, action="auth.refresh", outcome="denied", status=403)
    assert denied and denied[-1].detail.get("cookie") is True, denied
    # nothing was spent: the cookie still refreshes
    r = await post(browser, farm, "/api/auth/refresh", headers=UI)
    assert r.status == 200, r.body
    # no body token and no cookie: 400 naming both ways
    async with aiohttp.ClientSession() as bare:
        r = await post(bare, farm, "/api/auth/refresh", headers=UI)
    assert r.status == 400 and r.body["error"]["field"] == "refresh_token", r.body


@pytest.mark.agents(0)
async def test_a_reused_cookie_revokes_the_login(farm: Farm, browser: aiohttp.ClientSession) -> None:
    await make_user(farm, "ui")
    login = await cookie_login(browser, farm, "ui")
    old = jar_value(browser)
    r = await post(browser, farm, "/api/auth/refresh", headers=UI)
    assert r.status == 200, r.body
    access = r.body["access_token"]
    current = jar_value(browser)
    assert current != old and await me(farm, access) == 200

    # the spent cookie again (an attacker's copy): 401, the cookie cleared, the whole login revoked
    r = await with_cookie(farm, "/api/auth/refresh", old)
    assert r.status == 401 and "already used" in r.body["error"]["message"], r.body
    m = parse_set_cookie(r.headers["set-cookie"])
    assert m.value == "" and m["max-age"] == "0", r.headers
    reuse = await audit_rows(farm, action="auth.refresh_reuse")
    assert reuse and reuse[-1].actor == "ui", reuse
    assert await me(farm, access) == 401
    assert await me(farm, login.body["access_token"]) == 401
    r = await post(browser, farm, "/api/auth/refresh", headers=UI)  # the legitimate holder is out too
    assert r.status == 401, r.body
    assert jar_value(browser) is None, "a refused cookie is cleared"


# ------------------------------------------------------------------ logout


@pytest.mark.agents(0)
async def test_logout_by_cookie_ends_the_login_and_clears_it(
    farm: Farm, browser: aiohttp.ClientSession
) -> None:
    await make_user(farm, "ui")
    login = await cookie_login(browser, farm, "ui")
    value = jar_value(browser)
    assert value

    r = await post(browser, farm, "/api/auth/logout")  # no X-Requested-With: refused, nothing ended
    assert r.status == 403, r.body
    r = await post(browser, farm, "/api/auth/logout", headers={**UI, "Origin": "https://evil.example"})
    assert r.status == 403, r.body
    assert jar_value(browser) == value and await me(farm, login.body["access_token"]) == 200

    r = await post(browser, farm, "/api/auth/logout", headers=UI)
    assert r.status == 204, r.body
    m = parse_set_cookie(r.headers["set-cookie"])
    assert m.value == "" and m["max-age"] == "0" and m["path"] == "/api/auth", r.headers
    assert m["httponly"] is True and m["samesite"] == "Strict"
    assert jar_value(browser) is None
    assert await me(farm, login.body["access_token"]) == 401
    assert (await with_cookie(farm, "/api/auth/refresh", value)).status == 401
    rows = await audit_rows(farm, action="accounts.logout", outcome="success")
    assert rows and rows[-1].actor == "ui" and rows[-1].status == 204, rows

    # with the UI's access token as bearer: its login ends and the cookie is cleared
    login = await cookie_login(browser, farm, "ui")
    value = jar_value(browser)
    bearer = {"Authorization": f"Bearer {login.body['access_token']}"}
    r = await post(browser, farm, "/api/auth/logout", headers=bearer)
    assert r.status == 204, r.body
    assert jar_value(browser) is None and await me(farm, login.body["access_token"]) == 401
    assert (await with_cookie(farm, "/api/auth/refresh", value)).status == 401

    # a bearer token no longer valid (expired in the UI's memory) falls back to the cookie
    login = await cookie_login(browser, farm, "ui")
    value = jar_value(browser)
    r = await post(browser, farm, "/api/auth/logout", headers={**UI, "Authorization": "Bearer expired"})
    assert r.status == 204, r.body
    assert await me(farm, login.body["access_token"]) == 401
    assert (await with_cookie(farm, "/api/auth/refresh", value)).status == 401

    # nothing to end: no bearer, no cookie
    r = await post(browser, farm, "/api/auth/logout", headers=UI)
    assert r.status == 400 and "no login to end" in r.body["error"]["message"], r.body
    # a body token without a bearer is refused as before
    other = await post(browser, farm, "/api/auth/login", json={"username": "ui", "password": PASSWORD})
    r = await post(browser, farm, "/api/auth/logout", json={"refresh_token": other.body["refresh_token"]})
    assert r.status == 401, r.body
    assert await me(farm, other.body["access_token"]) == 200
