"""A fresh database on the shared MariaDB/MySQL server for each test.

Use the fixture in a test module (importing it is enough for pytest to find it)::

    from tests.mariadb import mariadb_url  # noqa: F401

    async def test_something(mariadb_url: str) -> None:
        db = Database(mariadb_url)       # mysql+aiomysql://root@127.0.0.1:3306/rf_<random>
        await db.migrate()               # the database starts empty
        ...

or, outside pytest fixtures, ``with fresh_database() as url: ...``.

The server is ``RENDERFARM_TEST_MYSQL_URL`` (default ``mysql://root@127.0.0.1:3306``);
its user needs CREATE, DROP, PROCESS and CONNECTION ADMIN (or SUPER). When the server
cannot be reached the fixture skips the test and says why. Each database is named
``rf_<12 hex>`` and dropped afterwards, after killing connections a test left open on it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pymysql
import pytest
from sqlalchemy.engine import URL, make_url

SERVER_URL = os.environ.get("RENDERFARM_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306")
"""The MariaDB/MySQL server the test databases are made on (its database part is ignored)."""


def _server() -> URL:
    return make_url(SERVER_URL)


def admin_connection(database: str | None = None) -> pymysql.connections.Connection:
    """A plain (blocking) PyMySQL connection to the test server, autocommit on.

    Raises:
        pymysql.err.OperationalError: the server cannot be reached.
    """
    u = _server()
    return pymysql.connect(
        host=u.host or "127.0.0.1",
        port=u.port or 3306,
        user=u.username or "root",
        password=u.password or "",
        database=database,
        charset="utf8mb4",
        autocommit=True,
        connect_timeout=3,
    )


def unreachable_reason() -> str | None:
    """Why the test server cannot be used, or None when it can."""
    try:
        admin_connection().close()
    except pymysql.err.MySQLError as exc:
        return f"MariaDB/MySQL at {_server().render_as_string(hide_password=True)} is not reachable: {exc}"
    return None


def kill_connections(database: str) -> int:
    """Kill every connection using ``database`` (but the caller's own); returns how many."""
    with admin_connection() as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT id FROM information_schema.processlist WHERE db = %s AND id <> CONNECTION_ID()",
            (database,),
        )
        ids = [row[0] for row in cur.fetchall()]
        for cid in ids:
            try:
                cur.execute(f"KILL {int(cid)}")
            except pymysql.err.OperationalError:  # already gone
                pass
    return len(ids)


@contextmanager
def fresh_database(prefix: str = "rf") -> Iterator[str]:
    """Create an empty, uniquely named database; yield its ``mysql+aiomysql://`` URL; drop it.

    Raises:
        pymysql.err.OperationalError: the server cannot be reached.
    """
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with admin_connection() as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    try:
        url = _server().set(drivername="mysql+aiomysql", database=name)
        yield url.render_as_string(hide_password=False)
    finally:
        kill_connections(name)
        with admin_connection() as conn, conn.cursor() as cur:
            cur.execute("SET SESSION lock_wait_timeout = 30")
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture
def mariadb_url() -> Iterator[str]:
    """The URL of a new, empty database on the test server (dropped after the test);
    skips the test when the server cannot be reached."""
    reason = unreachable_reason()
    if reason:
        pytest.skip(reason)
    with fresh_database() as url:
        yield url
