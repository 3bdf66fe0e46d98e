"""Every route against every caller, compared with the one permission table.

The expected decision of a request is computed from :mod:`server.auth.permissions`
(``ROLE_PERMISSIONS``, ``allows``, ``ADMIN_PERMISSIONS`` and the special permissions
``public``, ``agent``, ``self``) and the rules of :mod:`server.api.access`:

* no token: 401 unless the route is ``public``;
* an agent token on a user route, or a user token on an agent route: 403;
* an object of a project the caller has no role in: 404 with the body of a missing object;
* a role that lacks the permission (or holds it only for its own objects): 403.

Project A holds every scoped object (a model, a job owned by ``artist_a2`` with one
rendered frame, its tasks); project B holds ``artist_b``. ``SAMPLES`` gives each route
a request body that does not destroy what the other cases need.
"""

from __future__ import annotations

import io
import itertools
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from PIL import Image
from sqlalchemy import select

from server.api.registry import ROUTES, RouteInfo
from server.app import create_app
from server.auth import service as auth
from server.auth.permissions import ADMIN_PERMISSIONS, allows, grant
from server.errors import not_found
from server.persistence.tables import AuditEntry
from tests.conftest import Farm

pytestmark = pytest.mark.asyncio

PASSWORD = "rbac-password-0123"
PROJECTS = {"A": "proj-a", "B": "proj-b"}
ROLES_OF: dict[str, dict[str, str]] = {
    "manager_a": {"A": "manager"},
    "artist_a": {"A": "artist"},
    "artist_a2": {"A": "artist"},
    "viewer_a": {"A": "viewer"},
    "artist_b": {"B": "artist"},
}
"""Users made for the tests and their roles per project (``A``, ``B``)."""
EXTRA_USERS = ("throwaway", "member_tmp")
"""Users with no role: the target of PATCH /api/users and of DELETE .../members."""
CALLERS = ("anonymous", "admin", "manager_a", "artist_a", "viewer_a", "artist_b", "agent")
AGENT = "rbac-agent"
OWNER = "artist_a2"
"""Owner of the job and the model of project A (none of the callers)."""

_counter = itertools.count(1)


def _png(color: tuple[int, int, int] = (255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "PNG")
    return buf.getvalue()


@dataclass
class Reply:
    """What one request answered: status, JSON body (None when not JSON) and headers."""

    status: int
    body: Any
    headers: dict[str, str]


async def call(farm: Farm, method: str, path: str, token: str | None = None, **kw: Any) -> Reply:
    """One HTTP request to the farm; a server-sent event stream is closed unread."""
    headers = dict(kw.pop("headers", {}) or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with farm.client.http.request(method, farm.url + path, headers=headers, **kw) as r:
        body: Any = None
        if r.content_type == "application/json":
            body = await r.json()
        elif r.content_type == "text/event-stream":
            r.close()
        else:
            await r.read()
        return Reply(r.status, body, dict(r.headers))


@dataclass
class World:
    """Projects, users, tokens and the objects of project A that the requests name."""

    farm: Farm
    model_bytes: bytes
    project_ids: dict[str, str] = field(default_factory=dict)
    user_ids: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    model_id: str = ""
    job_id: str = ""
    task_id: str = ""
    """A queued task of ``job_id`` (no agent holds it)."""
    signed_url: str = ""
    """Path and query of the signed download link of frame 1 of ``job_id``."""

    def token(self, caller: str) -> str | None:
        """The bearer token of ``caller`` (None for ``anonymous``)."""
        return self.tokens.get(caller)

    async def new_job(self, owner: str = OWNER, frames: str = "1") -> str:
        """A fresh queued job in project A owned by ``owner``; returns its id."""
        r = await call(
            self.farm,
            "POST",
            "/api/jobs",
            self.tokens[owner],
            json={"model_id": self.model_id, "frames": frames},
        )
        assert r.status == 201, r.body
        return r.body["id"]


async def build_world(farm: Farm, sample_blend: Path, *, frame: bool = True) -> World:
    """Projects A and B, the users of ``ROLES_OF`` with personal tokens made through a login,
    an agent token, a model in A and a job in A owned by ``artist_a2``.

    With ``frame``, an agent leases the job's first task, stores frame 1 and completes it,
    so that the outputs routes have something to serve; ``task_id`` is the second task."""
    w = World(farm, sample_blend.read_bytes())
    w.tokens["admin"] = farm.token
    for key, name in PROJECTS.items():
        r = await call(farm, "POST", "/api/projects", farm.token, json={"name": name})
        assert r.status == 201, r.body
        w.project_ids[key] = r.body["id"]
    for user in (*ROLES_OF, *EXTRA_USERS):
        r = await call(farm, "POST", "/api/users", farm.token, json={"username": user, "password": PASSWORD})
        assert r.status == 201, r.body
        w.user_ids[user] = r.body["id"]
    for user, roles in ROLES_OF.items():
        for key, role in roles.items():
            r = await call(
                farm, "PUT", f"/api/projects/{PROJECTS[key]}/members/{user}", farm.token, json={"role": role}
            )
            assert r.status == 200, r.body
    for user in ROLES_OF:
        r = await call(farm, "POST", "/api/auth/login", json={"username": user, "password": PASSWORD})
        assert r.status == 200, r.body
        r = await call(farm, "POST", "/api/tokens", r.body["access_token"], json={"name": "rbac"})
        assert r.status == 201, r.body
        w.tokens[user] = r.body["token"]
    w.tokens["agent"] = await farm.agent_token(AGENT, register=True)

    r = await call(
        farm,
        "POST",
        f"/api/models?filename=sample.blend&project={PROJECTS['A']}",
        w.tokens[OWNER],
        data=w.model_bytes,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status == 201, r.body
    assert r.body["project_id"] == w.project_ids["A"]
    w.model_id = r.body["id"]
    w.job_id = await w.new_job(frames="1-2")
    r = await call(farm, "GET", f"/api/jobs/{w.job_id}/tasks", w.tokens[OWNER])
    assert r.status == 200, r.body
    first, second = r.body["tasks"]
    w.task_id = second["id"]
    if frame:
        agent = w.tokens["agent"]
        r = await call(farm, "POST", f"/api/agent/tasks/{first['id']}/claim", agent, json={})
        assert r.status == 200, r.body
        lease = r.body["lease_id"]
        r = await call(
            farm,
            "PUT",
            f"/api/agent/tasks/{first['id']}/frames/1?ext=.png&lease_id={lease}",
            agent,
            data=_png(),
        )
        assert r.status == 201, r.body
        r = await call(
            farm,
            "POST",
            f"/api/agent/tasks/{first['id']}/result",
            agent,
            json={"lease_id": lease, "status": "completed"},
        )
        assert r.status == 200 and r.body["state"] == "completed", r.body
        r = await call(farm, "GET", f"/api/jobs/{w.job_id}/outputs", w.tokens[OWNER])
        assert r.status == 200 and [f["frame"] for f in r.body["frames"]] == [1], r.body
        w.signed_url = r.body["frames"][0]["url"]
        assert w.signed_url.startswith("/files/"), w.signed_url
    return w


# ------------------------------------------------------------------ the sample table


Fresh = Callable[[World, str], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Sample:
    """How to call one route in the matrix.

    Attributes:
        json: the JSON body (None: no body).
        data: ``"png"`` or ``"model"``: a raw body (a small PNG, the sample .blend).
        query: appended to the path (``?...``).
        fresh: called before each request with ``(world, caller)``; returns overrides of
            the path parameters and of ``json`` (a fresh job to cancel, a fresh token to revoke).
        url: a path (with query) used instead of the route's (``/files/``: the signed link).
        self_rule: for ``self`` routes whose handler also checks ownership: the expected
            status of ``caller`` (None: allowed).
    """

    json: Any = None
    data: str | None = None
    query: str = ""
    fresh: Fresh | None = None
    url: Callable[[World], str] | None = None
    self_rule: Callable[[World, str], int | None] | None = None


async def _fresh_login(w: World, caller: str) -> dict[str, Any]:
    session, _ = await auth.login(w.farm.ctx, "artist_a", PASSWORD)
    return {"json": {"refresh_token": session.refresh_token}}


async def _fresh_user(w: World, caller: str) -> dict[str, Any]:
    return {"json": {"username": f"made{next(_counter)}", "password": PASSWORD}}


async def _fresh_project(w: World, caller: str) -> dict[str, Any]:
    return {"json": {"name": f"made{next(_counter)}"}}


async def _fresh_member(w: World, caller: str) -> dict[str, Any]:
    await auth.set_member(w.farm.ctx, w.project_ids["A"], "member_tmp", "viewer")
    return {"user": "member_tmp"}


async def _fresh_token(w: World, caller: str) -> dict[str, Any]:
    r = await call(w.farm, "POST", "/api/tokens", w.tokens["artist_a"], json={"name": "to revoke"})
    assert r.status == 201, r.body
    return {"token_id": r.body["id"]}


async def _fresh_job(w: World, caller: str) -> dict[str, Any]:
    return {"job_id": await w.new_job()}


def _token_owner_or_admin(w: World, caller: str) -> int | None:
    """DELETE /api/tokens/{id}: the owner (artist_a) or an admin; anyone else sees no such token."""
    return None if caller in ("admin", "artist_a") else 404


STALE = {"lease_id": "stale"}

SAMPLES: dict[tuple[str, str], Sample] = {
    # accounts
    ("POST", "/api/auth/login"): Sample(json={"username": "artist_a", "password": PASSWORD}),
    ("POST", "/api/auth/refresh"): Sample(fresh=_fresh_login),
    ("POST", "/api/auth/logout"): Sample(json={}),
    ("GET", "/api/me"): Sample(),
    ("POST", "/api/me/password"): Sample(json={"current_password": "incomplete"}),  # 400: no new one
    ("GET", "/api/users"): Sample(),
    ("POST", "/api/users"): Sample(fresh=_fresh_user),
    ("PATCH", "/api/users/{user_id}"): Sample(json={"disabled": False}),
    ("GET", "/api/projects"): Sample(),
    ("POST", "/api/projects"): Sample(fresh=_fresh_project),
    ("GET", "/api/projects/{project_id}"): Sample(),
    ("PUT", "/api/projects/{project_id}/members/{user}"): Sample(json={"role": "artist"}),
    ("DELETE", "/api/projects/{project_id}/members/{user}"): Sample(fresh=_fresh_member),
    ("GET", "/api/tokens"): Sample(),
    ("POST", "/api/tokens"): Sample(json={"name": "matrix"}),
    ("POST", "/api/agent-tokens"): Sample(json={"agent_name": "matrix-agent"}),
    ("DELETE", "/api/tokens/{token_id}"): Sample(fresh=_fresh_token, self_rule=_token_owner_or_admin),
    # agents (bodies an allowed agent gets 400 or 409 for: nothing is leased)
    ("POST", "/api/agent/tasks/{task_id}/claim"): Sample(json={"agent": ""}),
    ("POST", "/api/agent/tasks/{task_id}/heartbeat"): Sample(json=STALE),
    ("PUT", "/api/agent/tasks/{task_id}/frames/{frame}"): Sample(
        data="png", query="?ext=.png&lease_id=stale"
    ),
    ("POST", "/api/agent/tasks/{task_id}/result"): Sample(json={**STALE, "status": "failed"}),
    ("POST", "/api/agent/tasks/{task_id}/release"): Sample(json=STALE),
    ("POST", "/api/agent/register"): Sample(json={}),
    ("POST", "/api/agent/heartbeat"): Sample(json={}),
    # jobs
    ("POST", "/api/jobs"): Sample(
        fresh=lambda w, c: _const({"json": {"model_id": w.model_id, "frames": "1"}})
    ),
    ("GET", "/api/jobs"): Sample(),
    ("GET", "/api/jobs/{job_id}"): Sample(),
    ("GET", "/api/jobs/{job_id}/events"): Sample(),
    ("GET", "/api/events"): Sample(),
    ("GET", "/api/jobs/{job_id}/tasks"): Sample(),
    ("GET", "/api/tasks/{task_id}/status"): Sample(),
    ("PATCH", "/api/jobs/{job_id}"): Sample(json={"priority": 1}),
    ("POST", "/api/jobs/{job_id}/cancel"): Sample(fresh=_fresh_job),
    ("POST", "/api/jobs/{job_id}/retry"): Sample(),  # 409 for those allowed: nothing failed
    ("GET", "/api/jobs/{job_id}/blocklist"): Sample(),
    ("DELETE", "/api/jobs/{job_id}/blocklist/{agent}"): Sample(),  # 404 for those allowed: not blocklisted
    # the web UI
    ("GET", "/"): Sample(),
    ("GET", "/ui/{file}"): Sample(),
    # meta
    ("GET", "/healthz"): Sample(),
    ("GET", "/api/openapi.json"): Sample(),
    ("GET", "/metrics"): Sample(),
    # models, nodes, outputs
    ("POST", "/api/models"): Sample(data="model", query=f"?filename=sample.blend&project={PROJECTS['A']}"),
    ("GET", "/api/models"): Sample(),
    ("GET", "/api/models/{model_id}"): Sample(),
    ("GET", "/api/agents"): Sample(),
    ("PATCH", "/api/agents/{name}"): Sample(  # enabling an enabled agent changes nothing
        fresh=lambda w, c: _const({"name": AGENT, "json": {"enabled": True}})
    ),
    ("GET", "/api/jobs/{job_id}/outputs"): Sample(),
    ("GET", "/api/jobs/{job_id}/outputs.zip"): Sample(),
    ("GET", "/api/jobs/{job_id}/outputs/{frame}"): Sample(),
    ("GET", "/api/jobs/{job_id}/outputs/{frame}/thumbnail"): Sample(query="?size=16"),
    ("GET", "/files/{key:.+}"): Sample(url=lambda w: w.signed_url),
    # audit
    ("GET", "/api/audit"): Sample(),
    ("GET", "/api/audit/verify"): Sample(),
}
"""A request per route (method, path as registered). Add every new route here."""


async def _const(value: dict[str, Any]) -> dict[str, Any]:
    return value


SCOPE_OBJECT = {
    "job": ("job", "job_id"),
    "task": ("task", "task_id"),
    "model": ("model", "model_id"),
    "project": ("project", "project_id"),
    "upload": ("project", None),
    "job-create": ("model", None),
}
"""``scope: (kind of the object, path parameter naming it)`` (None: named by the query or body)."""


def default_params(w: World) -> dict[str, str]:
    """Path parameters naming the objects of project A (and users, tokens of its members)."""
    return {
        "job_id": w.job_id,
        "task_id": w.task_id,
        "model_id": w.model_id,
        "project_id": PROJECTS["A"],
        "user": "artist_a",
        "user_id": "throwaway",
        "token_id": "",  # every route naming a token has a fresh one
        "frame": "1",
        "key": "anything",
        "agent": AGENT,
        "file": "app.js",
    }


def fill(path: str, params: dict[str, str]) -> str:
    """``path`` with its ``{name}`` and ``{name:regex}`` parameters filled in."""
    return re.sub(r"\{(\w+)(?::[^}]*)?\}", lambda m: quote(params[m[1]], safe=""), path)


def expected(w: World, info: RouteInfo, sample: Sample, caller: str) -> int | None:
    """The status the permission table demands for ``caller`` (None: allowed)."""
    perm = info.permission
    if perm == "public":
        return None
    if caller == "anonymous":
        return 401
    if perm == "agent":
        return None if caller == "agent" else 403
    if caller == "agent":
        return 403
    admin = caller == "admin"
    if perm == "self":
        return sample.self_rule(w, caller) if sample.self_rule else None
    if perm in ADMIN_PERMISSIONS:
        return None if admin else 403
    roles = ROLES_OF.get(caller, {})
    if info.scope == "any":
        return None if admin or any(grant(r, perm) for r in roles.values()) else 403
    assert info.scope in SCOPE_OBJECT, f"{info.method} {info.path}: scope {info.scope!r} unknown to the test"
    role = "admin" if admin else roles.get("A")  # every scoped object is project A's
    if role is None:
        return 404
    owner = OWNER if info.scope in ("job", "task", "model", "job-create") else None
    return None if allows(role, perm, owns=owner == caller) else 403


def hidden_message(info: RouteInfo, ident: str) -> str:
    """The message of the 404 for the route's scoped object ``ident`` when it does not exist."""
    kind, _ = SCOPE_OBJECT[info.scope or ""]
    return not_found(kind, ident).message


def scoped_ident(w: World, info: RouteInfo, params: dict[str, str], body: Any) -> str | None:
    """The id (as given in the request) of the object the route's permission is checked on."""
    if info.scope not in SCOPE_OBJECT:
        return None
    _, param = SCOPE_OBJECT[info.scope]
    if param is not None:
        return params[param]
    if info.scope == "upload":
        return PROJECTS["A"]
    return body["model_id"] if isinstance(body, dict) else None


@dataclass
class Cell:
    """One request of the matrix."""

    got: int
    want: int | None
    problem: str = ""


def render(matrix: dict[str, dict[str, Cell]]) -> str:
    """The matrix as text: ``got`` per caller, ``got!=want`` where it is wrong (``ok`` = allowed)."""
    width = max(len(k) for k in matrix) + 2
    lines = ["".ljust(width) + "".join(c.ljust(16) for c in CALLERS)]
    for route_name, row in matrix.items():
        cells = []
        for caller in CALLERS:
            c = row.get(caller)
            if c is None:
                cells.append("-".ljust(16))
                continue
            want = "ok" if c.want is None else str(c.want)
            cells.append((f"{c.got}" if not c.problem else f"{c.got}!={want}*").ljust(16))
        lines.append(route_name.ljust(width) + "".join(cells))
    problems = [
        f"{route_name} as {caller}: {c.problem}"
        for route_name, row in matrix.items()
        for caller, c in row.items()
        if c.problem
    ]
    return "\n".join([*lines, "", *problems])


# ------------------------------------------------------------------ tests


@pytest.mark.agents(0)
async def test_every_route_declares_a_permission(farm: Farm) -> None:
    """Every handler of the real app's router carries ``route_info``, and the matrix covers it."""
    app = create_app(farm.ctx, run_scheduler=False)
    undeclared, declared = [], set()
    for r in app.router.routes():
        info = getattr(r.handler, "route_info", None)
        name = f"{r.method} {r.resource.canonical if r.resource else '?'}"
        if info is None:
            undeclared.append(name)
        else:
            declared.add((info.method, info.path))
    assert not undeclared, (
        f"routes without a declared permission (use server.api.registry.route): {undeclared}"
    )
    assert declared == {(i.method, i.path) for i, _ in ROUTES}
    missing = sorted(f"{m} {p}" for m, p in declared if (m, p) not in SAMPLES)
    assert not missing, f"add these routes to SAMPLES in tests/test_rbac.py: {missing}"


@pytest.mark.agents(0)
async def test_route_role_matrix(farm: Farm, sample_blend: Path) -> None:
    """Each route x each caller gives exactly the decision of the permission table."""
    w = await build_world(farm, sample_blend)
    missing = [f"{i.method} {i.path}" for i, _ in ROUTES if (i.method, i.path) not in SAMPLES]
    assert not missing, f"add these routes to SAMPLES in tests/test_rbac.py: {missing}"
    matrix: dict[str, dict[str, Cell]] = {}
    for info, _ in ROUTES:
        sample = SAMPLES[(info.method, info.path)]
        row = matrix.setdefault(f"{info.method} {info.path}", {})
        for caller in CALLERS:
            params = default_params(w)
            body = sample.json
            if sample.fresh is not None:
                over = await sample.fresh(w, caller)
                body = over.pop("json", body)
                params.update(over)
            path = sample.url(w) if sample.url else fill(info.path, params) + sample.query
            kw: dict[str, Any] = {}
            if body is not None:
                kw["json"] = body
            if sample.data == "png":
                kw["data"] = _png()
            elif sample.data == "model":
                kw["data"] = w.model_bytes
                kw["headers"] = {"Content-Type": "application/octet-stream"}
            r = await call(farm, info.method, path, w.token(caller), **kw)
            want = expected(w, info, sample, caller)
            cell = Cell(r.status, want)
            err = r.body.get("error") if isinstance(r.body, dict) else None
            if want is not None:
                if r.status != want:
                    cell.problem = f"expected {want}, got {r.status} {r.body}"
                elif not (isinstance(err, dict) and err.get("status") == want and err.get("message")):
                    cell.problem = f"error body is not {{error: {{status, message}}}}: {r.body}"
                elif want == 404 and info.permission not in ("self",):
                    ident = scoped_ident(w, info, params, body)
                    if ident is not None and err.get("message") != hidden_message(info, ident):
                        cell.problem = f"404 differs from a missing object's: {r.body}"
            else:
                ident = scoped_ident(w, info, params, body)
                if r.status in (401, 403) or r.status >= 500:
                    cell.problem = f"allowed, but got {r.status} {r.body}"
                elif (
                    r.status == 404
                    and ident is not None
                    and (err or {}).get("message") == hidden_message(info, ident)
                ):
                    cell.problem = f"allowed, but the object is hidden: {r.body}"
            row[caller] = cell
    table = render(matrix)
    print(table)
    assert not any(c.problem for row in matrix.values() for c in row.values()), "\n" + table


MISSING = "0" * 32
"""An id no object has."""


@pytest.mark.agents(0)
async def test_another_projects_objects_are_invisible(farm: Farm, sample_blend: Path) -> None:
    """artist_b (project B only) gets for each object of project A exactly the 404 of a missing
    one, each refusal is audited as denied, and no list shows A's objects."""
    w = await build_world(farm, sample_blend)
    b = w.tokens["artist_b"]
    # something of B's own, so that the lists below have a thing to show
    r = await call(
        farm,
        "POST",
        f"/api/models?filename=sample.blend&project={PROJECTS['B']}",
        b,
        data=w.model_bytes,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status == 201, r.body
    b_model = r.body["id"]
    r = await call(farm, "POST", "/api/jobs", b, json={"model_id": b_model, "frames": "1"})
    assert r.status == 201, r.body
    b_job = r.body["id"]

    a_project = PROJECTS["A"]
    cases: list[tuple[str, str, str, str, dict[str, Any]]] = [
        # (what, method, path with {id}, the id in A, request keywords)
        ("model", "GET", "/api/models/{id}", w.model_id, {}),
        ("job", "GET", "/api/jobs/{id}", w.job_id, {}),
        ("job", "GET", "/api/jobs/{id}/tasks", w.job_id, {}),
        ("task", "GET", "/api/tasks/{id}/status", w.task_id, {}),
        ("job", "GET", "/api/jobs/{id}/outputs", w.job_id, {}),
        ("job", "GET", "/api/jobs/{id}/outputs/1", w.job_id, {}),
        ("job", "GET", "/api/jobs/{id}/outputs/1/thumbnail", w.job_id, {}),
        ("job", "GET", "/api/jobs/{id}/outputs.zip", w.job_id, {}),
        ("job", "GET", "/api/jobs/{id}/events", w.job_id, {}),
        ("job", "PATCH", "/api/jobs/{id}", w.job_id, {"json": {"priority": 5}}),
        ("job", "POST", "/api/jobs/{id}/cancel", w.job_id, {}),
        ("project", "GET", "/api/projects/{id}", a_project, {}),
        ("project", "GET", "/api/projects/{id}", w.project_ids["A"], {}),
        ("project", "PUT", "/api/projects/{id}/members/artist_b", a_project, {"json": {"role": "manager"}}),
        ("project", "DELETE", "/api/projects/{id}/members/artist_a", a_project, {}),
        (
            "project",
            "POST",
            "/api/models?filename=sample.blend&project={id}",
            a_project,
            {"data": w.model_bytes, "headers": {"Content-Type": "application/octet-stream"}},
        ),
    ]
    problems = []
    for kind, method, template, ident, kw in cases:
        path = template.format(id=ident)
        r = await call(farm, method, path, b, **kw)
        absent_id = MISSING if kind != "project" else "no-such-project"
        gone = await call(farm, method, template.format(id=absent_id), b, **kw)
        if gone.status != 404 or not isinstance(gone.body, dict):
            problems.append(f"{method} {template} on a missing id: {gone.status} {gone.body}, expected 404")
            continue
        # the same body as for a missing object, but for the id
        want = json.loads(json.dumps(gone.body).replace(repr(absent_id), repr(ident)))
        if r.status != 404 or r.body != want:
            problems.append(
                f"{method} {path}: {r.status} {r.body}, expected 404 {want} (as for a missing {kind})"
            )
        if kind != "project" and r.body != not_found(kind, ident).to_dict():
            problems.append(f"{method} {path}: {r.body} is not the usual 404 of a missing {kind}")
        if r.headers.get("Content-Type") != gone.headers.get("Content-Type"):
            problems.append(f"{method} {path}: content type differs from a missing object's")
        async with farm.ctx.db.session() as s:
            row = await s.scalar(select(AuditEntry).order_by(AuditEntry.seq.desc()).limit(1))
            denied = (
                await s.scalars(
                    select(AuditEntry).where(AuditEntry.actor == "artist_b", AuditEntry.outcome == "denied")
                )
            ).all()
        if not any(
            d.status == 404
            and d.detail.get("path") == path.split("?")[0]
            and d.detail.get("method") == method
            for d in denied
        ):
            problems.append(
                f"{method} {path}: no audit row with outcome 'denied' (last row: {row and row.__dict__})"
            )
    # nothing of A was changed by those requests
    r = await call(farm, "GET", f"/api/jobs/{w.job_id}", w.tokens["manager_a"])
    assert r.status == 200 and r.body["state"] != "canceled" and r.body["priority"] == 0, r.body
    r = await call(farm, "GET", f"/api/projects/{a_project}", w.tokens["manager_a"])
    members = {m["user"]: m["role"] for m in r.body["members"]}
    assert members.get("artist_a") == "artist" and "artist_b" not in members, members

    r = await call(farm, "GET", "/api/jobs", b)
    assert r.status == 200
    ids = {j["id"] for j in r.body["jobs"]}
    assert b_job in ids and w.job_id not in ids, ids
    assert {j["project_id"] for j in r.body["jobs"]} == {w.project_ids["B"]}
    r = await call(farm, "GET", "/api/models", b)
    assert r.status == 200
    ids = {m["id"] for m in r.body["models"]}
    assert b_model in ids and w.model_id not in ids, ids
    assert {m["project_id"] for m in r.body["models"]} == {w.project_ids["B"]}
    r = await call(farm, "GET", "/api/projects", b)
    assert [p["name"] for p in r.body["projects"]] == [PROJECTS["B"]]
    r = await call(farm, "GET", "/api/me", b)
    assert [p["name"] for p in r.body["projects"]] == [PROJECTS["B"]]
    # A's members still see A's job, so the filters above are not simply empty
    r = await call(farm, "GET", "/api/jobs", w.tokens["viewer_a"])
    assert w.job_id in {j["id"] for j in r.body["jobs"]} and b_job not in {j["id"] for j in r.body["jobs"]}
    assert not problems, "\n".join(problems)


@pytest.mark.agents(0)
async def test_who_may_create_and_cancel_jobs(farm: Farm, sample_blend: Path) -> None:
    """A viewer can neither create nor cancel; an artist cancels their own job but not another
    artist's (403); a manager cancels any job of the project."""
    w = await build_world(farm, sample_blend, frame=False)
    t = w.tokens

    async def state(job_id: str) -> str:
        r = await call(farm, "GET", f"/api/jobs/{job_id}", t["viewer_a"])
        assert r.status == 200, r.body
        return r.body["state"]

    r = await call(farm, "POST", "/api/jobs", t["viewer_a"], json={"model_id": w.model_id, "frames": "1"})
    assert r.status == 403 and "viewer" in r.body["error"]["message"], r.body
    others = await w.new_job(OWNER)
    r = await call(farm, "POST", f"/api/jobs/{others}/cancel", t["viewer_a"])
    assert r.status == 403, r.body
    r = await call(farm, "PATCH", f"/api/jobs/{others}", t["viewer_a"], json={"priority": 3})
    assert r.status == 403, r.body

    mine = await w.new_job("artist_a")
    r = await call(farm, "GET", f"/api/jobs/{mine}", t["artist_a"])
    assert r.body["owner"] == "artist_a"
    r = await call(farm, "POST", f"/api/jobs/{others}/cancel", t["artist_a"])
    assert r.status == 403 and "others" in r.body["error"]["message"], r.body
    r = await call(farm, "PATCH", f"/api/jobs/{others}", t["artist_a"], json={"priority": 3})
    assert r.status == 403, r.body
    assert await state(others) == "queued"
    r = await call(farm, "PATCH", f"/api/jobs/{mine}", t["artist_a"], json={"priority": 3})
    assert r.status == 200 and r.body["priority"] == 3, r.body
    r = await call(farm, "POST", f"/api/jobs/{mine}/cancel", t["artist_a"])
    assert r.status == 200 and r.body["state"] == "canceled", r.body

    r = await call(farm, "PATCH", f"/api/jobs/{others}", t["manager_a"], json={"priority": 7})
    assert r.status == 200 and r.body["priority"] == 7, r.body
    r = await call(farm, "POST", f"/api/jobs/{others}/cancel", t["manager_a"])
    assert r.status == 200 and r.body["state"] == "canceled", r.body
    assert await state(others) == "canceled"
    # a manager of A is nobody in B: B's job is invisible to them
    b_model = await _b_job(w)
    r = await call(farm, "POST", f"/api/jobs/{b_model}/cancel", t["manager_a"])
    assert r.status == 404, r.body


@pytest.mark.agents(0)
async def test_role_changes_apply_at_once(farm: Farm, sample_blend: Path) -> None:
    """A role granted, lowered or removed counts from the next request on (no principal is
    reused from before the change)."""
    w = await build_world(farm, sample_blend, frame=False)
    t = w.tokens
    job = {"model_id": w.model_id, "frames": "1"}
    members = f"/api/projects/{PROJECTS['A']}/members"
    assert (await call(farm, "GET", f"/api/jobs/{w.job_id}", t["artist_a"])).status == 200
    assert (await call(farm, "GET", f"/api/jobs/{w.job_id}", t["artist_b"])).status == 404

    r = await call(farm, "PUT", f"{members}/artist_a", t["manager_a"], json={"role": "viewer"})
    assert r.status == 200, r.body
    r = await call(farm, "POST", "/api/jobs", t["artist_a"], json=job)
    assert r.status == 403, r.body
    r = await call(farm, "DELETE", f"{members}/artist_a", t["manager_a"])
    assert r.status == 204, r.body
    r = await call(farm, "GET", f"/api/jobs/{w.job_id}", t["artist_a"])
    assert r.status == 404, r.body
    r = await call(farm, "GET", "/api/jobs", t["artist_a"])
    assert r.status == 403, r.body  # job:read in no project any more

    r = await call(farm, "PUT", f"{members}/artist_b", t["manager_a"], json={"role": "artist"})
    assert r.status == 200, r.body
    assert (await call(farm, "GET", f"/api/jobs/{w.job_id}", t["artist_b"])).status == 200
    r = await call(farm, "POST", "/api/jobs", t["artist_b"], json=job)
    assert r.status == 201, r.body
    r = await call(farm, "PUT", f"{members}/manager_a", t["manager_a"], json={"role": "viewer"})
    assert r.status == 200, r.body  # a manager steps down ...
    r = await call(farm, "PUT", f"{members}/manager_a", t["manager_a"], json={"role": "manager"})
    assert r.status == 403, r.body  # ... and cannot take it back


async def _b_job(w: World) -> str:
    """A job of project B submitted by artist_b; returns its id."""
    r = await call(
        w.farm,
        "POST",
        f"/api/models?filename=sample.blend&project={PROJECTS['B']}",
        w.tokens["artist_b"],
        data=w.model_bytes,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status == 201, r.body
    r = await call(
        w.farm, "POST", "/api/jobs", w.tokens["artist_b"], json={"model_id": r.body["id"], "frames": "1"}
    )
    assert r.status == 201, r.body
    return r.body["id"]
