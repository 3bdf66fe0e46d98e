"""The audit log (server/audit): the hash rule, appends under concurrency, tamper detection,
queries, login-failure counts, and the append-only triggers of migration 0003.

Runs on SQLite and on a fresh MariaDB database of the shared server (tests/mariadb.py)."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from server.audit import (
    GENESIS_HASH,
    HASHED_FIELDS,
    entry_hash,
    query,
    recent_failures,
    record,
    verify,
)
from server.audit import log as audit_log
from server.persistence.db import Database
from server.persistence.migrate import head_revision
from server.persistence.retry import mysql_error_code
from tests.mariadb import admin_connection, mariadb_url  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["sqlite", "mariadb"])
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database on each backend."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'rf.db'}"
    return request.getfixturevalue("mariadb_url")


@pytest.fixture
async def ctx(any_url: str) -> AsyncIterator[SimpleNamespace]:
    """A migrated database on each backend, as a context with ``db``."""
    db = Database(any_url)
    await db.migrate()
    yield SimpleNamespace(db=db)
    await db.close()


async def _sql(db: Database, sql: str, **params: Any) -> list[Any]:
    async with db.engine.begin() as conn:
        result = await conn.execute(text(sql), params)
        return list(result.all()) if result.returns_rows else []


async def _drop_triggers(db: Database) -> None:
    """What an attacker with the database's root account would do first (MySQL/MariaDB)."""
    if db.backend == "mysql":
        await _sql(db, "DROP TRIGGER IF EXISTS audit_log_no_update")
        await _sql(db, "DROP TRIGGER IF EXISTS audit_log_no_delete")
        await _sql(db, "DROP TRIGGER IF EXISTS audit_head_no_delete")


async def _rows(db: Database) -> list[dict[str, Any]]:
    rows, _ = await query(SimpleNamespace(db=db), limit=500)
    return [r.to_json() | {"at": r.at} for r in reversed(rows)]


async def _fill(ctx: SimpleNamespace, n: int) -> None:
    for i in range(n):
        await record(ctx, action="job.cancel", outcome="success", actor=f"user{i}", actor_kind="user")


# ---------------------------------------------------------------- the hash rule (pure)


def _fields(**over: Any) -> dict[str, Any]:
    fields = {
        "seq": 7,
        "at": datetime(2026, 1, 2, 3, 4, 5),
        "actor": "zoë",
        "actor_kind": "user",
        "action": "auth.login",
        "target": "job/42",
        "project_id": None,
        "ip": "10.0.0.1",
        "user_agent": "curl/8",
        "outcome": "failure",
        "status": 401,
        "detail": {"b": [1, {"y": 2, "x": 1}], "a": "é"},
    }
    return fields | over


def test_entry_hash_follows_the_documented_rule() -> None:
    """The hash an auditor computes from the docstring's rule, by hand, is entry_hash's."""
    prev = "ab" * 32
    by_hand = (
        '{"action":"auth.login","actor":"zo\\u00eb","actor_kind":"user","at":"2026-01-02T03:04:05.000000",'
        '"detail":{"a":"\\u00e9","b":[1,{"x":1,"y":2}]},"ip":"10.0.0.1","outcome":"failure",'
        '"project_id":null,"seq":7,"status":401,"target":"job/42","user_agent":"curl/8"}'
    )
    expected = hashlib.sha256((prev + "\n" + by_hand).encode()).hexdigest()
    assert entry_hash(prev, _fields()) == expected
    # `at` as its string, other key orders and extra keys (hash, prev_hash) give the same hash
    reordered = dict(reversed(list(_fields(detail={"a": "é", "b": [1, {"x": 1, "y": 2}]}).items())))
    assert entry_hash(prev, reordered | {"at": "2026-01-02T03:04:05.000000", "hash": "x"}) == expected
    assert GENESIS_HASH == "0" * 64


def test_entry_hash_covers_every_field_and_the_previous_hash() -> None:
    base = entry_hash(GENESIS_HASH, _fields())
    changed = {
        "seq": 8,
        "at": datetime(2026, 1, 2, 3, 4, 5, 1),
        "actor": "zoe",
        "actor_kind": "agent",
        "action": "auth.logout",
        "target": "job/43",
        "project_id": "p" * 32,
        "ip": "10.0.0.2",
        "user_agent": "curl/9",
        "outcome": "success",
        "status": 200,
        "detail": {"a": "é", "b": [1, {"x": 1, "y": 3}]},
    }
    assert set(changed) == set(HASHED_FIELDS)
    for name, value in changed.items():
        assert entry_hash(GENESIS_HASH, _fields(**{name: value})) != base, name
    assert entry_hash("1" * 64, _fields()) != base
    with pytest.raises(ValueError, match="naive UTC"):
        entry_hash(GENESIS_HASH, _fields(at=datetime(2026, 1, 2, tzinfo=UTC)))
    with pytest.raises(KeyError):
        entry_hash(GENESIS_HASH, {k: v for k, v in _fields().items() if k != "status"})


# ---------------------------------------------------------------- record


async def test_record_stores_what_it_hashed(ctx: SimpleNamespace) -> None:
    """Rows read back (MariaDB: DATETIME(6), JSON as text) hash to what was computed at insert;
    long fields are cut to the column lengths before hashing."""
    seqs = [
        await record(ctx, action="auth.login", outcome="failure", actor="bob", ip="10.0.0.1", status=401),
        await record(
            ctx,
            action="project.create",
            outcome="success",
            actor="ä" * 300,
            actor_kind="user",
            target="t" * 300,
            project_id="p" * 32,
            ip="1" * 80,
            user_agent="agent \udcff " + "u" * 300,
            status=201,
            detail={"z": 1, "a": {"y": [1, 2.5, None, True], "x": "🎬"}, 3: (1, 2)},
        ),
        await record(ctx, action="auth.login", outcome="success", actor="bob"),
    ]
    assert seqs == [1, 2, 3]
    rows = await _rows(ctx.db)
    assert [r["seq"] for r in rows] == [1, 2, 3]
    assert rows[0]["prev_hash"] == GENESIS_HASH
    for before, row in itertools.pairwise(rows):
        assert row["prev_hash"] == before["hash"]
    for row in rows:
        assert entry_hash(row["prev_hash"], row) == row["hash"]
    long = rows[1]
    assert long["actor"] == "ä" * 255 and long["target"] == "t" * 255 and long["ip"] == "1" * 64
    assert long["user_agent"].startswith("agent ? u") and len(long["user_agent"]) == 255
    assert long["detail"] == {"z": 1, "a": {"y": [1, 2.5, None, True], "x": "🎬"}, "3": [1, 2]}
    assert rows[0]["detail"] == {} and rows[0]["project_id"] is None and rows[0]["status"] == 401
    assert rows[0]["at"] <= rows[1]["at"] <= rows[2]["at"]
    assert rows[0]["at"].microsecond or rows[1]["at"].microsecond or rows[2]["at"].microsecond
    assert await verify(ctx) == audit_log.VerifyResult(ok=True, checked=3, first_broken_seq=None, reason="")


async def test_record_refuses_bad_fields(ctx: SimpleNamespace) -> None:
    with pytest.raises(ValueError, match="outcome"):
        await record(ctx, action="auth.login", outcome="ok")
    with pytest.raises(ValueError, match="action"):
        await record(ctx, action="", outcome="success")
    with pytest.raises(ValueError, match="action"):
        await record(ctx, action="a" * 65, outcome="success")
    with pytest.raises(ValueError, match="project_id"):
        await record(ctx, action="x", outcome="success", project_id="p" * 33)
    with pytest.raises(TypeError, match="status"):
        await record(ctx, action="x", outcome="success", status=True)
    with pytest.raises(TypeError, match="detail"):
        await record(ctx, action="x", outcome="success", detail=["not", "a", "mapping"])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await record(ctx, action="x", outcome="success", detail={"when": datetime.now()})
    with pytest.raises(ValueError):
        await record(ctx, action="x", outcome="success", detail={"n": float("nan")})
    assert await verify(ctx) == audit_log.VerifyResult(ok=True, checked=0, first_broken_seq=None, reason="")
    assert await record(ctx, action="x", outcome="success") == 1


async def test_concurrent_appends_give_one_gap_free_chain(any_url: str) -> None:
    """50 appends at once, the first ones racing to create the head row; on MariaDB through
    three engines (three connection pools, as three server processes would have)."""
    dbs = [Database(any_url) for _ in range(3 if "mysql" in any_url else 1)]
    try:
        await dbs[0].migrate()
        ctxs = [SimpleNamespace(db=db) for db in dbs]
        seqs = await asyncio.gather(
            *(
                record(
                    ctxs[i % len(ctxs)], action="job.create", outcome="success", actor=f"u{i}", target=str(i)
                )
                for i in range(50)
            )
        )
        assert sorted(seqs) == list(range(1, 51))
        assert await verify(ctxs[0]) == audit_log.VerifyResult(
            ok=True, checked=50, first_broken_seq=None, reason=""
        )
        rows = await _rows(dbs[0])
        assert [r["seq"] for r in rows] == list(range(1, 51))
        assert sorted(int(r["target"]) for r in rows) == list(range(50))
        assert [r["at"] for r in rows] == sorted(r["at"] for r in rows)
        assert await _sql(dbs[0], "SELECT id, seq, hash FROM audit_head") == [(1, 50, rows[-1]["hash"])]
    finally:
        for db in dbs:
            await db.close()


_APPENDER = """
import asyncio, sys
from types import SimpleNamespace
from server.audit import record
from server.persistence.db import Database

async def main(url, name, n):
    db = Database(url)
    try:
        ctx = SimpleNamespace(db=db)
        await asyncio.gather(*(record(ctx, action="job.create", outcome="success", actor=name,
                                      target=str(i)) for i in range(n)))
    finally:
        await db.close()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def test_appends_from_several_processes_on_mariadb(mariadb_url: str) -> None:  # noqa: F811
    db = Database(mariadb_url)
    try:
        await db.migrate()
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _APPENDER,
                mariadb_url,
                f"proc{i}",
                "20",
                cwd=REPO,
                stderr=subprocess.PIPE,
            )
            for i in range(3)
        ]
        for proc in procs:
            _, err = await asyncio.wait_for(proc.communicate(), 120)
            assert proc.returncode == 0, err.decode()
        ctx = SimpleNamespace(db=db)
        assert await verify(ctx) == audit_log.VerifyResult(
            ok=True, checked=60, first_broken_seq=None, reason=""
        )
        rows = await _rows(db)
        assert [r["seq"] for r in rows] == list(range(1, 61))
        assert {(r["actor"], r["target"]) for r in rows} == {
            (f"proc{p}", str(i)) for p in range(3) for i in range(20)
        }
    finally:
        await db.close()


# ---------------------------------------------------------------- verify


async def _rewrite(db: Database, seq: int, **changes: Any) -> None:
    """Change row ``seq`` and give it the hash its new fields have (over its own prev_hash)."""
    row = next(r for r in await _rows(db) if r["seq"] == seq) | changes
    await _sql(
        db,
        "UPDATE audit_log SET outcome = :outcome, hash = :hash WHERE seq = :seq",
        outcome=row["outcome"],
        hash=entry_hash(row["prev_hash"], row),
        seq=seq,
    )


TAMPERING = {
    "field changed": ("UPDATE audit_log SET outcome = 'failure' WHERE seq = 3", 3, "hash does not match"),
    "middle row removed": ("DELETE FROM audit_log WHERE seq = 3", 3, "seq 3 missing"),
    "two middle rows removed": ("DELETE FROM audit_log WHERE seq IN (2, 3)", 2, "seqs 2-3 missing"),
    "first row removed": ("DELETE FROM audit_log WHERE seq = 1", 1, "seq 1 missing"),
    "last row removed": ("DELETE FROM audit_log WHERE seq = 5", 5, "head names seq 5"),
    "prev_hash changed": ("UPDATE audit_log SET prev_hash = hash WHERE seq = 2", 2, "prev_hash"),
    "rows swapped": (
        "UPDATE audit_log SET seq = 100 WHERE seq = 2; UPDATE audit_log SET seq = 2 WHERE seq = 3;"
        "UPDATE audit_log SET seq = 3 WHERE seq = 100",
        2,
        "prev_hash",
    ),
}


@pytest.mark.parametrize("case", list(TAMPERING))
async def test_verify_finds_tampering(ctx: SimpleNamespace, case: str) -> None:
    sql, broken, reason = TAMPERING[case]
    await _fill(ctx, 5)
    assert (await verify(ctx)).ok
    await _drop_triggers(ctx.db)
    for statement in sql.split(";"):
        await _sql(ctx.db, statement)
    result = await verify(ctx)
    assert not result.ok
    assert result.first_broken_seq == broken
    assert result.checked == broken - 1
    assert reason in result.reason


async def test_verify_finds_a_row_rewritten_with_a_matching_hash(ctx: SimpleNamespace) -> None:
    """Rewriting a row with a hash that fits its new fields breaks the next row's prev link;
    rewriting the last one that way no longer matches the head."""
    await _fill(ctx, 5)
    await _drop_triggers(ctx.db)
    await _rewrite(ctx.db, 3, outcome="denied")
    result = await verify(ctx)
    assert (result.ok, result.first_broken_seq, result.checked) == (False, 4, 3)
    assert "seq 4's prev_hash is not seq 3's hash" in result.reason

    await _rewrite(ctx.db, 3, outcome="success")  # back to the original row
    assert (await verify(ctx)).ok
    await _rewrite(ctx.db, 5, outcome="denied")
    result = await verify(ctx)
    assert (result.ok, result.first_broken_seq, result.checked) == (False, 5, 5)
    assert "head's hash" in result.reason


async def test_verify_ignores_json_key_order_but_not_json_content(ctx: SimpleNamespace) -> None:
    """The stored detail may come back with its keys in another order (MySQL's JSON does that)."""
    await record(ctx, action="x", outcome="success", detail={"a": 1, "b": [1, 2]})
    await record(ctx, action="x", outcome="success")
    await _drop_triggers(ctx.db)
    await _sql(ctx.db, "UPDATE audit_log SET detail = :d WHERE seq = 1", d='{"b" : [1,2], "a":1}')
    assert (await verify(ctx)).ok
    await _sql(ctx.db, "UPDATE audit_log SET detail = :d WHERE seq = 1", d='{"b":[1,2],"a":2}')
    assert (await verify(ctx)).first_broken_seq == 1
    if ctx.db.backend == "sqlite":  # MariaDB's JSON column refuses text that is not JSON
        await _sql(ctx.db, "UPDATE audit_log SET detail = 'not json' WHERE seq = 1")
        result = await verify(ctx)
        assert (result.first_broken_seq, result.reason) == (
            1,
            "seq 1's detail is not JSON (the row was changed)",
        )


@pytest.mark.parametrize("batch_size", [1, 3, 10, 1000])
async def test_verify_reads_in_batches(ctx: SimpleNamespace, batch_size: int) -> None:
    await _fill(ctx, 10)
    assert await verify(ctx, batch_size=batch_size) == audit_log.VerifyResult(
        ok=True, checked=10, first_broken_seq=None, reason=""
    )
    await _drop_triggers(ctx.db)
    await _sql(ctx.db, "UPDATE audit_log SET actor = 'mallory' WHERE seq = 7")
    result = await verify(ctx, batch_size=batch_size)
    assert (result.ok, result.checked, result.first_broken_seq) == (False, 6, 7)
    with pytest.raises(ValueError):
        await verify(ctx, batch_size=0)


async def test_a_lost_head_is_reported_and_rebuilt_by_the_next_append(ctx: SimpleNamespace) -> None:
    await _fill(ctx, 3)
    await _drop_triggers(ctx.db)
    await _sql(ctx.db, "DELETE FROM audit_head")
    result = await verify(ctx)
    assert (result.ok, result.checked, result.first_broken_seq) == (False, 3, None)
    assert "audit_head row is missing" in result.reason
    assert await record(ctx, action="x", outcome="success") == 4
    assert (await verify(ctx)).ok and (await verify(ctx)).checked == 4


async def test_verify_checks_rows_up_to_the_head_read_first(ctx: SimpleNamespace) -> None:
    """Appends during a walk do not make it fail: rows beyond the head it read are not checked."""
    await _fill(ctx, 20)
    results = await asyncio.gather(
        verify(ctx, batch_size=2), *(record(ctx, action="x", outcome="success") for _ in range(10))
    )
    assert results[0].ok and 20 <= results[0].checked <= 30
    assert (await verify(ctx)).checked == 30


# ---------------------------------------------------------------- query


async def test_query_filters_and_pages_newest_first(
    ctx: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    t0 = datetime(2026, 3, 1, 12, 0, 0, 500)
    clock = [t0]
    monkeypatch.setattr(audit_log, "utcnow", lambda: clock[0])
    for i in range(12):
        clock[0] = t0 + timedelta(minutes=i)
        await record(
            ctx,
            action="auth.login" if i % 2 else "job.cancel",
            outcome="failure" if i % 3 == 0 else "success",
            actor="bob" if i < 6 else "alice",
            target=f"job/{i % 4}",
            project_id="p1" if i % 4 == 0 else None,
        )
    rows, nxt = await query(ctx, limit=5)
    assert [r.seq for r in rows] == [12, 11, 10, 9, 8] and nxt == 8
    rows, nxt = await query(ctx, limit=5, before_seq=nxt)
    assert [r.seq for r in rows] == [7, 6, 5, 4, 3] and nxt == 3
    rows, nxt = await query(ctx, limit=5, before_seq=nxt)
    assert [r.seq for r in rows] == [2, 1] and nxt is None
    rows, nxt = await query(ctx, limit=2, before_seq=3)
    assert [r.seq for r in rows] == [2, 1] and nxt is None  # exactly a full last page

    def seqs(**kw: Any) -> Any:
        return query(ctx, **kw)

    assert [r.seq for r in (await seqs(actor="bob"))[0]] == [6, 5, 4, 3, 2, 1]
    assert [r.seq for r in (await seqs(action="auth.login", actor="alice"))[0]] == [12, 10, 8]
    assert [r.seq for r in (await seqs(outcome="failure"))[0]] == [10, 7, 4, 1]
    assert [r.seq for r in (await seqs(target="job/1"))[0]] == [10, 6, 2]
    assert [r.seq for r in (await seqs(project_id="p1"))[0]] == [9, 5, 1]
    since, until = t0 + timedelta(minutes=3), t0 + timedelta(minutes=6)
    assert [r.seq for r in (await seqs(since=since, until=until))[0]] == [6, 5, 4]
    aware = since.replace(tzinfo=UTC).astimezone(timezone(timedelta(hours=2)))
    assert [r.seq for r in (await seqs(since=aware, until=until))[0]] == [6, 5, 4]
    assert (await seqs(actor="nobody"))[0] == []
    row = (await seqs(limit=1))[0][0]
    assert row.to_json()["at"] == "2026-03-01T12:11:00.000500Z"
    assert set(row.to_json()) == {*HASHED_FIELDS, "prev_hash", "hash"}
    for bad in (0, 501):
        with pytest.raises(ValueError, match="limit"):
            await query(ctx, limit=bad)


# ---------------------------------------------------------------- recent_failures


async def test_recent_failures_counts_login_failures_in_the_window(
    ctx: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    t0 = datetime(2026, 3, 1, 12, 0, 0)
    clock = [t0]
    monkeypatch.setattr(audit_log, "utcnow", lambda: clock[0])

    async def login(
        at_s: int, actor: str, outcome: str, ip: str = "10.0.0.1", action: str = "auth.login"
    ) -> None:
        clock[0] = t0 + timedelta(seconds=at_s)
        await record(ctx, action=action, outcome=outcome, actor=actor, ip=ip)

    await login(0, "bob", "failure")
    await login(10, "bob", "failure")
    await login(20, "bob", "success")  # bob's count starts afresh, the address's does not
    await login(30, "bob", "failure")
    await login(40, "alice", "failure")
    await login(45, "bob", "throttled")  # not a failure
    await login(50, "bob", "failure", action="auth.refresh")  # not a login
    await login(60, "bob", "failure", ip="10.0.0.2")
    clock[0] = t0 + timedelta(seconds=100)

    async def counts(**kw: Any) -> tuple[int, int, float]:
        kw = {"username": "bob", "ip": "10.0.0.1", "window_s": 1000} | kw
        return await recent_failures(ctx, **kw)

    assert await counts() == (2, 4, 0.0)
    assert await counts(username="alice") == (1, 4, 0.0)
    assert await counts(username="carol", ip="10.0.0.2") == (0, 1, 0.0)
    assert await counts(username="", ip="") == (0, 0, 0.0)
    assert await counts(window_s=75) == (2, 2, 0.0)  # from t0+25: bob at 30, 60; the address at 30, 40
    assert await counts(window_s=65) == (1, 1, 0.0)  # from t0+35: bob's success left the window too
    assert await counts(username="alice", window_s=50) == (0, 0, 0.0)  # from t0+50
    # retry_after_s: until enough failures have left the window for every reached limit
    assert await counts(max_account_failures=2) == (2, 4, 930.0)  # bob's failure at 30 leaves at 1030
    assert await counts(max_account_failures=3) == (2, 4, 0.0)
    assert await counts(max_ip_failures=3) == (2, 4, 910.0)  # 2 of 4 must go: the one at 10
    assert await counts(max_ip_failures=1) == (2, 4, 940.0)  # all 4: the last at 40
    assert await counts(max_account_failures=2, max_ip_failures=3) == (2, 4, 930.0)
    limits = SimpleNamespace(login_max_failures=2, login_max_failures_ip=100)
    assert await recent_failures(
        SimpleNamespace(db=ctx.db, settings=limits), username="bob", ip="10.0.0.1", window_s=1000
    ) == (2, 4, 930.0)
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="window_s"):
            await counts(window_s=bad)


# ---------------------------------------------------------------- append-only triggers (migration 0003)


async def test_the_database_refuses_to_change_audit_rows(ctx: SimpleNamespace) -> None:
    await _fill(ctx, 3)
    if ctx.db.backend == "sqlite":  # 0003 does nothing on SQLite
        assert await _sql(ctx.db, "SELECT name FROM sqlite_master WHERE type = 'trigger'") == []
        return
    for sql in (
        "UPDATE audit_log SET outcome = 'failure' WHERE seq = 2",
        "DELETE FROM audit_log WHERE seq = 3",
        "DELETE FROM audit_head",
    ):
        with pytest.raises(DBAPIError) as err:
            await _sql(ctx.db, sql)
        assert mysql_error_code(err.value) == 1644 and "append-only" in str(err.value)
    assert (await verify(ctx)).ok and (await verify(ctx)).checked == 3
    assert await record(ctx, action="x", outcome="success") == 4


async def test_migration_without_trigger_privilege_warns_and_goes_on(
    mariadb_url: str,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An account that may not create triggers gets a warning, not a failed migration."""
    database = mariadb_url.rsplit("/", 1)[1]
    user, password = f"rf_{uuid.uuid4().hex[:12]}", uuid.uuid4().hex
    with admin_connection() as conn, conn.cursor() as cur:
        cur.execute(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'")
    try:
        with admin_connection() as conn, conn.cursor() as cur:
            cur.execute(f"GRANT ALL PRIVILEGES ON `{database}`.* TO '{user}'@'%'")
            cur.execute(f"REVOKE TRIGGER ON `{database}`.* FROM '{user}'@'%'")
        url = (
            make_url(mariadb_url).set(username=user, password=password).render_as_string(hide_password=False)
        )
        db = Database(url)
        try:
            with caplog.at_level(logging.WARNING):
                assert await db.migrate() == head_revision()  # every migration after 0003 too
            assert "may not create triggers" in caplog.text
            with admin_connection() as conn, conn.cursor() as cur:
                cur.execute(
                    "SELECT COUNT(*) FROM information_schema.triggers WHERE trigger_schema = %s", (database,)
                )
                assert cur.fetchone()[0] == 0
            ctx = SimpleNamespace(db=db)
            assert await record(ctx, action="x", outcome="success") == 1
            assert (await verify(ctx)).ok
        finally:
            await db.close()
    finally:
        with admin_connection() as conn, conn.cursor() as cur:
            cur.execute(f"DROP USER IF EXISTS '{user}'@'%'")
