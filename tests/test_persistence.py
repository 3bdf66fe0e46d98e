"""Persistence: Alembic migrations on SQLite and MariaDB, MySQL specifics, retried transactions,
and ``renderfarm db``. MariaDB tests run on a fresh database of the shared server (tests/mariadb.py)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import func, inspect, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import create_async_engine

from cli.db_cmd import db as db_cli
from server.persistence.db import Database, normalize_url, redact_url
from server.persistence.migrate import (
    SchemaMismatchError,
    UnknownRevisionError,
    current_revision,
    head_revision,
    initial_schema,
    schema_differences,
    upgrade,
)
from server.persistence.retry import is_retryable, mysql_error_code, retry_on_disconnect, run_in_tx
from server.persistence.tables import Base, Frame, Job, Model, Task
from tests.mariadb import admin_connection, mariadb_url  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
TABLES = {
    "models",
    "jobs",
    "tasks",
    "frames",
    "outbox",
    "agents",
    "users",
    "projects",
    "memberships",
    "api_tokens",
    "audit_log",
    "audit_head",
    "task_failures",
}


@pytest.fixture(params=["sqlite", "mariadb"])
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database on each backend."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'rf.db'}"
    return request.getfixturevalue("mariadb_url")


@pytest.fixture
async def mdb(mariadb_url: str) -> AsyncIterator[Database]:  # noqa: F811
    """A migrated MariaDB database."""
    db = Database(mariadb_url)
    await db.migrate()
    yield db
    await db.close()


async def _differences(db: Database) -> list[object]:
    async with db.engine.connect() as conn:
        return await conn.run_sync(lambda c: schema_differences(c, Base.metadata))


async def _job_with_tasks(db: Database, n_tasks: int = 2) -> tuple[str, list[str]]:
    async with db.session() as s:
        model = Model(
            filename="scène 🎬.blend", kind="blend", main="scène 🎬.blend", sha256="0" * 64,
            size_bytes=1, storage_key="models/x", info={"k": "ü"},
        )  # fmt: skip
        s.add(model)
        await s.flush()
        job = Job(model_id=model.id, frames_spec="1-2", frame_count=2, chunk_size=1)
        s.add(job)
        await s.flush()
        tasks = [Task(job_id=job.id, index=i, frames=[i + 1]) for i in range(n_tasks)]
        s.add_all(tasks)
        await s.commit()
        return job.id, [t.id for t in tasks]


def _kill(connection_id: int) -> None:
    with admin_connection() as conn, conn.cursor() as cur:
        cur.execute(f"KILL {int(connection_id)}")


# ---------------------------------------------------------------- migrations


async def test_migration_matches_orm(any_url: str) -> None:
    """A new database upgraded to head has every table, index and constraint of tables.py."""
    assert await current_revision(any_url) is None
    assert await upgrade(any_url) == head_revision()
    assert await current_revision(any_url) == head_revision()
    db = Database(any_url)
    try:
        assert await _differences(db) == []
        async with db.engine.connect() as conn:

            def names(c):  # type: ignore[no-untyped-def]
                insp = inspect(c)
                return (
                    set(insp.get_table_names()),
                    {ix["name"] for ix in insp.get_indexes("tasks")},
                    {u["name"] for u in insp.get_unique_constraints("frames")},
                    {fk["name"] for fk in insp.get_foreign_keys("frames")},
                )

            tables, task_indexes, frame_uniques, frame_fks = await conn.run_sync(names)
        assert tables == TABLES | {"alembic_version"}
        assert task_indexes == {"ix_tasks_state_lease", "ix_tasks_job_queue", "ix_tasks_dispatch"}
        assert frame_uniques == {"uq_frames_job_frame"}
        assert frame_fks == {"fk_frames_job_id_jobs", "fk_frames_task_id_tasks"}
    finally:
        await db.close()


async def test_upgrade_is_idempotent_and_keeps_data(any_url: str) -> None:
    db = Database(any_url)
    try:
        first = await db.migrate()
        job_id, _ = await _job_with_tasks(db)
        assert await db.migrate() == first
        await db.create_all()  # the old name, still called by server/app.py
        async with db.session() as s:
            assert (await s.get(Job, job_id)) is not None
            assert await s.scalar(text("SELECT COUNT(*) FROM alembic_version")) == 1
    finally:
        await db.close()


async def test_pre_migration_database_is_stamped(any_url: str) -> None:
    """A database made by the old create_all (no alembic_version) that matches is adopted, data kept."""
    db = Database(any_url)
    try:
        async with db.engine.begin() as conn:  # the tables as revision 0001 made them
            await conn.run_sync(initial_schema().create_all)
            await conn.execute(
                text(
                    "INSERT INTO models (id, filename, kind, main, sha256, size_bytes, storage_key, info, "
                    "created_at) VALUES ('m1', 'a.blend', 'blend', 'a.blend', 'x', 1, 'k', '{}', "
                    "'2026-01-01 00:00:00')"
                )
            )
        job_id = "m1"
        assert await db.current_revision() is None
        assert await db.migrate() == head_revision()
        assert await db.current_revision() == head_revision()
        async with db.session() as s:
            model = await s.get(Model, job_id)
            assert model is not None and model.project_id is None  # kept, in no project: admins only
    finally:
        await db.close()


async def test_pre_migration_database_that_differs_is_refused(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'old.db'}")
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(initial_schema().create_all)
            await conn.execute(text("ALTER TABLE jobs DROP COLUMN owner"))  # as before the owner column
        with pytest.raises(SchemaMismatchError) as err:
            await db.migrate()
        assert "owner" in str(err.value) and "jobs" in str(err.value)
        assert err.value.differences
        assert await db.current_revision() is None  # nothing stamped
    finally:
        await db.close()


async def test_database_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'rf.db'}"
    await upgrade(url)
    db = Database(url)
    try:
        async with db.engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = 'f00dfeed'"))
        with pytest.raises(UnknownRevisionError, match=r"'f00dfeed'.*newer renderfarm"):
            await db.migrate()
    finally:
        await db.close()
    assert await current_revision(url) == "f00dfeed"  # left as it was


def test_db_upgrade_cli_refuses_a_newer_database(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'rf.db'}"
    asyncio.run(upgrade(url))
    with sqlite3.connect(tmp_path / "rf.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'f00dfeed'")
    res = CliRunner().invoke(db_cli, ["upgrade", "--database-url", url])
    assert res.exit_code == 2 and "'f00dfeed'" in res.stderr and "newer renderfarm" in res.stderr


async def test_concurrent_upgrades_take_turns_on_mariadb(mariadb_url: str) -> None:  # noqa: F811
    """Several server processes starting at once: each upgrade succeeds (a named lock serializes them)."""
    results = await asyncio.gather(*(upgrade(mariadb_url) for _ in range(4)), return_exceptions=True)
    assert results == [head_revision()] * 4


# ---------------------------------------------------------------- MySQL specifics


async def test_mariadb_connection_settings(mdb: Database) -> None:
    assert mdb.url.query["charset"] == "utf8mb4"
    async with mdb.engine.connect() as conn:
        assert await conn.get_isolation_level() == "READ COMMITTED"
        charset = await conn.scalar(text("SELECT @@character_set_connection"))
        collations = (
            await conn.execute(
                text(
                    "SELECT DISTINCT TABLE_COLLATION, ENGINE FROM information_schema.TABLES "
                    "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME <> 'alembic_version'"
                )
            )
        ).all()
    assert charset == "utf8mb4"
    assert collations == [("utf8mb4_bin", "InnoDB")]
    assert mdb.engine.pool._recycle == 1800
    assert mdb.engine.pool._pre_ping is True


async def test_mariadb_keeps_microseconds_utf8mb4_and_json(mdb: Database) -> None:
    job_id, task_ids = await _job_with_tasks(mdb)
    t = datetime(2026, 11, 30, 7, 38, 19, 123456)
    async with mdb.session() as s:
        await s.execute(update(Task).where(Task.id == task_ids[0]).values(lease_expires_at=t))
        await s.commit()
    async with mdb.session() as s:
        task = await s.get(Task, task_ids[0])
        job = await s.get(Job, job_id)
        model = await s.get(Model, job.model_id)
        assert task.lease_expires_at == t
        assert job.created_at.microsecond != 0 or job.updated_at.microsecond != 0
        assert model.filename == "scène 🎬.blend" and model.info == {"k": "ü"}
        assert task.frames == [1]


async def test_mariadb_enforces_one_row_per_job_frame(mdb: Database) -> None:
    job_id, task_ids = await _job_with_tasks(mdb)

    def frame() -> Frame:
        return Frame(
            job_id=job_id, task_id=task_ids[0], frame=1, storage_key="k", filename="f.png",
            size_bytes=1, sha256="0" * 64,
        )  # fmt: skip

    async with mdb.session() as s:
        s.add(frame())
        await s.commit()
    async with mdb.session() as s:
        s.add(frame())
        with pytest.raises(IntegrityError):
            await s.commit()
    async with mdb.session() as s:
        assert await s.scalar(select(func.count()).select_from(Frame)) == 1


def test_urls_are_normalized_and_redacted() -> None:
    u = normalize_url("mysql://rf:s3cret@db:3306/farm")
    assert u.drivername == "mysql+aiomysql" and u.query["charset"] == "utf8mb4"
    assert normalize_url("mysql+aiomysql://h/d?charset=utf8mb3").query["charset"] == "utf8mb3"
    assert normalize_url("sqlite:////tmp/x.db").drivername == "sqlite+aiosqlite"
    assert "s3cret" not in redact_url("mysql://rf:s3cret@db/farm")
    assert "s3cret" not in redact_url("mysql://rf:s3cret@db:notaport/farm")
    for bad in ("not a url", "postgresql://rf:s3cret@db/farm", "mysql+pymysql://rf:s3cret@db/farm"):
        with pytest.raises(ValueError) as err:
            Database(bad)
        assert "s3cret" not in str(err.value) and "bad database URL" in str(err.value)


# ---------------------------------------------------------------- retries


async def test_killed_connection_mid_transaction_is_retried(mdb: Database) -> None:
    """The server-side connection is killed between two statements; the transaction runs again."""
    calls: list[int] = []

    async def add_two_models(s) -> str:  # type: ignore[no-untyped-def]
        cid = await s.scalar(text("SELECT CONNECTION_ID()"))
        calls.append(cid)
        s.add(Model(filename="a", kind="blend", main="a", sha256="a" * 64, size_bytes=1, storage_key="a"))
        await s.flush()
        if len(calls) == 1:
            _kill(cid)
        s.add(Model(filename="b", kind="blend", main="b", sha256="b" * 64, size_bytes=1, storage_key="b"))
        return "done"

    assert await run_in_tx(mdb, add_two_models) == "done"
    assert len(calls) == 2 and calls[0] != calls[1]
    async with mdb.session() as s:
        assert sorted((await s.scalars(select(Model.filename))).all()) == ["a", "b"]


async def test_killed_connection_surfaces_without_retry(mdb: Database) -> None:
    """The same failure without the helper: the error reaches the caller (and would be a 500)."""
    with pytest.raises(DBAPIError) as err:
        async with mdb.session() as s:
            _kill(await s.scalar(text("SELECT CONNECTION_ID()")))
            await s.execute(text("SELECT 1"))
    assert err.value.connection_invalidated and is_retryable(err.value)
    async with mdb.session() as s:  # the pool recovers for the next request
        assert await s.scalar(text("SELECT 1")) == 1


async def test_connection_lost_at_commit_is_not_retried(mdb: Database) -> None:
    """COMMIT's outcome is unknown when the connection dies under it: raised, unless idempotent."""
    calls = 0

    async def add_then_kill(s) -> None:  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        await s.execute(
            text("INSERT INTO outbox (queue, payload, priority, created_at) VALUES ('q', '{}', 0, NOW(6))")
        )
        if calls == 1:
            _kill(await s.scalar(text("SELECT CONNECTION_ID()")))

    with pytest.raises(DBAPIError) as err:
        await run_in_tx(mdb, add_then_kill)
    assert is_retryable(err.value) and calls == 1
    calls = 0
    await run_in_tx(mdb, add_then_kill, idempotent=True)
    assert calls == 2
    async with mdb.session() as s:
        assert await s.scalar(text("SELECT COUNT(*) FROM outbox")) == 1


async def test_decorator_retries_before_commit_never_after(mdb: Database) -> None:
    calls = {"before": 0, "after": 0}

    @retry_on_disconnect
    async def killed_before_commit() -> None:
        calls["before"] += 1
        async with mdb.session() as s:
            s.add(Model(filename="x", kind="blend", main="x", sha256="x" * 64, size_bytes=1, storage_key="x"))
            await s.flush()
            if calls["before"] == 1:
                _kill(await s.scalar(text("SELECT CONNECTION_ID()")))
            s.add(Model(filename="z", kind="blend", main="z", sha256="z" * 64, size_bytes=1, storage_key="z"))
            await s.commit()  # the flush's INSERT fails, before COMMIT is sent

    @retry_on_disconnect(attempts=5)
    async def killed_after_commit() -> None:
        calls["after"] += 1
        async with mdb.session() as s:  # the job's transaction: committed
            s.add(Model(filename="y", kind="blend", main="y", sha256="y" * 64, size_bytes=1, storage_key="y"))
            await s.commit()
        async with mdb.session() as s:  # a read afterwards (a status publish, say) loses its connection
            _kill(await s.scalar(text("SELECT CONNECTION_ID()")))
            await s.execute(text("SELECT 1"))

    await killed_before_commit()
    assert calls["before"] == 2
    with pytest.raises(DBAPIError):
        await killed_after_commit()
    assert calls["after"] == 1  # not run again: "y" is not inserted twice
    async with mdb.session() as s:
        assert sorted((await s.scalars(select(Model.filename))).all()) == ["x", "y", "z"]


async def _deadlock(mdb: Database, task_ids: list[str], *, retry: bool) -> list[object]:
    """Two transactions update the same two tasks in opposite orders; InnoDB breaks the deadlock."""
    both_hold_one = asyncio.Barrier(2)
    calls = {0: 0, 1: 0}

    def bump(first: str, second: str, who: int):  # type: ignore[no-untyped-def]
        async def fn(s) -> None:  # type: ignore[no-untyped-def]
            calls[who] += 1
            await s.execute(update(Task).where(Task.id == first).values(attempts=Task.attempts + 1))
            if calls[who] == 1:
                await both_hold_one.wait()
            await s.execute(update(Task).where(Task.id == second).values(attempts=Task.attempts + 1))

        return fn

    fns = [bump(task_ids[0], task_ids[1], 0), bump(task_ids[1], task_ids[0], 1)]
    if retry:
        return await asyncio.gather(*(run_in_tx(mdb, f) for f in fns), return_exceptions=True)

    async def plain(fn) -> None:  # type: ignore[no-untyped-def]
        async with mdb.session() as s:
            await fn(s)
            await s.commit()

    return await asyncio.gather(*(plain(f) for f in fns), return_exceptions=True)


async def test_deadlock_is_retried(mdb: Database) -> None:
    _, task_ids = await _job_with_tasks(mdb)
    assert await asyncio.wait_for(_deadlock(mdb, task_ids, retry=True), 30) == [None, None]
    async with mdb.session() as s:
        assert (await s.scalars(select(Task.attempts).order_by(Task.index))).all() == [2, 2]


async def test_deadlock_surfaces_without_retry(mdb: Database) -> None:
    _, task_ids = await _job_with_tasks(mdb)
    results = await asyncio.wait_for(_deadlock(mdb, task_ids, retry=False), 30)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1 and mysql_error_code(errors[0]) == 1213 and is_retryable(errors[0])


async def _hold_lock_then_commit(mdb: Database, task_id: str, locked: asyncio.Event, hold_s: float) -> None:
    async with mdb.session() as s:
        await s.execute(update(Task).where(Task.id == task_id).values(attempts=Task.attempts + 1))
        locked.set()
        await asyncio.sleep(hold_s)
        await s.commit()


async def _bump_with_short_lock_wait(s, task_id: str) -> None:  # type: ignore[no-untyped-def]
    await s.execute(text("SET SESSION innodb_lock_wait_timeout = 1"))
    await s.execute(update(Task).where(Task.id == task_id).values(attempts=Task.attempts + 1))


async def test_lock_wait_timeout_is_retried(mdb: Database) -> None:
    _, task_ids = await _job_with_tasks(mdb)
    locked = asyncio.Event()
    holder = asyncio.create_task(_hold_lock_then_commit(mdb, task_ids[0], locked, 1.5))
    await locked.wait()
    await run_in_tx(mdb, lambda s: _bump_with_short_lock_wait(s, task_ids[0]))
    await holder
    async with mdb.session() as s:
        assert (await s.get(Task, task_ids[0])).attempts == 2


async def test_lock_wait_timeout_surfaces_without_retry(mdb: Database) -> None:
    _, task_ids = await _job_with_tasks(mdb)
    locked = asyncio.Event()
    holder = asyncio.create_task(_hold_lock_then_commit(mdb, task_ids[0], locked, 1.5))
    await locked.wait()
    with pytest.raises(DBAPIError) as err:
        async with mdb.session() as s:
            await _bump_with_short_lock_wait(s, task_ids[0])
    await holder
    assert mysql_error_code(err.value) == 1205 and is_retryable(err.value)


async def test_idle_pooled_connection_killed_is_replaced(mdb: Database, mariadb_url: str) -> None:  # noqa: F811
    """pool_pre_ping: a pooled connection the server dropped while idle is replaced at checkout."""
    async with mdb.session() as s:
        first = await s.scalar(text("SELECT CONNECTION_ID()"))
    _kill(first)
    async with mdb.session() as s:
        assert await s.scalar(text("SELECT CONNECTION_ID()")) != first
    # the same without pre-ping fails: the check is what saves the request
    plain = create_async_engine(normalize_url(mariadb_url))
    try:
        async with plain.connect() as conn:
            cid = await conn.scalar(text("SELECT CONNECTION_ID()"))
        _kill(cid)
        with pytest.raises(DBAPIError):
            async with plain.connect() as conn:
                await conn.scalar(text("SELECT 1"))
    finally:
        await plain.dispose()


async def test_sqlite_busy_database_is_retried(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'rf.db'}")
    await db.migrate()
    try:
        _, task_ids = await _job_with_tasks(db)
        locked = asyncio.Event()

        async def writer_holding_lock() -> None:
            async with db.session() as s:
                await s.execute(update(Task).where(Task.id == task_ids[0]).values(attempts=5))
                locked.set()
                await asyncio.sleep(0.5)
                await s.commit()

        async def bump(s) -> None:  # type: ignore[no-untyped-def]
            await s.execute(text("PRAGMA busy_timeout = 100"))
            await s.execute(update(Task).where(Task.id == task_ids[1]).values(attempts=7))

        holder = asyncio.create_task(writer_holding_lock())
        await locked.wait()
        with pytest.raises(DBAPIError) as err:  # without retry: "database is locked"
            async with db.session() as s:
                await bump(s)
                await s.commit()
        assert is_retryable(err.value)
        await run_in_tx(db, bump, attempts=6, backoff_s=0.1)
        await holder
        async with db.session() as s:
            assert (await s.scalars(select(Task.attempts).order_by(Task.index))).all() == [5, 7]
    finally:
        await db.close()


def test_is_retryable_is_narrow() -> None:
    assert not is_retryable(ValueError("x"))
    assert not is_retryable(IntegrityError("INSERT", {}, Exception(1062, "Duplicate entry")))
    assert is_retryable(DBAPIError("SELECT 1", {}, Exception(2006, "MySQL server has gone away")))


# ---------------------------------------------------------------- renderfarm db


def test_db_upgrade_cli_sqlite(tmp_path: Path) -> None:
    runner = CliRunner()
    url = f"sqlite+aiosqlite:///{tmp_path / 'rf.db'}"
    res = runner.invoke(db_cli, ["current", "--database-url", url])
    assert res.exit_code == 0 and res.stdout.strip() == "none"
    res = runner.invoke(db_cli, ["upgrade", "--database-url", url])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == head_revision()
    res = runner.invoke(db_cli, ["current"], env={"RENDERFARM_DATABASE_URL": url})
    assert res.exit_code == 0 and res.stdout.strip() == head_revision()


def test_db_upgrade_cli_mariadb(mariadb_url: str) -> None:  # noqa: F811
    res = CliRunner().invoke(db_cli, ["upgrade"], env={"RENDERFARM_DATABASE_URL": mariadb_url})
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == head_revision()


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (
            "mysql+aiomysql://rf:s3cret@127.0.0.1:1/farm",
            "cannot use database mysql+aiomysql://rf:***@127.0.0.1:1/farm",
        ),
        ("postgresql://rf:s3cret@db/farm", "bad database URL 'postgresql://rf:***@db/farm'"),
        ("nonsense", "bad database URL 'nonsense'"),
    ],
)
def test_db_upgrade_cli_bad_url_exits_2(url: str, says: str) -> None:
    res = CliRunner().invoke(db_cli, ["upgrade", "--database-url", url])
    assert res.exit_code == 2
    assert says in res.stderr and "s3cret" not in res.output


def test_db_upgrade_cli_default_data_dir(tmp_path: Path) -> None:
    """Without a URL: the SQLite file under the data dir that `renderfarm up` uses by default."""
    env = {k: v for k, v in os.environ.items() if k != "RENDERFARM_DATABASE_URL"}
    env["XDG_DATA_HOME"] = str(tmp_path)
    res = subprocess.run(
        [sys.executable, "-c", "from cli.db_cmd import db; db()", "upgrade"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == head_revision()
    assert (tmp_path / "renderfarm" / "renderfarm.db").is_file()
