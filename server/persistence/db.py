"""The async engine and session factory, chosen by the database URL."""

from __future__ import annotations

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from server.persistence.tables import Base


class Database:
    """Owns the engine; ``session()`` opens a unit of work.

    Args:
        url: a SQLAlchemy async URL, e.g. ``sqlite+aiosqlite:///path.db``.

    Raises:
        ValueError: naming the URL when SQLAlchemy cannot parse it or has no driver for it.
    """

    def __init__(self, url: str) -> None:
        try:
            self.engine: AsyncEngine = create_async_engine(url, pool_pre_ping=True)
        except Exception as exc:  # sqlalchemy raises ArgumentError / NoSuchModuleError
            raise ValueError(f"bad database URL {url!r}: {exc}") from exc
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self.session = async_sessionmaker(self.engine, expire_on_commit=False, class_=AsyncSession)

    async def create_all(self) -> None:
        """Create missing tables (the embedded farm; migrations come with the production backends)."""
        async with self.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)

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
