"""Retry a transaction that lost its connection or a lock, instead of failing the request.

What is retried (:func:`is_retryable`):

* a dropped connection: SQLAlchemy flagged the error ``connection_invalidated``, or
  MySQL/MariaDB client/server codes 2006 (server has gone away), 2013 (lost
  connection during query), 2055, 1927 (connection killed), 4031 (disconnected
  for inactivity), 2003 (cannot connect: a server restarting);
* lock conflicts: 1213 (deadlock; InnoDB rolled the transaction back) and 1205
  (lock wait timeout; only the statement was rolled back, so the whole
  transaction is rolled back and run again); SQLite's ``database is locked``.

The transaction is run again from its start, on a fresh session and connection,
after a short exponential backoff with jitter (50 ms, 100 ms, ... by default).

What is never retried: an error after a ``COMMIT`` was sent. A connection lost
during ``COMMIT`` leaves the outcome unknown (the server may have committed), and
running a non-idempotent transaction again could, say, create a job twice; so the
error is raised, unless the caller declares the work ``idempotent``. Commits are
seen through an engine event installed by :func:`track_commits`, which
:class:`server.persistence.db.Database` does for its engine.

Pooled connections that died while idle never reach this code: the engine's
``pool_pre_ping`` replaces them at checkout.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from sqlalchemy import event
from sqlalchemy.exc import DBAPIError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

    from server.persistence.db import Database

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

DISCONNECT_CODES = frozenset({1927, 2003, 2006, 2013, 2055, 4031})
"""MySQL/MariaDB error codes meaning the connection is gone (or cannot be made yet)."""
LOCK_CODES = frozenset({1205, 1213})
"""MySQL/MariaDB error codes meaning a lock wait timed out (1205) or a deadlock was broken (1213)."""
RETRYABLE_CODES = DISCONNECT_CODES | LOCK_CODES
"""Every MySQL/MariaDB error code :func:`is_retryable` accepts."""
DEFAULT_ATTEMPTS = 3
"""Tries in all (the first one included)."""
DEFAULT_BACKOFF_S = 0.05
"""Delay before the first retry, in seconds; doubled for each further retry (plus up to 50 % jitter)."""

_commits: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("rf_commits", default=None)


def track_commits(engine: AsyncEngine) -> None:
    """Let the retry helpers see COMMITs sent on ``engine`` (idempotent per engine).

    Needed for engines not made by :class:`server.persistence.db.Database`, which calls it.
    """
    sync = engine.sync_engine
    if not event.contains(sync, "commit", _on_commit):
        event.listen(sync, "commit", _on_commit)


def _on_commit(_conn: Any) -> None:
    # runs in SQLAlchemy's greenlet, which shares the calling task's context
    cell = _commits.get()
    if cell is not None:
        cell[0] += 1


def mysql_error_code(exc: BaseException) -> int | None:
    """The MySQL/MariaDB error code of a (wrapped) driver error, or None."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int):
        return args[0]
    return None


def is_retryable(exc: BaseException) -> bool:
    """Whether running the transaction again may succeed: a lost connection or a lock conflict.

    Args:
        exc: any exception; only ``sqlalchemy.exc.DBAPIError`` (``OperationalError``,
            ``InterfaceError``, ...) can be retryable.
    """
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    if mysql_error_code(exc) in RETRYABLE_CODES:
        return True
    return "database is locked" in str(exc.orig)  # SQLite, after busy_timeout


async def _sleep_before(attempt: int, backoff_s: float) -> None:
    delay = backoff_s * (2 ** (attempt - 1))
    await asyncio.sleep(delay * (1 + random.random() / 2))  # noqa: S311 (jitter, not crypto)


def _describe(exc: BaseException) -> str:
    # never the statement or its parameters: they may hold user data
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    code = mysql_error_code(exc)
    return f"{type(orig).__name__}{f' {code}' if code is not None else ''}"


async def _retrying(
    call: Callable[[], Awaitable[T]], *, attempts: int, backoff_s: float, idempotent: bool, what: str
) -> T:
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, not {attempts}")
    attempt = 1
    while True:
        cell = [0]
        token = _commits.set(cell)
        try:
            return await call()
        except DBAPIError as exc:
            if not is_retryable(exc) or attempt >= attempts:
                raise
            if cell[0] and not idempotent:
                log.warning(
                    "%s: %s after COMMIT was sent; outcome unknown, not retried", what, _describe(exc)
                )
                raise
            log.warning("%s: %s, retrying (%d/%d)", what, _describe(exc), attempt + 1, attempts)
        finally:
            _commits.reset(token)
        await _sleep_before(attempt, backoff_s)
        attempt += 1


async def run_in_tx(
    db: Database,
    fn: Callable[[AsyncSession], Awaitable[T]],
    *,
    attempts: int = DEFAULT_ATTEMPTS,
    backoff_s: float = DEFAULT_BACKOFF_S,
    idempotent: bool = False,
) -> T:
    """Run ``fn(session)`` in one transaction and commit it; run it again on a lost connection or lock.

    ``fn`` must do its database work through the session it is given and must not commit;
    it may run more than once, so it should have no side effects outside the database
    before it returns (do those after ``run_in_tx`` returns).

    Args:
        db: the database.
        fn: ``async (session) -> result``.
        attempts: tries in all.
        backoff_s: delay before the first retry, in seconds (doubled each time, plus jitter).
        idempotent: retry even when the connection was lost during COMMIT (the first
            try may have been committed).

    Returns:
        What ``fn`` returned on the try that committed.

    Raises:
        sqlalchemy.exc.DBAPIError: not retryable, tries exhausted, or lost during COMMIT
            (unless ``idempotent``).
        Whatever ``fn`` raises otherwise (the transaction is rolled back, not retried).
    """

    async def once() -> T:
        async with db.session() as session:
            result = await fn(session)
            await session.commit()
            return result

    name = getattr(fn, "__qualname__", "transaction")
    return await _retrying(once, attempts=attempts, backoff_s=backoff_s, idempotent=idempotent, what=name)


@overload
def retry_on_disconnect(fn: Callable[P, Awaitable[T]], /) -> Callable[P, Awaitable[T]]: ...
@overload
def retry_on_disconnect(
    *, attempts: int = ..., backoff_s: float = ..., idempotent: bool = ...
) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]: ...
def retry_on_disconnect(
    fn: Callable[P, Awaitable[T]] | None = None,
    /,
    *,
    attempts: int = DEFAULT_ATTEMPTS,
    backoff_s: float = DEFAULT_BACKOFF_S,
    idempotent: bool = False,
) -> Any:
    """Decorate an async function that runs one transaction so that it is called again on
    a lost connection or lock conflict (``@retry_on_disconnect`` or
    ``@retry_on_disconnect(attempts=5)``).

    The whole function runs again, so everything it does before its COMMIT must be
    safe to repeat (database work in the rolled-back transaction is; moving files
    or publishing messages may not be). Once a COMMIT has been sent on a tracked
    engine during a call, a later error is raised, never retried (unless
    ``idempotent``): a function that commits and then reads again (to publish a
    status, say) is not rerun, so its transaction is never applied twice.

    Args and errors as :func:`run_in_tx`.
    """

    def wrap(f: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(f)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            return await _retrying(
                lambda: f(*args, **kwargs),
                attempts=attempts,
                backoff_s=backoff_s,
                idempotent=idempotent,
                what=f.__qualname__,
            )

        return wrapper

    return wrap(fn) if fn is not None else wrap
