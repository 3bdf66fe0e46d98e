"""The audit log's hash chain: pure functions, no database.

The rule (what an auditor recomputes from the ``audit_log`` table alone)::

    payload = {
        "seq": int,            # 1, 2, 3, ... gap-free
        "at": str,             # naive UTC, datetime.isoformat(timespec="microseconds"),
                               # always "YYYY-MM-DDTHH:MM:SS.ffffff" (26 characters, no zone)
        "actor": str, "actor_kind": str, "action": str, "target": str,
        "project_id": str | None,                     # JSON null when absent
        "ip": str, "user_agent": str, "outcome": str,
        "status": int,
        "detail": dict,                               # a JSON object, {} when none
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=True, allow_nan=False)
    hash = sha256((prev_hash + "\\n" + canonical).encode("utf-8")).hexdigest()

that is: SHA-256, as 64 lowercase hex digits, of the previous row's ``hash`` (for seq 1,
:data:`GENESIS_HASH`, 64 zeros), one line feed, and the payload as canonical JSON: keys
sorted at every level, no whitespace, non-ASCII characters as ``\\uXXXX`` escapes (so the
text is pure ASCII), NaN and infinities refused. Strings are hashed as stored, that is,
after :mod:`server.audit.log` truncated them to their column lengths. Each row stores its
``prev_hash`` and ``hash``; the ``audit_head`` row holds the last ``seq`` and ``hash``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

GENESIS_HASH = "0" * 64
"""The ``prev_hash`` of the first row (seq 1)."""

HASHED_FIELDS = (
    "seq",
    "at",
    "actor",
    "actor_kind",
    "action",
    "target",
    "project_id",
    "ip",
    "user_agent",
    "outcome",
    "status",
    "detail",
)
"""The row fields covered by a row's hash (every column but ``prev_hash`` and ``hash``)."""


def canonical_json(value: Any) -> str:
    """``value`` as canonical JSON: sorted keys, separators ``,`` and ``:``, ASCII only.

    Raises:
        TypeError: ``value`` holds something JSON cannot represent (a datetime, a set, ...).
        ValueError: ``value`` holds NaN or an infinity, or refers to itself.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def format_at(at: datetime) -> str:
    """A naive UTC time as hashed: ``YYYY-MM-DDTHH:MM:SS.ffffff`` (microseconds always shown).

    Raises:
        ValueError: ``at`` has a time zone (the log keeps naive UTC).
    """
    if at.tzinfo is not None:
        raise ValueError(f"audit times are naive UTC, not {at.isoformat()}")
    return at.isoformat(timespec="microseconds")


def entry_hash(prev_hash: str, fields: Mapping[str, Any]) -> str:
    """The hash of one audit row (see the module's docstring for the rule).

    Args:
        prev_hash: the previous row's ``hash`` (:data:`GENESIS_HASH` for seq 1).
        fields: the row's values by column name; must hold every name in
            :data:`HASHED_FIELDS` (other keys, such as ``hash`` and ``prev_hash``, are ignored).
            ``at`` is a naive ``datetime`` or the string :func:`format_at` makes of one.

    Returns:
        64 lowercase hex characters.

    Raises:
        KeyError: a hashed field is missing.
        TypeError, ValueError: as :func:`canonical_json` and :func:`format_at`.
    """
    payload = {name: fields[name] for name in HASHED_FIELDS}
    if isinstance(payload["at"], datetime):
        payload["at"] = format_at(payload["at"])
    text = prev_hash + "\n" + canonical_json(payload)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
