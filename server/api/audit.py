"""``/api/audit``: read and verify the audit log (admins)."""

from __future__ import annotations

import dataclasses
from datetime import datetime

from aiohttp import web
from pydantic import BaseModel
from sqlalchemy import func, select

from server.api.middleware import CTX
from server.api.registry import route
from server.audit import log as audit_log
from server.auth.service import BOOTSTRAP_ACTION
from server.errors import ApiError
from server.persistence.tables import AuditEntry, User


class AuditEntryOut(BaseModel):
    """One audit row: who did what to what, from where, when, with which outcome, and its chain hashes."""

    seq: int
    at: str
    actor: str
    actor_kind: str
    action: str
    target: str
    project_id: str | None
    ip: str
    user_agent: str
    outcome: str
    status: int
    detail: dict
    prev_hash: str
    hash: str


class AuditPage(BaseModel):
    """``GET /api/audit``: newest first; pass ``next_before`` as ``before`` for the next page."""

    entries: list[AuditEntryOut]
    next_before: int | None


class AuditVerifyOut(BaseModel):
    """``GET /api/audit/verify``."""

    ok: bool
    checked: int
    first_broken_seq: int | None
    reason: str


FILTERS = ("actor", "action", "outcome", "target", "project_id")


def _time(request: web.Request, name: str) -> datetime | None:
    raw = request.query.get(name)
    if not raw:
        return None
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(
            400, f"{name} must be an ISO 8601 time such as 2026-11-30T12:00:00Z, not {raw!r}", name
        ) from None


def _int(request: web.Request, name: str, default: int | None, low: int, high: int) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer, not {raw!r}", name) from None
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be between {low} and {high}", name)
    return value


@route(
    "GET",
    "/api/audit",
    permission="audit:read",
    response=AuditPage,
    query={
        "actor": "user or agent name",
        "action": "e.g. auth.login, jobs.cancel_job",
        "outcome": "success, failure, denied or throttled",
        "target": "e.g. job_id=...",
        "project_id": "a project's id",
        "since": "ISO 8601 time (inclusive)",
        "until": "ISO 8601 time (exclusive)",
        "limit": "rows per page, 1-500 (default 100)",
        "before": "seq cursor: rows below it (next_before of the previous page)",
    },
    integer_query=("limit", "before"),
    summary="The audit log, newest first, filtered and paginated",
)
async def list_audit(request: web.Request) -> web.Response:
    """Admins only."""
    ctx = request.app[CTX]
    outcome = request.query.get("outcome")
    if outcome and outcome not in audit_log.OUTCOMES:
        raise ApiError(
            400, f"outcome must be one of {', '.join(audit_log.OUTCOMES)}, not {outcome!r}", "outcome"
        )
    filters = {k: request.query[k] for k in FILTERS if request.query.get(k)}
    rows, next_before = await audit_log.query(
        ctx,
        **filters,
        since=_time(request, "since"),
        until=_time(request, "until"),
        limit=_int(request, "limit", 100, 1, audit_log.MAX_QUERY_LIMIT) or 100,
        before_seq=_int(request, "before", None, 1, 2**62),
    )
    return web.json_response({"entries": [r.to_json() for r in rows], "next_before": next_before})


@route(
    "GET",
    "/api/audit/verify",
    permission="audit:read",
    response=AuditVerifyOut,
    summary="Check the audit log's hash chain; names the first broken row",
)
async def verify_audit(request: web.Request) -> web.Response:
    """Walks every row (constant memory)."""
    ctx = request.app[CTX]
    result = dataclasses.asdict(await audit_log.verify(ctx))
    if result["ok"]:
        async with ctx.db.session() as s:
            users = await s.scalar(select(func.count()).select_from(User))
            first = await s.scalar(select(AuditEntry.action).where(AuditEntry.seq == 1))
        # a farm's log begins with the creation of its first admin: a log that does not was
        # emptied (rows and head), perhaps then written to again from seq 1
        if users and first is None:
            result.update(ok=False, reason="the audit log is empty but the farm has users: it was emptied")
        elif users and first != BOOTSTRAP_ACTION:
            result.update(
                ok=False,
                first_broken_seq=1,
                reason="the audit log does not begin with the farm's first admin: it was emptied and "
                "begun again, or rows were removed from its start",
            )
    return web.json_response(result)
