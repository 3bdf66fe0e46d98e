"""Alembic migrations, configured in code (no ``alembic.ini``).

The scripts live in ``server/persistence/migrations`` (shipped with the package).
The same revisions run on SQLite (through Alembic's batch mode, which rebuilds a
table for changes SQLite's ``ALTER TABLE`` cannot make) and on MySQL/MariaDB.

Public API::

    await upgrade(url)            # to the newest revision; returns its id
    await current_revision(url)   # the revision a database is at, or None
    head_revision()               # the newest revision in the scripts

``Database.migrate()`` does the same as ``upgrade`` on a database already open.

A database made by ``create_all`` before migrations existed (our tables, no
``alembic_version``) is compared with the first revision's schema: when they
match it is stamped with that revision and upgraded from there; when they differ
:class:`SchemaMismatchError` names the differences and nothing is changed.

New revision, after changing ``tables.py`` (``--autogenerate`` compares the ORM with
a database at head, so give it a scratch one)::

    python -m server.persistence.migrate revision -m "add users" \\
        --url sqlite+aiosqlite:////tmp/scratch.db

then read the new file in ``versions/``, name its constraints, and ``ruff check --fix`` and
``ruff format`` it. ``tests/test_persistence.py`` checks that head matches ``tables.py`` on
SQLite and MariaDB.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, UniqueConstraint, inspect, text
from sqlalchemy.engine import Connection

from server.persistence.db import Database, redact_url

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
"""Alembic's script folder (``env.py``, ``script.py.mako``, ``versions/``)."""
INITIAL_REVISION = "0001"
"""The first revision: the schema ``create_all`` made before migrations existed."""
MYSQL_LOCK_PREFIX = "renderfarm.migrate"
"""Prefix of the MySQL/MariaDB lock (``GET_LOCK``) that serializes concurrent migrations of one
database; :func:`migration_lock_name` adds the database's name (lock names are server-wide)."""
MYSQL_LOCK_TIMEOUT_S = 600
"""Seconds to wait for another process's migration to finish."""


class MigrationError(RuntimeError):
    """The schema cannot be brought up to date (the message says why and names the database)."""


class SchemaMismatchError(MigrationError):
    """The database holds tables of ours that no revision accounts for and that differ
    from the expected schema; ``differences`` lists Alembic's diff tuples."""

    def __init__(self, message: str, differences: list[Any]) -> None:
        super().__init__(message)
        self.differences = differences


class UnknownRevisionError(MigrationError):
    """The database is at a revision these scripts do not have (a newer renderfarm migrated it)."""


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic ``Config`` pointing at the shipped scripts.

    Args:
        connection: a sync connection for ``env.py`` to run on (``config.attributes``).
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def migration_lock_name(database: str | None) -> str:
    """``renderfarm.migrate.<database>``, at most 64 characters (MySQL's limit; a longer name is
    replaced by its SHA-256 prefix)."""
    name = f"{MYSQL_LOCK_PREFIX}.{database or ''}"
    if len(name) > 64:
        name = f"{MYSQL_LOCK_PREFIX}.{hashlib.sha256((database or '').encode()).hexdigest()[:40]}"
    return name


def head_revision() -> str:
    """The newest revision id in the shipped scripts."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, f"no migrations in {MIGRATIONS_DIR}"
    return head


def include_name_for(metadata: MetaData) -> Any:
    """An Alembic ``include_name`` hook that ignores tables ``metadata`` does not define
    (other applications' tables in a shared database)."""

    def include_name(name: str | None, type_: str, _parent: Any) -> bool:
        return type_ != "table" or name in metadata.tables

    return include_name


def schema_differences(connection: Connection, metadata: MetaData) -> list[Any]:
    """Alembic's differences between the database and ``metadata``, for ``metadata``'s tables only.

    Returns:
        Alembic diff tuples (``("add_column", ...)``, ``[("modify_nullable", ...)]``, ...); empty
        when they match.
    """
    mc = MigrationContext.configure(
        connection,
        opts={
            "compare_type": True,
            "include_name": include_name_for(metadata),
            "render_as_batch": connection.dialect.name == "sqlite",
        },
    )
    return list(compare_metadata(mc, metadata))


def initial_schema() -> MetaData:
    """The tables of the first revision, as its script defines them."""
    script = ScriptDirectory.from_config(alembic_config()).get_revision(INITIAL_REVISION)
    assert script is not None and script.module is not None
    return script.module.schema()


def revision_of_connection(connection: Connection) -> str | None:
    """The revision stamped in the database on ``connection`` (sync), or None."""
    return MigrationContext.configure(connection).get_current_revision()


def upgrade_connection(connection: Connection) -> str:
    """Upgrade the database on ``connection`` (a sync connection, e.g. inside ``run_sync``) to head.

    Returns:
        The head revision id.

    Raises:
        SchemaMismatchError: pre-migration tables differ from the first revision.
        UnknownRevisionError: the database is at a revision newer than these scripts.
        MigrationError: another process held the MySQL migration lock for too long.
    """
    mysql = connection.dialect.name in ("mysql", "mariadb")
    lock = migration_lock_name(connection.engine.url.database)
    if mysql:
        got = connection.execute(text("SELECT GET_LOCK(:n, :t)"), {"n": lock, "t": MYSQL_LOCK_TIMEOUT_S})
        if got.scalar() != 1:
            raise MigrationError(
                f"database {redact_url(connection.engine.url)}: another process has held the migration "
                f"lock {lock!r} for {MYSQL_LOCK_TIMEOUT_S} s"
            )
    try:
        cfg = alembic_config(connection)
        _adopt_pre_migration_schema(connection, cfg)
        _check_known_revision(connection, cfg)
        command.upgrade(cfg, "head")
        connection.commit()
        return revision_of_connection(connection) or ""
    finally:
        if mysql:
            try:
                connection.rollback()
                connection.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": lock})
                connection.commit()
            except Exception:  # a lost connection takes its lock with it
                log.debug("RELEASE_LOCK failed", exc_info=True)


def _check_known_revision(connection: Connection, cfg: Config) -> None:
    current = revision_of_connection(connection)
    if current is None:
        return
    try:
        ScriptDirectory.from_config(cfg).get_revision(current)
    except Exception:  # alembic.util.CommandError / ResolutionError
        raise UnknownRevisionError(
            f"database {redact_url(connection.engine.url)} is at revision {current!r}, which this "
            f"renderfarm does not know (newest known: {head_revision()}): a newer renderfarm migrated "
            "it; run that version"
        ) from None


def _adopt_pre_migration_schema(connection: Connection, cfg: Config) -> None:
    if revision_of_connection(connection) is not None:
        return
    initial = initial_schema()
    ours = set(inspect(connection).get_table_names()) & set(initial.tables)
    if not ours:
        return
    # create_all left the unique constraint on agents.name unnamed (an index called `name` on
    # MySQL): compare unique constraints by their columns only
    for table in initial.tables.values():
        for constraint in table.constraints:
            if isinstance(constraint, UniqueConstraint):
                constraint.name = None
    differences = schema_differences(connection, initial)
    if differences:
        url = redact_url(connection.engine.url)
        shown = "; ".join(str(d) for d in differences[:10])
        more = f" and {len(differences) - 10} more" if len(differences) > 10 else ""
        raise SchemaMismatchError(
            f"database {url} has renderfarm tables ({', '.join(sorted(ours))}) but no migration "
            f"revision, and they differ from revision {INITIAL_REVISION}: {shown}{more}. It was made by "
            "an older renderfarm (or a first migration was interrupted): move it aside and start "
            "with a new one, or fix the tables and run `alembic stamp`.",
            differences,
        )
    log.warning(
        "database %s predates migrations; its tables match: stamped %s",
        redact_url(connection.engine.url),
        INITIAL_REVISION,
    )
    command.stamp(cfg, INITIAL_REVISION)


async def upgrade(url: str) -> str:
    """Upgrade the database at ``url`` to the newest revision (creating every table on a new one).

    Returns:
        The revision the database is now at.

    Raises:
        ValueError: the URL cannot be parsed or has no async driver (named, password redacted).
        SchemaMismatchError: pre-migration tables differ from the first revision.
        UnknownRevisionError: the database is at a revision newer than these scripts.
        sqlalchemy.exc.OperationalError: the database cannot be reached.
    """
    db = Database(url)
    try:
        return await db.migrate()
    finally:
        await db.close()


async def current_revision(url: str) -> str | None:
    """The revision the database at ``url`` is at; None for a database without one.

    Raises:
        ValueError: the URL cannot be parsed or has no async driver.
        sqlalchemy.exc.OperationalError: the database cannot be reached.
    """
    db = Database(url)
    try:
        return await db.current_revision()
    finally:
        await db.close()


def _main(argv: list[str] | None = None) -> None:
    """``python -m server.persistence.migrate revision|upgrade|current``: for developers."""
    p = argparse.ArgumentParser(prog="python -m server.persistence.migrate")
    p.add_argument("action", choices=["revision", "upgrade", "current"])
    p.add_argument("--url", required=True, help="database URL (a scratch one for `revision`)")
    p.add_argument("-m", "--message", default="change")
    p.add_argument("--empty", action="store_true", help="revision: no autogenerate")
    args = p.parse_args(argv)
    if args.action == "upgrade":
        print(asyncio.run(upgrade(args.url)))
    elif args.action == "current":
        print(asyncio.run(current_revision(args.url)))
    else:
        asyncio.run(upgrade(args.url))

        async def make() -> None:
            db = Database(args.url)
            try:
                async with db.engine.connect() as conn:
                    await conn.run_sync(
                        lambda c: command.revision(
                            alembic_config(c), message=args.message, autogenerate=not args.empty
                        )
                    )
            finally:
                await db.close()

        asyncio.run(make())


if __name__ == "__main__":
    _main()
