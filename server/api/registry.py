"""Route registry: every route declares its permission and its schemas, from which OpenAPI is built.

Permissions (enforced by :mod:`server.api.middleware`):

* ``public`` -- anyone (health, OpenAPI, signed file URLs that carry their own signature);
* ``agent`` -- a node agent, with the farm's agent token as a Bearer token;
* ``model:create``, ``model:read``, ``job:create``, ``job:read``, ``job:cancel``, ``job:update``,
  ``output:read``, ``node:read`` -- user permissions. Until accounts and per-project roles land,
  the embedded farm grants them to every caller and listens on 127.0.0.1 only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PERMISSIONS = (
    "public",
    "agent",
    "model:create",
    "model:read",
    "job:create",
    "job:read",
    "job:cancel",
    "job:update",
    "output:read",
    "node:read",
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

    def deco(fn: Handler) -> Handler:
        info = RouteInfo(method, path, permission, summary, **kw)
        fn.route_info = info  # type: ignore[attr-defined]
        ROUTES.append((info, fn))
        return fn

    return deco


def add_routes(app: web.Application) -> None:
    """Add every registered route to ``app``."""
    for info, handler in ROUTES:
        app.router.add_route(info.method, info.path, handler)
