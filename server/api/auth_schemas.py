"""Request and response bodies of the account routes (login, users, projects, tokens, audit)."""

from __future__ import annotations

import unicodedata
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool


def no_hidden(value: str) -> str:
    """``value`` when it holds no control, format or line-separator character (Unicode categories
    Cc, Cf, Zl, Zp: C0/C1 controls and terminal escapes, zero-width and bidirectional marks, which
    make a name read as another or act on a terminal).

    Raises:
        ValueError: naming the first such character.
    """
    for i, c in enumerate(value):
        if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp"):
            raise ValueError(f"must not hold control or invisible characters (U+{ord(c):04X} at {i})")
    return value


PlainText = Annotated[str, AfterValidator(no_hidden)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginRequest(_Strict):
    """``POST /api/auth/login``."""

    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)
    cookie: StrictBool = Field(
        False,
        description="true: the refresh token is set as the HttpOnly cookie rf_refresh (Path=/api/auth, "
        "SameSite=Strict) instead of being returned in the body (for the web UI)",
    )


class RefreshRequest(_Strict):
    """``POST /api/auth/refresh``: the refresh token, or none to use the ``rf_refresh`` cookie
    (which then needs the header ``X-Requested-With: renderfarm``)."""

    refresh_token: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="omit to use the rf_refresh cookie (send X-Requested-With: renderfarm)",
    )


class LogoutRequest(_Strict):
    """``POST /api/auth/logout``: the refresh token of the login to end (default: the caller's, or
    the ``rf_refresh`` cookie's when no bearer token is sent)."""

    refresh_token: str | None = Field(None, max_length=200)


class SessionOut(BaseModel):
    """A login: a short-lived access token and the refresh token that renews it (rotates on use)."""

    access_token: str
    token_type: str = "bearer"  # noqa: S105  (the OAuth 2.0 token type, RFC 6750)
    expires_in: int = Field(description="seconds the access token is valid")
    refresh_token: str | None = Field(
        None, description="null when the refresh token was set as the rf_refresh cookie instead"
    )


class ProjectRole(BaseModel):
    """A project and the caller's (or a user's) role in it."""

    id: str
    name: str
    role: str | None


class MeOut(BaseModel):
    """``GET /api/me``."""

    id: str
    username: str
    is_admin: bool
    projects: list[ProjectRole]


class PasswordChange(_Strict):
    """``POST /api/me/password``."""

    current_password: str = Field(min_length=1, max_length=1024)
    new_password: str = Field(min_length=1, max_length=1024)


class UserCreate(_Strict):
    """``POST /api/users``."""

    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)
    is_admin: StrictBool = False


class UserUpdate(_Strict):
    """``PATCH /api/users/{user_id}``: disabling or a new password revokes every token of the user."""

    disabled: StrictBool | None = None
    password: str | None = Field(None, min_length=1, max_length=1024)
    is_admin: StrictBool | None = None


class UserOut(BaseModel):
    """A user (never the password hash)."""

    id: str
    username: str
    is_admin: bool
    disabled: bool
    created_at: str
    projects: list[ProjectRole]


class UserList(BaseModel):
    """``GET /api/users``."""

    users: list[UserOut]


class ProjectCreate(_Strict):
    """``POST /api/projects``."""

    name: str = Field(min_length=1, max_length=64)


class MemberOut(BaseModel):
    """A member of a project."""

    user: str
    user_id: str
    role: str


class MemberSet(_Strict):
    """``PUT /api/projects/{project_id}/members/{user}``."""

    role: str = Field(description="manager, artist or viewer")


class ProjectOut(BaseModel):
    """A project, the caller's role in it and its members."""

    id: str
    name: str
    role: str | None
    members: list[MemberOut]


class ProjectList(BaseModel):
    """``GET /api/projects``."""

    projects: list[ProjectOut]


class TokenCreate(_Strict):
    """``POST /api/tokens``: a personal API token for the CLI or the Blender add-on."""

    name: PlainText = Field(min_length=1, max_length=255)
    expires_days: float = Field(90, ge=1 / 24, le=365, strict=True, description="1 hour to 365 days")


class AgentTokenCreate(_Strict):
    """``POST /api/agent-tokens``: a token a node agent registers with, bound to its name."""

    agent_name: str = Field(min_length=1, max_length=128)
    name: PlainText = Field("", max_length=255)


class TokenOut(BaseModel):
    """A token's record; ``token`` only in the answer that creates it (shown once)."""

    id: str
    kind: str
    name: str
    agent_name: str | None = None
    user: str | None = None
    created_by: str
    created_at: str | None
    expires_at: str | None
    last_used_at: str | None
    revoked_at: str | None
    token: str | None = None


class TokenList(BaseModel):
    """``GET /api/tokens``."""

    tokens: list[TokenOut]
