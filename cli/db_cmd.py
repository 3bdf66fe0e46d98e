"""``renderfarm db``: the database schema (Alembic migrations).

``renderfarm db upgrade`` brings a database to the newest schema (creating every
table in a new one) and prints the revision; ``renderfarm db current`` prints the
revision a database is at (``none`` for one without). The database is
``--database-url``, else ``RENDERFARM_DATABASE_URL``, else the embedded SQLite file
in ``--data-dir`` (the same default as ``renderfarm up``).

Exit status: 0 done; 2 the URL cannot be used (unparseable, no driver, server
unreachable, access denied) or the schema cannot be migrated; the message names the
URL with its password hidden.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click

T = TypeVar("T")
DEFAULT_DATA_DIR = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "renderfarm"
"""As ``cli.main.DEFAULT_DATA_DIR`` (repeated here so that ``cli.main`` can import this module)."""


def _options(f: Any) -> Any:
    f = click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=DEFAULT_DATA_DIR,
        show_default=True,
        help="Folder of the embedded SQLite database, used when no URL is given.",
    )(f)
    return click.option(
        "--database-url",
        envvar="RENDERFARM_DATABASE_URL",
        default=None,
        help="Database URL, e.g. mysql+aiomysql://user:password@host:3306/renderfarm "
        "(or RENDERFARM_DATABASE_URL; default: SQLite in --data-dir).",
    )(f)


def _url(database_url: str | None, data_dir: Path) -> str:
    if database_url:
        return database_url
    from server.config import Settings

    settings = Settings(data_dir=data_dir)
    try:
        settings.ensure_dirs()
    except ValueError as exc:
        _fail(str(exc))
    return settings.database_url


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _run(url: str, action: Callable[[str], Awaitable[T]]) -> T:
    from sqlalchemy.exc import DBAPIError

    from server.persistence.db import redact_url
    from server.persistence.migrate import MigrationError

    try:
        return asyncio.run(action(url))
    except ValueError as exc:  # bad URL: the message names it, redacted
        _fail(str(exc))
    except DBAPIError as exc:
        reason = exc.orig if exc.orig is not None else exc
        _fail(f"cannot use database {redact_url(url)}: {reason}")
    except MigrationError as exc:
        _fail(f"cannot migrate database {redact_url(url)}: {exc}")
    raise AssertionError("unreachable")


@click.group()
def db() -> None:
    """Database schema: upgrade to the newest migration, show the current one."""


@db.command()
@_options
def upgrade(database_url: str | None, data_dir: Path) -> None:
    """Upgrade the database to the newest schema revision and print its id."""
    from server.persistence.db import redact_url
    from server.persistence.migrate import upgrade as do_upgrade

    url = _url(database_url, data_dir)
    revision = _run(url, do_upgrade)
    click.echo(f"database {redact_url(url)} is at the newest revision:", err=True)
    click.echo(revision)


@db.command()
@_options
def current(database_url: str | None, data_dir: Path) -> None:
    """Print the schema revision the database is at (``none`` when it has none)."""
    from server.persistence.migrate import current_revision

    revision = _run(_url(database_url, data_dir), current_revision)
    click.echo(revision or "none")
