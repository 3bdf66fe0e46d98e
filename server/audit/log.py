"""The append-only, hash-chained audit log (tables ``audit_log`` and ``audit_head``).

Every row's ``hash`` covers the previous row's ``hash`` and the row's own fields
(the rule is in :mod:`server.audit.chain`), so changing, removing or reordering a row
breaks the chain at that row, which :func:`verify` finds. The ``audit_head`` row
(``id`` 1) holds the last ``seq`` and ``hash``: removing rows at the end shows as a
head that names rows which are not there.

Appends are serialised by the head row: the rows waiting in a process (see
:func:`record`: a group commit) are appended by one transaction that first does
``UPDATE audit_head SET seq = seq + n WHERE id = 1`` (SQLite's write lock, a row lock on
MySQL/MariaDB, held until commit), then reads the head's ``seq`` and ``hash``, inserts
the ``n`` rows with the ``seq`` and ``prev_hash`` that follow, and stores the last hash
in the head. So rows from any number of coroutines and server processes get gap-free
``seq`` 1, 2, 3, ... and one unbroken chain, and ``at`` grows with ``seq`` (as far as
the servers' clocks agree). Lost connections and lock conflicts before COMMIT are
retried (:func:`server.persistence.retry.run_in_tx`).

Nothing in the application updates or deletes audit rows; on MySQL/MariaDB, migration
0003 adds triggers refusing both. The chain only shows tampering by someone who cannot
also rewrite every later row and the head; keep :func:`verify`'s results (or the head
``hash``) somewhere else to detect that, too.
"""

from __future__ import annotations

import asyncio
import json
import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Text, func, insert, literal, select, type_coerce, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from server.audit.chain import GENESIS_HASH, entry_hash
from server.persistence.retry import run_in_tx
from server.persistence.tables import AuditEntry, AuditHead, utcnow

OUTCOMES = ("success", "failure", "denied", "throttled")
"""The values ``outcome`` may take."""
LOGIN_ACTION = "auth.login"
"""The action of login attempts; :func:`recent_failures` counts its ``failure`` rows."""
HEAD_ID = 1
"""The id of the single ``audit_head`` row."""
MAX_QUERY_LIMIT = 500
"""The most rows one :func:`query` returns."""
DEFAULT_VERIFY_BATCH = 1000
"""Rows :func:`verify` reads per query."""

_LOG = AuditEntry.__table__
_HEAD = AuditHead.__table__


def _length(column: str) -> int:
    return int(_LOG.c[column].type.length)


TRUNCATED_LENGTHS: dict[str, int] = {
    name: _length(name) for name in ("actor", "actor_kind", "target", "ip", "user_agent")
}
"""Characters kept of each free-text field (the column's length); the rest is cut off before hashing."""


@dataclass(frozen=True)
class VerifyResult:
    """What :func:`verify` found.

    Attributes:
        ok: every row up to the head is intact and the head matches the last one.
        checked: rows found intact (all of them when ``ok``; before the first break otherwise).
        first_broken_seq: the first ``seq`` at which the chain is broken: a row whose hash or
            ``prev_hash`` is wrong, or the first missing ``seq``; ``None`` when ``ok``, or when
            the ``audit_head`` row itself is missing.
        reason: ``""`` when ``ok``; otherwise what is wrong, in words.
    """

    ok: bool
    checked: int
    first_broken_seq: int | None
    reason: str


@dataclass(frozen=True)
class AuditRow:
    """One row of the audit log, as :func:`query` returns it (columns of ``audit_log``)."""

    seq: int
    at: datetime
    actor: str
    actor_kind: str
    action: str
    target: str
    project_id: str | None
    ip: str
    user_agent: str
    outcome: str
    status: int
    detail: dict[str, Any]
    prev_hash: str
    hash: str

    def to_json(self) -> dict[str, Any]:
        """The row as a JSON-ready dict: every field, ``at`` as ISO 8601 UTC with ``Z``
        (``2026-11-30T12:00:00.123456Z``)."""
        return {
            "seq": self.seq,
            "at": self.at.isoformat(timespec="microseconds") + "Z",
            "actor": self.actor,
            "actor_kind": self.actor_kind,
            "action": self.action,
            "target": self.target,
            "project_id": self.project_id,
            "ip": self.ip,
            "user_agent": self.user_agent,
            "outcome": self.outcome,
            "status": self.status,
            "detail": self.detail,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


class _NoHead(Exception):
    """The ``audit_head`` row does not exist yet."""


def _text(name: str, value: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"audit {name} must be a string, not {type(value).__name__}")
    # lone surrogates (from undecodable header bytes) cannot be stored as UTF-8
    clean = value.encode("utf-8", "replace").decode("utf-8")
    return clean[: TRUNCATED_LENGTHS[name]]


def _fields(
    *,
    action: str,
    outcome: str,
    actor: str,
    actor_kind: str,
    target: str,
    project_id: str | None,
    ip: str,
    user_agent: str,
    status: int,
    detail: Mapping[str, Any] | None,
) -> dict[str, Any]:
    if outcome not in OUTCOMES:
        raise ValueError(f"audit outcome must be one of {', '.join(OUTCOMES)}, not {outcome!r}")
    if not isinstance(action, str) or not action or len(action) > _length("action"):
        raise ValueError(f"audit action must be 1 to {_length('action')} characters, not {action!r}")
    if project_id is not None and (not isinstance(project_id, str) or len(project_id) > 32):
        raise ValueError(f"audit project_id must be an id of at most 32 characters, not {project_id!r}")
    if isinstance(status, bool) or not isinstance(status, int):
        raise TypeError(f"audit status must be an int, not {status!r}")
    if detail is None:
        detail = {}
    if not isinstance(detail, Mapping):
        raise TypeError(f"audit detail must be a mapping, not {type(detail).__name__}")
    # store exactly what is hashed: the JSON text parsed back (tuples become lists, keys
    # strings); raises TypeError/ValueError for what JSON cannot hold
    stored_detail = json.loads(json.dumps(dict(detail), allow_nan=False))
    return {
        "actor": _text("actor", actor),
        "actor_kind": _text("actor_kind", actor_kind),
        "action": action,
        "target": _text("target", target),
        "project_id": project_id,
        "ip": _text("ip", ip),
        "user_agent": _text("user_agent", user_agent),
        "outcome": outcome,
        "status": status,
        "detail": stored_detail,
    }


async def _append(session: AsyncSession, batch: list[dict[str, Any]]) -> list[int]:
    # the UPDATE comes first: it takes the write lock (SQLite) / the head's row lock (MySQL)
    n = len(batch)
    bumped = await session.execute(update(_HEAD).where(_HEAD.c.id == HEAD_ID).values(seq=_HEAD.c.seq + n))
    if bumped.rowcount == 0:  # type: ignore[attr-defined]
        raise _NoHead
    head = select(_HEAD.c.seq, _HEAD.c.hash).where(_HEAD.c.id == HEAD_ID)
    last, prev_hash = (await session.execute(head)).one()
    rows = []
    for seq, fields in enumerate(batch, start=int(last) - n + 1):
        row = {"seq": seq, "at": utcnow(), **fields}
        digest = entry_hash(prev_hash, row)
        rows.append({**row, "prev_hash": prev_hash, "hash": digest})
        prev_hash = digest
    await session.execute(insert(_LOG), rows)
    await session.execute(update(_HEAD).where(_HEAD.c.id == HEAD_ID).values(hash=prev_hash))
    return [r["seq"] for r in rows]


async def _append_batch(ctx: Any, batch: list[dict[str, Any]]) -> list[int]:
    async def append(session: AsyncSession) -> list[int]:
        return await _append(session, batch)

    for _ in range(5):
        try:
            return await run_in_tx(ctx.db, append)
        except _NoHead:
            try:
                await run_in_tx(ctx.db, _create_head)
            except IntegrityError:  # another append created it first
                pass
    raise RuntimeError("the audit_head row disappeared again and again while appending")


MAX_BATCH = 200
"""Most rows one group commit appends."""


class _GroupCommit:
    """Appends of one database, batched: rows that arrive while a transaction appends the
    previous ones go together in the next one (one head lock, one multi-row INSERT, one
    commit). Each caller still returns only once its row is committed."""

    def __init__(self) -> None:
        self.pending: list[tuple[dict[str, Any], asyncio.Future[int]]] = []
        self.task: asyncio.Task[None] | None = None

    async def submit(self, ctx: Any, fields: dict[str, Any]) -> int:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self.pending = [(f, x) for f, x in self.pending if x.get_loop() is loop]  # a dead loop's leftovers
        self.pending.append((fields, fut))
        if self.task is None or self.task.done() or self.task.get_loop() is not loop:
            self.task = loop.create_task(self._drain(ctx), name="audit-group-commit")
        return await fut

    async def _drain(self, ctx: Any) -> None:
        while self.pending:
            batch, self.pending = self.pending[:MAX_BATCH], self.pending[MAX_BATCH:]
            try:
                seqs = await _append_batch(ctx, [f for f, _ in batch])
            except BaseException as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for (_, fut), seq in zip(batch, seqs, strict=True):
                if not fut.done():
                    fut.set_result(seq)


_WRITERS: weakref.WeakKeyDictionary[Any, _GroupCommit] = weakref.WeakKeyDictionary()


async def _create_head(session: AsyncSession) -> None:
    # one statement (so SQLite takes its write lock before reading); continues after the
    # last row when rows exist (a head lost or removed), else starts at the genesis hash
    last_seq = select(func.max(_LOG.c.seq)).scalar_subquery()
    last_hash = select(_LOG.c.hash).order_by(_LOG.c.seq.desc()).limit(1).scalar_subquery()
    await session.execute(
        insert(_HEAD).from_select(
            ["id", "seq", "hash"],
            select(
                literal(HEAD_ID),
                func.coalesce(last_seq, 0),
                func.coalesce(last_hash, GENESIS_HASH),
            ),
        )
    )


async def record(
    ctx: Any,
    *,
    action: str,
    outcome: str,
    actor: str = "",
    actor_kind: str = "anonymous",
    target: str = "",
    project_id: str | None = None,
    ip: str = "",
    user_agent: str = "",
    status: int = 0,
    detail: Mapping[str, Any] | None = None,
) -> int:
    """Append one row to the audit log and return its ``seq`` once it is committed.

    Rows recorded at the same time by one process are committed together (a group
    commit: one transaction appends every row waiting, in arrival order), so a busy
    server does not wait on the head lock once per row.

    The row's ``at`` is the time (naive UTC, microseconds) at which this append held the
    head. ``actor``, ``actor_kind``, ``target``, ``ip`` and ``user_agent`` are cut to their
    column lengths (:data:`TRUNCATED_LENGTHS`: 255, 16, 255, 64, 255 characters), and
    characters UTF-8 cannot encode (lone surrogates) replaced by ``?``, before hashing;
    ``detail`` is hashed and stored as its JSON text parsed back (``None`` is ``{}``;
    tuples become lists, non-string keys strings). The hash rule is in
    :mod:`server.audit.chain`.

    Args:
        ctx: anything with a ``db`` attribute (a :class:`server.persistence.db.Database`),
            e.g. the :class:`server.context.FarmContext`.
        action: what was attempted, e.g. ``"auth.login"``, ``"job.cancel"`` (1-64 characters).
        outcome: one of :data:`OUTCOMES`.
        actor: the user name or agent name (for a login, the user name tried).
        actor_kind: ``"user"``, ``"agent"`` or ``"anonymous"``.
        target: what the action was on (an id or a name).
        project_id: the project concerned, if any.
        ip: the client's address.
        user_agent: the client's ``User-Agent``.
        status: the HTTP status answered (0: none).
        detail: more facts, JSON-serialisable (string keys, no NaN).

    Returns:
        The new row's ``seq`` (1 for the first row).

    Raises:
        ValueError: ``outcome`` not in :data:`OUTCOMES`, ``action`` empty or too long,
            ``project_id`` too long, ``detail`` holds NaN/infinity.
        TypeError: a field of the wrong type, or ``detail`` not JSON-serialisable.
        sqlalchemy.exc.DBAPIError: the database failed (after retries), or the connection
            was lost during COMMIT (the row may or may not have been written).
        RuntimeError: the ``audit_head`` row vanished five times in a row while appending.
    """
    fields = _fields(
        action=action,
        outcome=outcome,
        actor=actor,
        actor_kind=actor_kind,
        target=target,
        project_id=project_id,
        ip=ip,
        user_agent=user_agent,
        status=status,
        detail=detail,
    )

    writer = _WRITERS.get(ctx.db)
    if writer is None:
        writer = _WRITERS[ctx.db] = _GroupCommit()
    return await writer.submit(ctx, fields)


_ROW_COLUMNS = (
    _LOG.c.seq,
    _LOG.c.at,
    _LOG.c.actor,
    _LOG.c.actor_kind,
    _LOG.c.action,
    _LOG.c.target,
    _LOG.c.project_id,
    _LOG.c.ip,
    _LOG.c.user_agent,
    _LOG.c.outcome,
    _LOG.c.status,
)
_RAW_DETAIL = type_coerce(_LOG.c.detail, Text).label("detail")  # the stored text, parsed by verify


async def verify(ctx: Any, *, batch_size: int = DEFAULT_VERIFY_BATCH) -> VerifyResult:
    """Walk the log by ``seq`` and check the chain; stops at the first break.

    Reads the head first, then the rows with ``seq`` up to the head's, ``batch_size`` at a
    time (constant memory; each batch in its own short transaction, so appends go on
    meanwhile and rows appended after the head was read are not checked). For each row it
    checks, in order: its ``seq`` is the next one (1, 2, ...: a gap is a removed row), its
    ``prev_hash`` is the previous row's ``hash`` (:data:`~server.audit.chain.GENESIS_HASH`
    for seq 1), its ``detail`` is JSON, and its ``hash`` is
    :func:`~server.audit.chain.entry_hash` of its stored fields. Then that the head names
    the last row, with its hash (rows removed at the end).

    Args:
        ctx: anything with a ``db`` attribute (a :class:`server.persistence.db.Database`).
        batch_size: rows per query (at least 1).

    Returns:
        A :class:`VerifyResult`; ``ok`` and ``checked`` 0 for an empty log.

    Raises:
        ValueError: ``batch_size`` below 1.
        sqlalchemy.exc.DBAPIError: the database failed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    db = ctx.db
    async with db.session() as session:
        head = (await session.execute(select(_HEAD.c.seq, _HEAD.c.hash).where(_HEAD.c.id == HEAD_ID))).first()
    head_seq = int(head.seq) if head is not None else None
    checked = 0
    prev_hash = GENESIS_HASH
    last_seq = 0

    def broken(seq: int | None, reason: str) -> VerifyResult:
        return VerifyResult(ok=False, checked=checked, first_broken_seq=seq, reason=reason)

    while True:
        stmt = (
            select(*_ROW_COLUMNS, _RAW_DETAIL, _LOG.c.prev_hash, _LOG.c.hash)
            .where(_LOG.c.seq > last_seq)
            .order_by(_LOG.c.seq)
            .limit(batch_size)
        )
        if head_seq is not None:
            stmt = stmt.where(_LOG.c.seq <= head_seq)
        async with db.session() as session:
            rows = (await session.execute(stmt)).all()
        if not rows:
            break
        for row in rows:
            seq = int(row.seq)
            if seq != last_seq + 1:
                if seq > last_seq + 1:
                    gap = f"seq {last_seq + 1}" if seq == last_seq + 2 else f"seqs {last_seq + 1}-{seq - 1}"
                    return broken(last_seq + 1, f"{gap} missing (removed rows): the next row is seq {seq}")
                return broken(seq, f"seq {seq} out of order after seq {last_seq}")
            if row.prev_hash != prev_hash:
                before = f"seq {last_seq}'s hash" if last_seq else "the genesis hash"
                return broken(seq, f"seq {seq}'s prev_hash is not {before} (a row before it was changed)")
            fields = row._asdict()
            try:
                fields["detail"] = json.loads(row.detail)
            except (TypeError, ValueError):
                return broken(seq, f"seq {seq}'s detail is not JSON (the row was changed)")
            try:
                digest = entry_hash(row.prev_hash, fields)
            except (TypeError, ValueError) as exc:
                return broken(seq, f"seq {seq}'s fields cannot be hashed ({exc}): the row was changed")
            if digest != row.hash:
                return broken(seq, f"seq {seq}'s hash does not match its fields (the row was changed)")
            checked += 1
            prev_hash = row.hash
            last_seq = seq
        if len(rows) < batch_size:
            break

    if head is None:
        if checked:
            return broken(None, f"the audit_head row is missing but the log has {checked} rows")
        return VerifyResult(ok=True, checked=0, first_broken_seq=None, reason="")
    if last_seq < head_seq:  # type: ignore[operator]
        return broken(
            last_seq + 1,
            f"rows after seq {last_seq} are missing: the head names seq {head_seq} (removed at the end)",
        )
    if head.hash != prev_hash:
        return broken(head_seq, f"the head's hash is not seq {head_seq}'s hash")
    return VerifyResult(ok=True, checked=checked, first_broken_seq=None, reason="")


def _naive_utc(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo is not None else value


async def query(
    ctx: Any,
    *,
    actor: str | None = None,
    action: str | None = None,
    outcome: str | None = None,
    target: str | None = None,
    project_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
    before_seq: int | None = None,
) -> tuple[list[AuditRow], int | None]:
    """Rows matching every filter given, newest (highest ``seq``) first, a page at a time.

    Args:
        ctx: anything with a ``db`` attribute (a :class:`server.persistence.db.Database`).
        actor, action, outcome, target, project_id: exact matches (``None``: any).
        since: rows at or after this time; until: rows strictly before it. Naive times are
            UTC; aware ones are converted.
        limit: rows per page, 1 to :data:`MAX_QUERY_LIMIT`.
        before_seq: only rows with ``seq`` below this (the cursor of the previous page).

    Returns:
        ``(rows, next_before_seq)``: at most ``limit`` rows, and the ``before_seq`` to pass
        for the next page, or ``None`` when there are no more rows.

    Raises:
        ValueError: ``limit`` out of range.
        sqlalchemy.exc.DBAPIError: the database failed.
    """
    if not 1 <= limit <= MAX_QUERY_LIMIT:
        raise ValueError(f"limit must be 1 to {MAX_QUERY_LIMIT}, not {limit}")
    conditions: list[ColumnElement[bool]] = []
    for column, value in (
        (_LOG.c.actor, actor),
        (_LOG.c.action, action),
        (_LOG.c.outcome, outcome),
        (_LOG.c.target, target),
        (_LOG.c.project_id, project_id),
    ):
        if value is not None:
            conditions.append(column == value)
    if since is not None:
        conditions.append(_LOG.c.at >= _naive_utc(since))
    if until is not None:
        conditions.append(_LOG.c.at < _naive_utc(until))
    if before_seq is not None:
        conditions.append(_LOG.c.seq < before_seq)
    stmt = (
        select(*_ROW_COLUMNS, _LOG.c.detail, _LOG.c.prev_hash, _LOG.c.hash)
        .where(*conditions)
        .order_by(_LOG.c.seq.desc())
        .limit(limit + 1)
    )
    async with ctx.db.session() as session:
        found = (await session.execute(stmt)).all()
    rows = [AuditRow(**r._asdict()) for r in found[:limit]]
    return rows, (rows[-1].seq if len(found) > limit else None)


async def _oldest_to_expire(
    session: AsyncSession, conditions: list[ColumnElement[bool]], count: int, limit: int | None
) -> datetime | None:
    # the failure whose leaving the window brings `count` below `limit`
    if limit is None or count < limit:
        return None
    stmt = select(_LOG.c.at).where(*conditions).order_by(_LOG.c.at, _LOG.c.seq).offset(count - limit).limit(1)
    return (await session.execute(stmt)).scalar_one_or_none()


async def recent_failures(
    ctx: Any,
    *,
    username: str,
    ip: str,
    window_s: float,
    max_account_failures: int | None = None,
    max_ip_failures: int | None = None,
) -> tuple[int, int, float]:
    """Failed logins in the last ``window_s`` seconds, for login throttling (read by every server).

    Counts rows with ``action`` :data:`LOGIN_ACTION` and ``outcome`` ``"failure"`` and
    ``at`` within the window: for the account, those with ``actor == username`` recorded
    after that account's last ``"success"`` login (a successful login starts its count
    afresh); for the address, those with ``ip == ip`` (successes do not reset it). Rows
    with outcome ``"throttled"`` are not counted. Login rows must therefore be recorded
    with the user name tried as ``actor``. Matches are exact (on MySQL/MariaDB the
    columns' binary collation, which ignores trailing spaces). An empty ``username`` or
    ``ip`` counts 0.

    Args:
        ctx: anything with a ``db`` attribute; its ``settings`` (if any) give the limits
            not passed (``login_max_failures``, ``login_max_failures_ip``).
        username: the user name tried.
        ip: the client's address.
        window_s: the window, in seconds (> 0).
        max_account_failures, max_ip_failures: the limits, used for ``retry_after_s`` only.

    Returns:
        ``(account_failures, ip_failures, retry_after_s)``: ``retry_after_s`` is 0.0 when
        neither count has reached its limit; otherwise the seconds until enough of the
        counted failures have left the window for every count that reached its limit to be
        below it again (a float; round it up for a ``Retry-After`` header).

    Raises:
        ValueError: ``window_s`` not positive.
        sqlalchemy.exc.DBAPIError: the database failed.
    """
    if not window_s > 0 or math.isinf(window_s):
        raise ValueError(f"window_s must be a positive number of seconds, not {window_s!r}")
    settings = getattr(ctx, "settings", None)
    if max_account_failures is None:
        max_account_failures = getattr(settings, "login_max_failures", None)
    if max_ip_failures is None:
        max_ip_failures = getattr(settings, "login_max_failures_ip", None)
    now = utcnow()
    window = timedelta(seconds=window_s)
    since = now - window
    failures = [_LOG.c.action == LOGIN_ACTION, _LOG.c.outcome == "failure", _LOG.c.at >= since]
    expiring: list[datetime] = []
    account_failures = ip_failures = 0
    async with ctx.db.session() as session:
        if username:
            last_success = (
                await session.execute(
                    select(func.max(_LOG.c.seq)).where(
                        _LOG.c.action == LOGIN_ACTION,
                        _LOG.c.actor == username,
                        _LOG.c.outcome == "success",
                        _LOG.c.at >= since,
                    )
                )
            ).scalar_one_or_none()
            account = [*failures, _LOG.c.actor == username]
            if last_success is not None:
                account.append(_LOG.c.seq > last_success)
            account_failures = int((await session.execute(select(func.count()).where(*account))).scalar_one())
            at = await _oldest_to_expire(session, account, account_failures, max_account_failures)
            if at is not None:
                expiring.append(at)
        if ip:
            by_ip = [*failures, _LOG.c.ip == ip]
            ip_failures = int((await session.execute(select(func.count()).where(*by_ip))).scalar_one())
            at = await _oldest_to_expire(session, by_ip, ip_failures, max_ip_failures)
            if at is not None:
                expiring.append(at)
    retry_after_s = max([0.0, *((at + window - now).total_seconds() for at in expiring)])
    return account_failures, ip_failures, retry_after_s
