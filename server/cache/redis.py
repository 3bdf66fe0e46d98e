"""Redis status cache and event bus (redis-py asyncio).

Values are stored as compact UTF-8 JSON strings (``SET key json PX ttl``) and
events are published as JSON on Redis pub/sub channels. Commands are not
retried and use short socket timeouts (0.5 s by default), so an unreachable
Redis fails a call quickly with :class:`CacheUnavailableError`; wrap the cache in
:class:`server.cache.resilient.ResilientCache` (as ``open_cache`` does) to turn
failures into misses.

Each subscription holds its own pub/sub connection and survives Redis restarts:
when the connection drops it reconnects and resubscribes (retrying every
``resubscribe_interval_s`` at most), without ending the iteration or raising into
the caller. **Events published while it is disconnected are lost** (Redis pub/sub
keeps nothing); a consumer that must not miss a state change rereads the state
after a reconnect (``subscription.reconnects`` counts them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import weakref
from collections.abc import Iterator
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.cache.base import CacheUnavailableError, dumps, redact_url, ttl_ms

log = logging.getLogger(__name__)
T = TypeVar("T")
_CLOSED: Any = object()
_OUTAGE = (RedisConnectionError, RedisTimeoutError, OSError)
_URL_OPTIONS = frozenset(URL_QUERY_ARGUMENT_PARSERS) | {"username", "password", "client_name"}


def _check_url(url: str) -> None:
    """Raise ValueError (URL redacted) unless redis-py can use ``url`` as it is meant."""
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("expected redis://, rediss:// or unix://")
        if parts.scheme == "unix":
            if not parts.path:
                raise ValueError("no socket path")
        else:
            if not parts.hostname:
                raise ValueError("no host")
            _ = parts.port  # raises on a bad port
            db = unquote(parts.path).strip("/")
            if db and not db.isdigit():
                raise ValueError(f"database must be a number, not {db!r}")
        unknown = sorted({k for k, _ in parse_qsl(parts.query, keep_blank_values=True)} - _URL_OPTIONS)
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)}")
        parse_url(url)  # redis-py's own checks of option values
    except ValueError as exc:
        raise ValueError(f"bad cache URL {shown!r}: {exc}") from None


class RedisCache:
    """A :class:`server.cache.base.Cache` on Redis.

    Args:
        url: ``redis://[[user]:password@]host[:port][/db][?option=value...]``, ``rediss://...``
            or ``unix://[[user]:password@]/path.sock[?db=N]``; options are redis-py's
            (``socket_timeout``, ``socket_connect_timeout``, ``max_connections``, ...)
            and override the arguments below.
        socket_timeout_s: seconds a command may wait for its reply.
        connect_timeout_s: seconds a connection may take to open.
        resubscribe_interval_s: the longest wait between a subscription's reconnection attempts.
        ping_interval_s: a subscription that received nothing for this long sends a PING,
            and reconnects when no reply came within ``ping_interval_s`` more seconds
            (detects connections silently dropped by the network).
        max_queue: events buffered per subscription; a slow reader loses the oldest.
        max_connections: connections for commands; beyond them a command waits for a free
            one (a busy server is not an outage). Subscriptions hold connections of their own.

    Raises:
        ValueError: the URL is malformed (named with its password redacted).
    """

    def __init__(
        self,
        url: str,
        *,
        socket_timeout_s: float = 0.5,
        connect_timeout_s: float = 0.5,
        resubscribe_interval_s: float = 1.0,
        ping_interval_s: float = 10.0,
        max_queue: int = 1000,
        max_connections: int = 128,
    ) -> None:
        _check_url(url)
        self.url = redact_url(url)
        """The URL with its password redacted (for messages)."""
        self.resubscribe_interval_s = resubscribe_interval_s
        self.ping_interval_s = ping_interval_s
        self.max_queue = max_queue
        options: dict[str, Any] = {
            "socket_timeout": socket_timeout_s,
            "socket_connect_timeout": connect_timeout_s,
            "retry": Retry(NoBackoff(), 0),
            "decode_responses": False,
        }
        # redis-py's default pool raises MaxConnectionsError (a ConnectionError) when all its
        # connections are busy, which would turn a burst of requests into a cache outage.
        self._client = aioredis.Redis.from_pool(
            aioredis.BlockingConnectionPool.from_url(
                url, max_connections=max_connections, timeout=None, **options
            )
        )
        self._pubsub_client = aioredis.from_url(url, max_connections=1 << 20, **options)
        self._subs: weakref.WeakSet[_RedisSubscription[Any]] = weakref.WeakSet()
        self._closed = False

    @contextlib.contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        """Turn connection failures and timeouts into :class:`CacheUnavailableError`."""
        if self._closed:
            raise CacheUnavailableError(f"cache {self.url} is closed")
        try:
            yield
        except _OUTAGE as exc:
            raise CacheUnavailableError(f"cache {self.url} unavailable ({what}): {exc}") from exc

    async def get(self, key: str) -> dict[str, Any] | None:
        """See :meth:`server.cache.base.Cache.get`.

        Raises:
            CacheUnavailableError: Redis cannot be reached.
            ValueError: the stored value is not JSON.
        """
        raw = await self.get_raw(key)
        return None if raw is None else json.loads(raw)

    async def get_raw(self, key: str) -> bytes | None:
        """See :meth:`server.cache.base.Cache.get_raw`.

        Raises:
            CacheUnavailableError: Redis cannot be reached.
        """
        with self._translate("GET"):
            return await self._client.get(key)

    async def set(self, key: str, value: dict[str, Any], ttl_s: float | None = None) -> None:
        """See :meth:`server.cache.base.Cache.set`.

        Raises:
            CacheUnavailableError: Redis cannot be reached.
            TypeError, ValueError: as :meth:`server.cache.base.Cache.set`.
        """
        data, px = dumps(value), ttl_ms(ttl_s)
        with self._translate("SET"):
            await self._client.set(key, data, px=px)

    async def set_many(self, items: dict[str, dict[str, Any]], ttl_s: float | None = None) -> None:
        """See :meth:`server.cache.base.Cache.set_many` (one non-transactional pipeline).

        Raises:
            CacheUnavailableError: Redis cannot be reached.
            TypeError, ValueError: as :meth:`server.cache.base.Cache.set` (nothing sent then).
        """
        if not items:
            return
        px = ttl_ms(ttl_s)
        encoded = [(key, dumps(value)) for key, value in items.items()]
        with self._translate("SET pipeline"):
            async with self._client.pipeline(transaction=False) as pipe:
                for key, data in encoded:
                    pipe.set(key, data, px=px)
                await pipe.execute()

    async def delete(self, key: str) -> None:
        """See :meth:`server.cache.base.Cache.delete`.

        Raises:
            CacheUnavailableError: Redis cannot be reached.
        """
        with self._translate("DEL"):
            await self._client.delete(key)

    async def publish(self, channel: str, event: dict[str, Any]) -> None:
        """See :meth:`server.cache.base.Cache.publish`.

        Raises:
            CacheUnavailableError: Redis cannot be reached.
            TypeError, ValueError: ``event`` is not JSON-serializable.
        """
        data = dumps(event)
        with self._translate("PUBLISH"):
            await self._client.publish(channel, data)

    def subscribe(self, channel: str) -> _RedisSubscription[dict[str, Any]]:
        """See :meth:`server.cache.base.Cache.subscribe` and the module docstring (reconnection, lost events).

        The subscription is registered in the background from the first
        ``__anext__`` or :meth:`_RedisSubscription.ready`; await ``ready()`` before
        reading the current state to miss nothing in between.
        """
        return self._subscription(channel, pattern=False)

    def subscribe_pattern(self, pattern: str) -> _RedisSubscription[tuple[str, dict[str, Any]]]:
        """See :meth:`server.cache.base.Cache.subscribe_pattern` (``PSUBSCRIBE``); as :meth:`subscribe`."""
        return self._subscription(pattern, pattern=True)

    def _subscription(self, target: str, pattern: bool) -> _RedisSubscription[Any]:
        sub: _RedisSubscription[Any] = _RedisSubscription(self, target, pattern)
        if self._closed:
            sub._closed = True
        else:
            self._subs.add(sub)
        return sub

    async def ping(self) -> None:
        """See :meth:`server.cache.base.Cache.ping`.

        Raises:
            CacheUnavailableError: Redis cannot be reached.
        """
        with self._translate("PING"):
            await self._client.ping()

    async def close(self) -> None:
        """End every subscription and close the connection pool; later calls raise CacheUnavailableError."""
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subs):
            await sub.aclose()
        with contextlib.suppress(Exception):
            await self._client.aclose()
        with contextlib.suppress(Exception):
            await self._pubsub_client.aclose()


CLOSE_TIMEOUT_S = 5.0
"""Seconds closing a subscription waits for its reader to end."""


class _RedisSubscription(Generic[T]):
    """One channel or pattern subscription on its own connection; see :class:`server.cache.base.Subscription`.

    Attributes:
        reconnects: how many times the connection dropped after being subscribed
            (each time, events published until the resubscription were lost).
        dropped: events discarded because the reader was more than ``max_queue`` behind.
    """

    def __init__(self, cache: RedisCache, target: str, pattern: bool) -> None:
        self._cache = cache
        self._target = target
        self._pattern = pattern
        self._queue: asyncio.Queue[Any] = asyncio.Queue(cache.max_queue)
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.reconnects = 0
        self.dropped = 0

    def _start(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"redis-subscription:{self._target}"
            )

    def _put(self, item: Any) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(item)

    def __aiter__(self) -> _RedisSubscription[T]:
        return self

    async def __anext__(self) -> T:
        if self._closed and self._queue.empty():
            raise StopAsyncIteration
        self._start()
        item = await self._queue.get()
        if item is _CLOSED:
            raise StopAsyncIteration
        return item

    async def ready(self, timeout_s: float | None = None) -> None:
        """See :meth:`server.cache.base.Subscription.ready`.

        Raises:
            TimeoutError: not subscribed within ``timeout_s`` seconds (Redis down).
            RuntimeError: the subscription is closed.
        """
        if self._closed:
            raise RuntimeError(f"subscription to {self._target!r} is closed")
        self._start()
        async with asyncio.timeout(timeout_s):
            await self._subscribed.wait()

    async def aclose(self) -> None:
        """See :meth:`server.cache.base.Subscription.aclose`."""
        if self._closed:
            return
        self._closed = True
        self._subscribed.clear()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # bounded: redis-py's pubsub close can wait on a connection that no longer answers,
            # and a subscription's end must not hold a server's (or a test's) shutdown for ever
            done, _ = await asyncio.wait({task}, timeout=CLOSE_TIMEOUT_S)
            if not done:
                log.warning(
                    "subscription to %r did not end within %g s; left behind", self._target, CLOSE_TIMEOUT_S
                )
            else:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    task.result()
        self._put(_CLOSED)

    def _deliver(self, msg: dict[str, Any]) -> None:
        try:
            event = json.loads(msg["data"])
        except (ValueError, TypeError):
            log.debug("non-JSON message on %r ignored", msg.get("channel"))
            return
        if not isinstance(event, dict):
            log.debug("non-object JSON message on %r ignored", msg.get("channel"))
            return
        if self._pattern:
            channel = msg["channel"]
            self._put((channel.decode() if isinstance(channel, bytes) else channel, event))
        else:
            self._put(event)

    async def _run(self) -> None:
        """Subscribe, read, and on any connection failure resubscribe; ends only when cancelled."""
        cache = self._cache
        delay = 0.05
        while not self._closed:
            pubsub = cache._pubsub_client.pubsub()
            was_subscribed = False
            try:
                if self._pattern:
                    await pubsub.psubscribe(self._target)
                else:
                    await pubsub.subscribe(self._target)
                last_rx = time.monotonic()
                ping_sent: float | None = None
                # Checked on every pass, not only through cancellation: on Python 3.11 a cancel
                # that lands as get_message's own timeout expires comes out as a TimeoutError,
                # which redis-py treats as "no message", so the task would read on for ever.
                while not self._closed:
                    msg = await pubsub.get_message(timeout=1.0)
                    now = time.monotonic()
                    if msg is not None:
                        last_rx, ping_sent = now, None
                        kind = msg["type"]
                        if kind in (b"subscribe", "subscribe", b"psubscribe", "psubscribe"):
                            was_subscribed = True
                            delay = 0.05
                            self._subscribed.set()
                        elif kind in ("message", "pmessage", b"message", b"pmessage"):
                            self._deliver(msg)
                    elif ping_sent is not None and now - ping_sent > cache.ping_interval_s:
                        raise CacheUnavailableError(f"cache {cache.url}: no reply to PING")
                    elif ping_sent is None and now - last_rx > cache.ping_interval_s:
                        await pubsub.ping()
                        ping_sent = now
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: start over on a fresh connection
                self._subscribed.clear()
                log.debug("subscription to %r on %s lost (%s); resubscribing", self._target, cache.url, exc)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            if self._closed:
                return
            if was_subscribed:
                self.reconnects += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, cache.resubscribe_interval_s)
