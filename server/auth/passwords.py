"""Password hashing with argon2id (argon2-cffi, RFC 9106 parameters as the library defaults them)."""

from __future__ import annotations

import unicodedata

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from zxcvbn import zxcvbn

_HASHER = PasswordHasher()  # argon2id, RFC 9106 "low memory" profile: t=3, m=64 MiB, p=4
_DUMMY = _HASHER.hash("not a password of anyone")

MIN_LENGTH = 10
"""Shortest password accepted, in characters."""
MAX_LENGTH = 1024
"""Longest password accepted (argon2 takes any length; this bounds the work of a request)."""


COMMON = frozenset(
    {
        "password12", "password123", "password1234", "1234567890", "12345678910", "0123456789",
        "qwertyuiop", "1q2w3e4r5t", "qwerty1234", "qwerty12345", "iloveyou12", "admin12345",
        "administrator", "letmein123", "welcome123", "changeme123", "passw0rd12", "abc1234567",
        "abcdefghij", "renderfarm", "renderfarm1", "renderfarm123", "blender123", "blender1234",
    }
)  # fmt: skip
"""Passwords refused outright (compared in lower case), whatever their length."""
MIN_DISTINCT = 5
"""Fewest different characters a password must hold (``aaaaaaaaaa`` has one)."""


MIN_SCORE = 3
"""Lowest zxcvbn score accepted: 3 is "safely unguessable" (about 10^10 guesses; the scale is 0-4)."""


def check_policy(password: str, username: str = "") -> None:
    """Refuse a password that is short, long, blank, repetitive, common, or the user name.

    The rules follow NIST SP 800-63B 5.1.1.2: a minimum length (10 here), no composition
    rules, but a check against commonly used and context-specific values, here a short
    blocklist and then zxcvbn (Dropbox's estimator: dictionaries of common passwords,
    names and words, keyboard patterns, repeats, dates, l33t; the user name as a
    context word), which must score at least :data:`MIN_SCORE`. Control and invisible
    (format) characters are refused: they cannot be typed reliably and hide what is there.

    Raises:
        ValueError: naming the rule broken.
    """
    if len(password) < MIN_LENGTH:
        raise ValueError(f"password must have at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        raise ValueError(f"password must have at most {MAX_LENGTH} characters")
    if not password.strip():
        raise ValueError("password must not be only spaces")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in password):
        raise ValueError("password must not hold control or invisible characters")
    if len(set(password)) < MIN_DISTINCT:
        raise ValueError(f"password must hold at least {MIN_DISTINCT} different characters")
    lowered = password.lower()
    if lowered in COMMON:
        raise ValueError("password is too common; choose another")
    if username and lowered.strip("0123456789!. ") == username.lower():
        raise ValueError("password must not be the user name")
    verdict = zxcvbn(password[:100], user_inputs=[username] if username else [])
    if verdict["score"] < MIN_SCORE:
        feedback = verdict.get("feedback") or {}
        hint = feedback.get("warning") or " ".join(feedback.get("suggestions") or [])
        raise ValueError("password is too easy to guess" + (f": {hint}" if hint else ""))


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
