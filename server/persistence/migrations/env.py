"""Alembic environment of renderfarm's schema.

Run through :mod:`server.persistence.migrate`, which hands over an open sync
connection in ``config.attributes["connection"]`` (from ``AsyncConnection.run_sync``).
Without one (plain ``alembic`` with a config naming ``sqlalchemy.url``), it opens
its own engine. ``--sql`` (offline) mode writes the DDL for the URL's dialect.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from server.persistence.migrate import include_name_for
from server.persistence.tables import Base

config = context.config
target_metadata = Base.metadata


def _configure(**kw: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        include_name=include_name_for(target_metadata),
        **kw,  # type: ignore[arg-type]
    )


def run_migrations_offline() -> None:
    """Write the migrations' SQL for ``sqlalchemy.url``'s dialect instead of running them."""
    url = config.get_main_option("sqlalchemy.url")
    _configure(url=url, literal_binds=True, render_as_batch=str(url).startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    """Run the migrations on ``connection`` (batch mode on SQLite)."""
    _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


async def _run_standalone(url: str) -> None:
    from server.persistence.db import Database

    db = Database(url)
    try:
        async with db.engine.connect() as conn:
            await conn.run_sync(do_run_migrations)
            await conn.commit()
    finally:
        await db.close()


def run_migrations_online() -> None:
    """Run the migrations on the connection handed over, or on one made from ``sqlalchemy.url``."""
    connection = config.attributes.get("connection")
    if connection is not None:
        do_run_migrations(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection in config.attributes and no sqlalchemy.url")
    asyncio.run(_run_standalone(url))


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
