"""One scheduler at a time: several server processes may serve the API, one of them schedules.

On MySQL/MariaDB the leader holds the named lock ``renderfarm.scheduler``
(``GET_LOCK``) on a connection of its own; the server lets it go when that
connection ends, so a SIGKILLed leader is replaced at once. On SQLite only one
process uses the database (the data folder is locked), so it always leads.
"""

from __future__ import annotations

import logging

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from server.persistence import Database

log = logging.getLogger(__name__)
LOCK_NAME = "renderfarm.scheduler"


class LeaderLock:
    """Take and keep the scheduler lock.

    Usage: ``if await lock.acquire(): ...; while await lock.held(): ...; await lock.release()``.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._conn: AsyncConnection | None = None
        self._named = db.engine.dialect.name in ("mysql", "mariadb")

    async def acquire(self) -> bool:
        """Try to take the lock without waiting; returns whether this process now leads."""
        if not self._named:
            return True
        if self._conn is None:
            self._conn = await self.db.engine.connect()
        try:
            got = (await self._conn.execute(text("SELECT GET_LOCK(:n, 0)"), {"n": LOCK_NAME})).scalar()
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
                await self._conn.execute(text("SELECT IS_USED_LOCK(:n) = CONNECTION_ID()"), {"n": LOCK_NAME})
            ).scalar()
        except Exception as exc:
            log.warning("scheduler lock lost: %s", exc)
            await self._drop()
            return False
        return owner == 1

    async def release(self) -> None:
        """Let the lock go (closing its connection)."""
        if self._conn is not None:
            try:
                await self._conn.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": LOCK_NAME})
            except Exception:
                log.debug("release of the scheduler lock failed", exc_info=True)
            await self._drop()

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.invalidate()
                await conn.close()
            except Exception:
                log.debug("closing the lock connection failed", exc_info=True)
