"""The one table of what each role may do.

Roles: ``admin`` is global (a user flag) and may do everything; ``manager``, ``artist``
and ``viewer`` are held per project (a membership). A permission is granted to a role
for every object of the project (``ALL``) or only for the objects the user owns
(``OWN``: an artist cancels and re-prioritises their own jobs, a manager any job of
the project). Every route declares one permission (see :mod:`server.api.registry`);
:mod:`server.api.access` enforces it, and ``tests/test_rbac.py`` walks every route
against every role and compares the outcome with this table.

Special permissions, not granted by a role:

* ``public`` -- no token needed (health, OpenAPI, login, signed download links);
* ``agent`` -- a node agent's token; an agent touches only the tasks leased to it;
* ``self`` -- any logged-in user, acting on their own account (profile, own tokens).
"""

from __future__ import annotations

from typing import Final

ALL: Final = "all"
OWN: Final = "own"

PROJECT_ROLES = ("manager", "artist", "viewer")
"""Roles held in a project, strongest first."""
ROLES = ("admin", *PROJECT_ROLES)

SPECIAL = ("public", "agent", "self")

PROJECT_PERMISSIONS = (
    "project:read",
    "model:read",
    "model:create",
    "job:read",
    "job:create",
    "job:cancel",
    "job:update",
    "output:read",
    "node:read",
    "member:manage",
)
"""Permissions a project role can hold (checked against the role in the object's project)."""

ADMIN_PERMISSIONS = ("project:create", "user:manage", "agent-token:manage", "audit:read")
"""Permissions only the global admin holds."""

_VIEWER = {"project:read": ALL, "model:read": ALL, "job:read": ALL, "output:read": ALL, "node:read": ALL}
_ARTIST = {**_VIEWER, "model:create": ALL, "job:create": ALL, "job:cancel": OWN, "job:update": OWN}
_MANAGER = {**_ARTIST, "job:cancel": ALL, "job:update": ALL, "member:manage": ALL}

ROLE_PERMISSIONS: Final[dict[str, dict[str, str]]] = {
    "admin": {p: ALL for p in (*PROJECT_PERMISSIONS, *ADMIN_PERMISSIONS)},
    "manager": _MANAGER,
    "artist": _ARTIST,
    "viewer": _VIEWER,
}
"""``{role: {permission: ALL | OWN}}``; a permission missing from a role's map is refused."""

PERMISSIONS = (*SPECIAL, *PROJECT_PERMISSIONS, *ADMIN_PERMISSIONS)
"""Every permission a route may declare."""


def grant(role: str | None, permission: str) -> str | None:
    """How ``role`` holds ``permission``: ``ALL``, ``OWN`` or None (refused)."""
    if role is None:
        return None
    return ROLE_PERMISSIONS.get(role, {}).get(permission)


def allows(role: str | None, permission: str, owns: bool) -> bool:
    """Whether ``role`` may use ``permission`` on an object (``owns``: the caller owns it)."""
    g = grant(role, permission)
    return g == ALL or (g == OWN and owns)


def roles_with(permission: str) -> list[str]:
    """The roles that hold ``permission`` (for OpenAPI), ``"artist (own)"`` style for ``OWN``."""
    out = []
    for role in ROLES:
        g = grant(role, permission)
        if g == ALL:
            out.append(role)
        elif g == OWN:
            out.append(f"{role} (own)")
    return out
