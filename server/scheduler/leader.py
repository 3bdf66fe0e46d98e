"""One scheduler at a time: several server processes may serve the API, one of them schedules.

On MySQL/MariaDB the leader holds the named lock ``renderfarm.scheduler.<database>``
(``GET_LOCK``) on a connection of its own (lock names are server-wide, so the database's
name is part of it: two farms on one server each have their own scheduler); the server lets it go when that
connection ends, so a SIGKILLed leader is replaced at once. On SQLite only one
process uses the database (the data folder is locked), so it always leads.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from server.persistence import Database

log = logging.getLogger(__name__)
LOCK_NAME = "renderfarm.scheduler"
"""Prefix of the scheduler lock's name; :func:`lock_name` adds the database."""


def lock_name(db: Database) -> str:
    """The scheduler lock's name for ``db``: ``renderfarm.scheduler.<database>``, at most 64
    characters (MySQL's limit; a longer database name is replaced by its SHA-256 prefix)."""
    name = f"{LOCK_NAME}.{db.url.database or ''}"
    if len(name) > 64:
        name = f"{LOCK_NAME}.{hashlib.sha256((db.url.database or '').encode()).hexdigest()[:40]}"
    return name


RELEASE_TIMEOUT_S = 5.0
"""Seconds a release of the lock (or the closing of its connection) may take before it is given up."""


class LeaderLock:
    """Take and keep the scheduler lock.

    Usage: ``if await lock.acquire(): ...; while await lock.held(): ...; await lock.release()``.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._conn: AsyncConnection | None = None
        self._named = db.engine.dialect.name in ("mysql", "mariadb")
        self.name = lock_name(db)

    async def acquire(self) -> bool:
        """Try to take the lock without waiting; returns whether this process now leads."""
        if not self._named:
            return True
        if self._conn is None:
            self._conn = await self.db.engine.connect()
        try:
            got = (await self._conn.execute(text("SELECT GET_LOCK(:n, 0)"), {"n": self.name})).scalar()
        except Exception:
            await self._drop()
            raise
        if got != 1:
            await self._drop()
            return False
        return True

    async def held(self) -> bool:
        """Whether the lock is still ours (false once its connection was lost)."""
        if not self._named:
            return True
        if self._conn is None:
            return False
        try:
            owner = (
                await self._conn.execute(text("SELECT IS_USED_LOCK(:n) = CONNECTION_ID()"), {"n": self.name})
            ).scalar()
        except Exception as exc:
            log.warning("scheduler lock lost: %s", exc)
            await self._drop()
            return False
        return owner == 1

    async def release(self) -> None:
        """Let the lock go (closing its connection), in at most :data:`RELEASE_TIMEOUT_S` seconds.

        A stop that cancelled the lock check in the middle of its query can leave the connection
        waiting for an answer that never comes; closing the connection ends its session, which
        releases a named lock on the server anyway, so a release that does not answer in time is
        given up rather than waited for (a stop once hung here for good)."""
        if self._conn is not None:
            try:
                await asyncio.wait_for(
                    self._conn.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": self.name}), RELEASE_TIMEOUT_S
                )
            except Exception:
                log.debug("release of the scheduler lock failed", exc_info=True)
            await self._drop()

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.invalidate(), RELEASE_TIMEOUT_S)
                await asyncio.wait_for(conn.close(), RELEASE_TIMEOUT_S)
            except Exception:
                log.debug("closing the lock connection failed", exc_info=True)
