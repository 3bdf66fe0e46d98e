"""Route registry: every route declares its permission and its schemas, from which OpenAPI is built.

Permissions and which role holds each are in :mod:`server.auth.permissions`; they are
enforced for every route by :mod:`server.api.access` (through the auth middleware), on the
object the route names: a route with ``{job_id}``, ``{task_id}``, ``{model_id}`` or
``{project_id}`` in its path is checked against that object's project; other project
routes declare their ``scope``:

* ``any`` -- a list: the caller needs the permission in at least one project, and the
  handler shows only those projects' objects;
* ``upload`` -- the project named by the ``project`` query parameter (or the caller's only one);
* ``job-create`` -- the project of the model named in the body.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from server.auth.permissions import ADMIN_PERMISSIONS, PERMISSIONS, PROJECT_PERMISSIONS

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SCOPES = ("any", "upload", "job-create", "job", "task", "model", "project")
PATH_SCOPES = (
    ("{job_id}", "job"),
    ("{task_id}", "task"),
    ("{model_id}", "model"),
    ("{project_id}", "project"),
)


@dataclass(frozen=True)
class RouteInfo:
    """What a route declares: method, path, permission, summary, schemas and content types."""

    method: str
    path: str
    permission: str
    summary: str
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    request_content: str | None = None
    response_content: str = "application/json"
    query: dict[str, str] = field(default_factory=dict)
    status: int = 200
    also: dict[int, str] = field(default_factory=dict)
    """Other success statuses and what they mean (e.g. 200 for an upload seen before)."""
    integer_query: tuple[str, ...] = ()
    scope: str | None = None
    """What object the permission is checked on (see the module docstring); None for
    ``public``, ``agent``, ``self`` and admin permissions."""
    audit: bool = True
    """Audit state-changing calls of this route (False only for lease renewals, which change
    nothing but an expiry time, and for routes that write their own audit rows)."""
    action: str = ""
    """The audit action name, e.g. ``jobs.cancel_job`` (the handler's module and name)."""


ROUTES: list[tuple[RouteInfo, Handler]] = []


def route(
    method: str, path: str, *, permission: str, summary: str, **kw: Any
) -> Callable[[Handler], Handler]:
    """Register a handler; ``permission`` must be one of :data:`PERMISSIONS`.

    Raises:
        ValueError: for an unknown permission (at import time).
    """
    if permission not in PERMISSIONS:
        raise ValueError(f"unknown permission {permission!r} on {method} {path}")
    scope = kw.pop("scope", None)
    if permission in PROJECT_PERMISSIONS and permission != "node:read":
        for param, kind in PATH_SCOPES:
            if scope is None and param in path:
                scope = kind
        if scope not in SCOPES:
            raise ValueError(f"{method} {path}: permission {permission!r} needs a scope (one of {SCOPES})")
    elif permission == "node:read":
        scope = "any"
    elif permission not in ADMIN_PERMISSIONS and scope is not None:
        raise ValueError(f"{method} {path}: permission {permission!r} takes no scope")

    def deco(fn: Handler) -> Handler:
        module = fn.__module__.rsplit(".", 1)[-1]
        kw.setdefault("action", f"{module}.{fn.__name__}")
        info = RouteInfo(method, path, permission, summary, scope=scope, **kw)
        fn.route_info = info  # type: ignore[attr-defined]
        ROUTES.append((info, fn))
        return fn

    return deco


def add_routes(app: web.Application) -> None:
    """Add every registered route to ``app``."""
    for info, handler in ROUTES:
        app.router.add_route(info.method, info.path, handler)
