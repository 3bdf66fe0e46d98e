"""The async engine and session factory, chosen by the database URL.

Two backends are supported:

* SQLite (``sqlite+aiosqlite:///path.db``), the embedded default: WAL journal,
  foreign keys on, 5 s busy timeout.
* MySQL 8 / MariaDB 10.6+ (``mysql+aiomysql://user:password@host:3306/name``):

  - ``charset=utf8mb4`` is added to the URL when it names no charset (aiomysql
    would otherwise talk latin1, and 4-byte UTF-8 such as emoji in a file name
    would be refused);
  - ``pool_pre_ping`` tests a pooled connection before handing it out, so one the
    server closed while idle (``wait_timeout``, restart, fail-over) is replaced
    instead of failing the first statement; ``pool_recycle`` (1800 s) retires
    connections before common server/proxy idle limits;
  - transactions run at ``READ COMMITTED``. InnoDB's default, ``REPEATABLE READ``,
    takes next-key (gap) locks on every range an UPDATE or locking read scans,
    so the queue-like ``tasks`` table, where lease scans (``state='running' AND
    lease_expires_at < now``), dispatch scans and claims update row ranges while
    new jobs insert tasks, deadlocks and waits on gaps. ``READ COMMITTED`` locks
    only the rows that match, and each statement reads the latest committed data,
    which is what the conditional updates (``UPDATE ... WHERE state='queued'``)
    expect. (MySQL then needs ``binlog_format=ROW``, its default since 5.7.7.)

Bare ``mysql://`` / ``mariadb://`` and ``sqlite://`` URLs get the async drivers
(aiomysql, aiosqlite). Transactions that lost their connection or a lock are retried
with :mod:`server.persistence.retry`; the schema is kept by Alembic
(:mod:`server.persistence.migrate`).
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from server.persistence.retry import track_commits

MYSQL_POOL_RECYCLE_S = 1800
"""Seconds after which a pooled MySQL/MariaDB connection is replaced."""
MYSQL_CONNECT_TIMEOUT_S = 10
"""Seconds to wait for a MySQL/MariaDB server to accept a connection."""
MYSQL_ISOLATION_LEVEL = "READ COMMITTED"
"""Isolation level of MySQL/MariaDB transactions (see the module's docstring for why)."""

_ASYNC_DRIVERS = {"mysql": "aiomysql", "mariadb": "aiomysql", "sqlite": "aiosqlite"}


def redact_url(url: str | URL) -> str:
    """``url`` as text with its password replaced by ``***``; safe to log and show.

    Works on text SQLAlchemy cannot parse, too (``scheme://user:secret@host`` forms).
    """
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", str(url))


def normalize_url(url: str | URL) -> URL:
    """Parse a database URL and fill in what this project needs.

    ``mysql://``, ``mariadb://`` and ``sqlite://`` get their async drivers; a MySQL/MariaDB
    URL without ``charset`` gets ``charset=utf8mb4``.

    Raises:
        ValueError: naming the URL (password redacted) when it cannot be parsed or names
            a backend other than SQLite or MySQL/MariaDB.
    """
    try:
        u = make_url(url)
    except Exception as exc:  # ArgumentError, ValueError
        raise ValueError(f"bad database URL {redact_url(url)!r}: {exc}") from None
    backend = u.get_backend_name()
    if backend not in _ASYNC_DRIVERS:
        raise ValueError(
            f"bad database URL {redact_url(u)!r}: renderfarm runs on sqlite+aiosqlite:///PATH and "
            "mysql+aiomysql://USER:PASSWORD@HOST:PORT/NAME (MySQL 8 or MariaDB)"
        )
    if "+" not in u.drivername and backend in _ASYNC_DRIVERS:
        u = u.set(drivername=f"{backend}+{_ASYNC_DRIVERS[backend]}")
    if backend in ("mysql", "mariadb") and "charset" not in u.query:
        u = u.update_query_dict({"charset": "utf8mb4"})
    return u


def engine_options(url: URL) -> dict[str, Any]:
    """Keyword arguments for ``create_async_engine`` for this URL's backend."""
    opts: dict[str, Any] = {"pool_pre_ping": True}
    if url.get_backend_name() in ("mysql", "mariadb"):
        opts |= {"pool_recycle": MYSQL_POOL_RECYCLE_S, "isolation_level": MYSQL_ISOLATION_LEVEL}
        if "connect_timeout" not in url.query:
            opts["connect_args"] = {"connect_timeout": MYSQL_CONNECT_TIMEOUT_S}
    return opts


class Database:
    """Owns the engine; ``session()`` opens a unit of work.

    Args:
        url: a database URL, e.g. ``sqlite+aiosqlite:///path.db`` or
            ``mysql+aiomysql://user:password@host:3306/renderfarm`` (see :func:`normalize_url`).

    Attributes:
        url: the normalized URL (``str(db.url)`` hides the password; use
            :func:`redact_url` to show it anyway).
        engine: the SQLAlchemy ``AsyncEngine``.
        session: an ``async_sessionmaker`` (``expire_on_commit=False``).

    Raises:
        ValueError: naming the URL (password redacted) when SQLAlchemy cannot parse it
            or has no async driver for it.
    """

    def __init__(self, url: str | URL) -> None:
        self.url: URL = normalize_url(url)
        try:
            self.engine: AsyncEngine = create_async_engine(self.url, **engine_options(self.url))
        except Exception as exc:  # ArgumentError, NoSuchModuleError, InvalidRequestError (sync driver)
            raise ValueError(f"bad database URL {redact_url(self.url)!r}: {exc}") from None
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        track_commits(self.engine)
        self.session = async_sessionmaker(self.engine, expire_on_commit=False, class_=AsyncSession)

    @property
    def backend(self) -> str:
        """``"sqlite"`` or ``"mysql"`` (MariaDB included)."""
        return self.url.get_backend_name().replace("mariadb", "mysql")

    async def migrate(self) -> str:
        """Bring the schema to the newest Alembic revision; returns that revision's id.

        A database made before migrations existed (tables but no ``alembic_version``)
        is stamped when its tables match the first revision, then upgraded.
        On MySQL/MariaDB concurrent callers (several server processes starting at
        once) take turns through a named lock.

        Raises:
            server.persistence.migrate.SchemaMismatchError: the database holds tables
                of ours without a revision, and they differ from the first revision.
            server.persistence.migrate.UnknownRevisionError: the database is at a revision
                newer than this code's (a newer renderfarm migrated it).
            sqlalchemy.exc.OperationalError: the database cannot be reached.
        """
        from server.persistence.migrate import upgrade_connection

        async with self.engine.connect() as conn:
            return await conn.run_sync(upgrade_connection)

    async def create_all(self) -> None:
        """Same as :meth:`migrate` (kept for callers from before migrations)."""
        await self.migrate()

    async def current_revision(self) -> str | None:
        """The Alembic revision the database is at; ``None`` when it has none (new or pre-migration)."""
        from server.persistence.migrate import revision_of_connection

        async with self.engine.connect() as conn:
            return await conn.run_sync(revision_of_connection)

    async def close(self) -> None:
        """Dispose of the connection pool."""
        await self.engine.dispose()


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()
