"""Tokens.

* **Access tokens** are JWTs (RFC 7519) signed with HS256 by PyJWT. The header carries
  ``kid``; every key of the key ring verifies, the first signs (see
  ``Settings.jwt_keyring``). Claims: ``sub`` (user id), ``ver`` (the user's
  ``token_version``), ``sid`` (the refresh family of the login), ``typ`` = ``access``,
  ``iat``, ``exp``, ``iss`` = ``renderfarm``. Only HS256 is accepted: a token with
  ``alg: none`` or another algorithm is refused (RFC 8725 3.1).
* **Opaque tokens** (personal API ``rfp_``, agent ``rfa_``, refresh ``rfr_``) are 32
  random bytes in URL-safe base64 after the prefix. The database keeps only their SHA-256
  (a fast hash is enough for 256-bit random secrets; argon2 is for passwords).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

import jwt

ALGORITHM = "HS256"
ISSUER = "renderfarm"
PREFIXES = {"personal": "rfp_", "agent": "rfa_", "refresh": "rfr_"}


class TokenError(Exception):
    """A token that cannot be used; the message says why (expired, bad signature, unknown key...)."""


@dataclass(frozen=True)
class AccessClaims:
    """The claims of a verified access token."""

    user_id: str
    version: int
    session: str
    expires_at: float
    """Unix seconds."""


class KeyRing:
    """Signing keys by id.

    Args:
        active: the kid that signs new tokens.
        keys: ``{kid: secret}``; every one verifies.
    """

    def __init__(self, active: str, keys: dict[str, str]) -> None:
        if active not in keys:
            raise ValueError(f"signing key {active!r} is not in the key ring")
        self.active = active
        self.keys = dict(keys)

    def issue_access(self, user_id: str, version: int, session: str, ttl_s: float) -> str:
        """A signed access token for ``user_id`` valid ``ttl_s`` seconds."""
        now = int(time.time())
        claims = {
            "sub": user_id,
            "ver": version,
            "sid": session,
            "typ": "access",
            "iss": ISSUER,
            "iat": now,
            "exp": now + int(ttl_s),
        }
        return jwt.encode(claims, self.keys[self.active], algorithm=ALGORITHM, headers={"kid": self.active})

    def verify_access(self, token: str) -> AccessClaims:
        """The claims of ``token`` after checking its header, signature, issuer, type and expiry.

        Raises:
            TokenError: naming what is wrong: not a JWT, an algorithm other than HS256
                (``none`` included), an unknown ``kid``, a bad signature, expired, or a
                claim missing.
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise TokenError(f"not a valid token: {exc}") from None
        if header.get("alg") != ALGORITHM:
            raise TokenError(f"token algorithm {header.get('alg')!r} is not accepted")
        kid = header.get("kid")
        secret = self.keys.get(kid) if isinstance(kid, str) else None
        if secret is None:
            raise TokenError("token signed with an unknown key")
        try:
            claims = jwt.decode(
                token,
                secret,
                algorithms=[ALGORITHM],
                issuer=ISSUER,
                options={"require": ["exp", "iat", "sub", "iss"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise TokenError(f"token refused: {exc}") from None
        if claims.get("typ") != "access" or not isinstance(claims.get("ver"), int):
            raise TokenError("not an access token")
        return AccessClaims(
            str(claims["sub"]), claims["ver"], str(claims.get("sid", "")), float(claims["exp"])
        )


def new_opaque(kind: str) -> str:
    """A new opaque token of ``kind`` (``personal``, ``agent`` or ``refresh``)."""
    return PREFIXES[kind] + secrets.token_urlsafe(32)


def opaque_kind(token: str) -> str | None:
    """The kind of an opaque token by its prefix, or None when it is not one."""
    for kind, prefix in PREFIXES.items():
        if token.startswith(prefix):
            return kind
    return None


def token_hash(token: str) -> str:
    """SHA-256 (hex) of a token, as stored."""
    return hashlib.sha256(token.encode()).hexdigest()
