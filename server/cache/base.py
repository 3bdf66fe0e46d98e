"""The cache interface: JSON values by key, and pub/sub of JSON events by channel.

The database is the source of truth: writers commit first, then update the
cache; readers fall back to the database on a miss (``None``).

Backends, chosen by URL with :func:`open_cache`:

* ``memory://``: in-process (:class:`server.cache.memory.MemoryCache`), one process only;
* ``redis://[[user]:password@]host[:6379][/db]``, ``rediss://...`` (TLS) and
  ``unix://[[user]:password@]/path/to/redis.sock[?db=N]``: Redis
  (:class:`server.cache.redis.RedisCache`), shared by every server process.

Either way :func:`open_cache` returns a :class:`server.cache.resilient.ResilientCache`
around the backend, so a cache outage never fails a caller: reads answer ``None``,
writes and events are dropped, and ``cache.degraded`` says so.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

if TYPE_CHECKING:
    from server.cache.resilient import ResilientCache

T_co = TypeVar("T_co", covariant=True)

_SECRET_PARAMS = ("password", "pass", "secret", "token", "key")


class CacheUnavailableError(ConnectionError):
    """The cache backend cannot be reached: connection refused, reset or timed out, or login refused.

    The message names the backend by its URL with the password redacted.
    """


class Subscription(Protocol[T_co]):
    """A live subscription: an async iterator of events, plus a readiness wait and ``aclose``.

    Iterating never ends on its own and never raises a backend error: it ends
    (``StopAsyncIteration``) only after :meth:`aclose` or the cache's ``close``.
    """

    def __aiter__(self) -> AsyncIterator[T_co]:
        """The subscription itself."""
        ...

    async def __anext__(self) -> T_co:
        """The next event, waiting as long as it takes."""
        ...

    async def ready(self, timeout_s: float | None = None) -> None:
        """Wait until the backend has registered the subscription.

        Every event published after this returns is delivered (until the
        connection drops; see the backend). Iterating without calling it is fine:
        the subscription then starts at the first ``__anext__``.

        Raises:
            TimeoutError: not registered within ``timeout_s`` seconds (backend down).
        """
        ...

    async def aclose(self) -> None:
        """Unsubscribe and release the connection; pending and later ``__anext__`` calls end the iteration."""
        ...


class Cache(Protocol):
    """Fast status reads and live events. Keys and channels are ``str``; values and events JSON objects."""

    async def get(self, key: str) -> dict[str, Any] | None:
        """The JSON value stored at ``key``, or ``None`` when absent or expired."""
        ...

    async def get_raw(self, key: str) -> bytes | None:
        """The stored value of ``key`` as UTF-8 JSON bytes, not decoded (for serving as is), or ``None``."""
        ...

    async def set(self, key: str, value: dict[str, Any], ttl_s: float | None = None) -> None:
        """Store ``value`` at ``key``, expiring after ``ttl_s`` seconds if given (``None`` or 0: never).

        Raises:
            TypeError: ``value`` is not JSON-serializable.
            ValueError: ``ttl_s`` is negative.
        """
        ...

    async def set_many(self, items: dict[str, dict[str, Any]], ttl_s: float | None = None) -> None:
        """Store every ``key: value`` of ``items`` in one round trip, each expiring after ``ttl_s`` seconds.

        Not atomic: on a failure some keys may be written. Errors as :meth:`set`.
        """
        ...

    async def delete(self, key: str) -> None:
        """Remove ``key`` (no error when absent)."""
        ...

    async def publish(self, channel: str, event: dict[str, Any]) -> None:
        """Send ``event`` to the current subscribers of ``channel`` (dropped when there are none)."""
        ...

    def subscribe(self, channel: str) -> Subscription[dict[str, Any]]:
        """Events published on ``channel`` from now on (see :class:`Subscription`)."""
        ...

    def subscribe_pattern(self, pattern: str) -> Subscription[tuple[str, dict[str, Any]]]:
        """``(channel, event)`` for every channel matching the glob ``pattern`` (``"job:*"``) from now on.

        Glob syntax as Redis ``PSUBSCRIBE``: ``*``, ``?``, ``[abc]``.
        """
        ...

    async def ping(self) -> None:
        """Check the backend answers.

        Raises:
            CacheUnavailableError: it does not (naming the URL, password redacted).
        """
        ...

    async def close(self) -> None:
        """End every subscription and release connections."""
        ...


def dumps(value: Any) -> bytes:
    """The compact UTF-8 JSON encoding every backend stores and publishes.

    Raises:
        TypeError: ``value`` is not JSON-serializable.
        ValueError: ``value`` holds NaN or infinity, or a circular reference.
    """
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def ttl_ms(ttl_s: float | None) -> int | None:
    """``ttl_s`` seconds as whole milliseconds (at least 1), or ``None`` for no expiry (``None`` or 0).

    Raises:
        ValueError: ``ttl_s`` is negative.
    """
    if not ttl_s:
        return None
    if ttl_s < 0:
        raise ValueError(f"ttl_s must be positive, not {ttl_s!r}")
    return max(1, round(ttl_s * 1000))


def redact_url(url: str) -> str:
    """``url`` with its password (and any password-like query value) replaced by ``***``.

    A user part without a colon (``redis://secret@host``) is redacted whole, since
    it is often a password written in the wrong place.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if not netloc and "@" in url:  # no "//": userinfo not recognised, so hide all before the "@"
        host = url.rsplit("@", 1)[1]
        return f"{parts.scheme}:***@{host}" if parts.scheme else f"***@{host}"
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, sep, _ = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if sep else f"***@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(any(s in k.lower() for s in _SECRET_PARAMS) for k, _ in pairs):
            query = urlencode(
                [(k, "***" if any(s in k.lower() for s in _SECRET_PARAMS) else v) for k, v in pairs],
                quote_via=quote,
                safe="*",
            )
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def open_cache(url: str) -> ResilientCache:
    """Return the cache for ``url``: ``memory://``, ``redis://``, ``rediss://`` or ``unix://``.

    The backend is wrapped in a :class:`server.cache.resilient.ResilientCache` (the
    memory cache too, so that every caller sees the same ``degraded`` and
    ``on_recover`` attributes). Nothing is connected yet: Redis is first reached by
    the first call. Redis URLs take redis-py's query options, e.g.
    ``?socket_timeout=0.5&socket_connect_timeout=0.5&max_connections=100``.

    Raises:
        ValueError: naming the URL (password redacted) when its scheme is not
            supported or it is malformed (no host, bad port or database, unknown option).
    """
    from server.cache.resilient import ResilientCache

    scheme = urlsplit(url).scheme if "://" in url else ""
    if scheme == "memory":
        from server.cache.memory import MemoryCache

        return ResilientCache(MemoryCache(), name="memory://", call_timeout_s=None)
    if scheme in ("redis", "rediss", "unix"):
        from server.cache.redis import RedisCache

        return ResilientCache(RedisCache(url), name=redact_url(url))
    raise ValueError(
        f"unsupported cache URL {redact_url(url)!r}: expected memory://, redis://, rediss:// or unix://"
    )
