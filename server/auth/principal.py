"""Who is calling: a user (with their roles per project) or a node agent."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.auth.permissions import ALL, OWN, ROLE_PERMISSIONS


@dataclass
class Principal:
    """The caller of a request, resolved from its bearer token.

    Attributes:
        kind: ``user`` or ``agent``.
        name: the user name, or the agent name an agent token is bound to.
        user_id: the user's id (None for an agent).
        is_admin: the global admin flag.
        roles: ``{project_id: role}`` of the user's memberships.
        token_id: the personal or agent token used (None for a JWT access token).
        session: the refresh family of a JWT access token's login.
    """

    kind: str
    name: str
    user_id: str | None = None
    is_admin: bool = False
    roles: dict[str, str] = field(default_factory=dict)
    token_id: str | None = None
    session: str | None = None

    def role_in(self, project_id: str | None) -> str | None:
        """The role that counts in ``project_id``: ``admin`` for admins, else the membership's."""
        if self.is_admin:
            return "admin"
        return self.roles.get(project_id) if project_id is not None else None

    def projects_with(self, permission: str) -> list[str]:
        """Projects in which the user holds ``permission`` (for all or own objects)."""
        return [
            p
            for p, role in self.roles.items()
            if ROLE_PERMISSIONS.get(role, {}).get(permission) in (ALL, OWN)
        ]
