"""The audit log: an append-only, hash-chained record of who did what (see :mod:`server.audit.log`).

Public API::

    seq = await record(ctx, action="auth.login", outcome="failure", actor="bob", ip="10.0.0.1")
    result = await verify(ctx)            # VerifyResult(ok, checked, first_broken_seq, reason)
    rows, next_before = await query(ctx, action="auth.login", limit=100)
    account, by_ip, retry_after_s = await recent_failures(ctx, username="bob", ip="10.0.0.1",
                                                          window_s=900)
    entry_hash(prev_hash, fields)         # the pure hash rule (server.audit.chain)
"""

from server.audit.chain import GENESIS_HASH, HASHED_FIELDS, canonical_json, entry_hash, format_at
from server.audit.log import (
    LOGIN_ACTION,
    MAX_QUERY_LIMIT,
    OUTCOMES,
    AuditRow,
    VerifyResult,
    query,
    recent_failures,
    record,
    verify,
)

__all__ = [
    "GENESIS_HASH",
    "HASHED_FIELDS",
    "LOGIN_ACTION",
    "MAX_QUERY_LIMIT",
    "OUTCOMES",
    "AuditRow",
    "VerifyResult",
    "canonical_json",
    "entry_hash",
    "format_at",
    "query",
    "recent_failures",
    "record",
    "verify",
]
