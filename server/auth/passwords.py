"""Password hashing with argon2id (argon2-cffi, RFC 9106 parameters as the library defaults them)."""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_HASHER = PasswordHasher()  # argon2id, RFC 9106 "low memory" profile: t=3, m=64 MiB, p=4
_DUMMY = _HASHER.hash("not a password of anyone")

MIN_LENGTH = 10
"""Shortest password accepted, in characters."""
MAX_LENGTH = 1024
"""Longest password accepted (argon2 takes any length; this bounds the work of a request)."""


def check_policy(password: str) -> None:
    """Refuse a password too short or too long.

    Raises:
        ValueError: naming the rule broken.
    """
    if len(password) < MIN_LENGTH:
        raise ValueError(f"password must have at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        raise ValueError(f"password must have at most {MAX_LENGTH} characters")


def hash_password(password: str) -> str:
    """The argon2id hash (PHC string, e.g. ``$argon2id$v=19$m=65536,t=3,p=4$...``) of ``password``."""
    return _HASHER.hash(password)


def verify_password(stored: str | None, password: str) -> bool:
    """Whether ``password`` matches the ``stored`` hash.

    With ``stored`` None (no such user) a dummy hash is checked, so that an unknown
    user name takes as long as a wrong password. Never raises.
    """
    try:
        return _HASHER.verify(stored or _DUMMY, password[:MAX_LENGTH]) and stored is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(stored: str) -> bool:
    """Whether ``stored`` was made with weaker parameters than today's (rehash at the next login)."""
    try:
        return _HASHER.check_needs_rehash(stored)
    except InvalidHashError:
        return True
