"""A cache wrapper under which a cache outage never fails the caller.

The cache is a copy of the database, so losing it costs speed, not correctness:
reads answer ``None`` (the caller falls back to the database), writes and
events are dropped (the reconciler rewrites stale entries once the cache is
back; live events sent meanwhile are lost).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from server.cache.base import Cache, CacheUnavailableError, Subscription

log = logging.getLogger(__name__)
R = TypeVar("R")
RecoverHook = Callable[[], "Awaitable[None] | None"]
_OUTAGE = (CacheUnavailableError, OSError)  # OSError covers ConnectionError and TimeoutError


class ResilientCache:
    """Wraps a :class:`server.cache.base.Cache` so that its failures never reach the caller.

    * ``get``/``get_raw`` answer ``None`` on a failure; ``set``, ``set_many``,
      ``delete`` and ``publish`` drop the write. Nothing raises but programming
      errors' effects: a value that is not JSON is logged and dropped too.
    * An outage (:class:`CacheUnavailableError`, ``OSError``, or a call running past
      ``call_timeout_s``) makes the cache *degraded*, logged once per outage. While
      degraded, calls skip the backend and answer at once, except one probe call
      every ``retry_interval_s``; a background task also pings the backend that
      often. The first success ends the outage (logged), and the ``on_recover``
      hooks run in a background task.
    * Other errors (a value that is not JSON, a Redis ``WRONGTYPE``) are logged on
      each call and do not make the cache degraded.
    * ``subscribe`` and ``subscribe_pattern`` are passed through: Redis
      subscriptions reconnect by themselves.

    Args:
        inner: the backend.
        name: how logs name the backend (a URL with its password redacted).
        retry_interval_s: seconds between attempts to reach a degraded backend.
        call_timeout_s: the longest one call may take before it counts as an
            outage (``None``: no limit beyond the backend's own socket timeouts).

    Attributes:
        inner: the wrapped backend.
        on_recover: hooks ``() -> None`` or ``async () -> None`` run, in order, each
            time the backend comes back after an outage; their errors are logged.
        outages: how many outages began since start.
    """

    def __init__(
        self,
        inner: Cache,
        *,
        name: str = "cache",
        retry_interval_s: float = 1.0,
        call_timeout_s: float | None = 2.0,
    ) -> None:
        self.inner = inner
        self.name = name
        self.retry_interval_s = retry_interval_s
        self.call_timeout_s = call_timeout_s
        self.on_recover: list[RecoverHook] = []
        self.outages = 0
        self._degraded_since: float | None = None
        self._next_try = 0.0
        self._probe: asyncio.Task[None] | None = None
        self._hooks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def degraded(self) -> bool:
        """True from the first failed call of an outage until a call or a ping succeeds."""
        return self._degraded_since is not None

    @property
    def degraded_since(self) -> float | None:
        """When the current outage began (Unix time, seconds), or ``None`` when not degraded."""
        return self._degraded_since

    # -- state ---------------------------------------------------------------

    def _skip(self) -> bool:
        """True when the backend is degraded and not due for a probe; else claims the probe slot."""
        if self._degraded_since is None:
            return False
        now = time.monotonic()
        if now < self._next_try:
            return True
        self._next_try = now + self.retry_interval_s  # one probe at a time
        return False

    def _failed(self, op: str, exc: BaseException) -> None:
        if self._degraded_since is not None:
            log.debug("cache %s still unavailable (%s): %s", self.name, op, exc)
            return
        self._degraded_since = time.time()
        self._next_try = time.monotonic() + self.retry_interval_s
        self.outages += 1
        log.warning(
            "cache %s unavailable (%s: %s); degraded mode: reads fall back to the database, "
            "cache writes and live events are dropped until it is back",
            self.name,
            op,
            exc,
        )
        if not self._closed:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            if self._probe is None or self._probe.done():
                self._probe = loop.create_task(self._probe_loop(), name="cache-probe")

    def _succeeded(self) -> None:
        if self._degraded_since is None:
            return
        down_s = time.time() - self._degraded_since
        self._degraded_since = None
        log.warning("cache %s is back after %.1f s; leaving degraded mode", self.name, down_s)
        if self.on_recover and not self._closed:
            task = asyncio.get_running_loop().create_task(self._run_hooks(), name="cache-on-recover")
            self._hooks.add(task)
            task.add_done_callback(self._hooks.discard)

    async def _run_hooks(self) -> None:
        for hook in list(self.on_recover):
            try:
                result = hook()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("cache on_recover hook %r failed", hook)

    async def _probe_loop(self) -> None:
        while self._degraded_since is not None and not self._closed:
            await asyncio.sleep(max(0.0, self._next_try - time.monotonic()))
            if self._skip():
                continue
            if self._degraded_since is None:
                return
            try:
                await self._timed(self.inner.ping())
            except Exception as exc:
                self._failed("background ping", exc)
            else:
                self._succeeded()

    async def _timed(self, aw: Awaitable[R]) -> R:
        if self.call_timeout_s is None:
            return await aw
        async with asyncio.timeout(self.call_timeout_s):
            return await aw

    async def _call(self, op: str, make: Callable[[], Awaitable[R]], default: R) -> R:
        if self._skip():
            return default
        try:
            result = await self._timed(make())
        except _OUTAGE as exc:
            self._failed(op, exc)
            return default
        except Exception as exc:
            log.warning("cache %s: %s failed: %r", self.name, op, exc)
            return default
        self._succeeded()
        return result

    # -- the Cache interface ---------------------------------------------------

    async def get(self, key: str) -> dict[str, Any] | None:
        """The value at ``key``; ``None`` when absent, expired, unreadable or the cache is unavailable."""
        return await self._call("get", lambda: self.inner.get(key), None)

    async def get_raw(self, key: str) -> bytes | None:
        """The stored JSON bytes of ``key``; ``None`` when absent, expired or the cache is unavailable."""
        return await self._call("get_raw", lambda: self.inner.get_raw(key), None)

    async def set(self, key: str, value: dict[str, Any], ttl_s: float | None = None) -> None:
        """Store ``value`` at ``key`` (expiring after ``ttl_s`` s if given); dropped when the cache fails."""
        await self._call("set", lambda: self.inner.set(key, value, ttl_s), None)

    async def set_many(self, items: dict[str, dict[str, Any]], ttl_s: float | None = None) -> None:
        """Store ``items`` in one round trip (expiring after ``ttl_s`` s); dropped when the cache fails."""
        if items:
            await self._call("set_many", lambda: self.inner.set_many(items, ttl_s), None)

    async def delete(self, key: str) -> None:
        """Remove ``key``; dropped when the cache fails (the entry may then outlive its source)."""
        await self._call("delete", lambda: self.inner.delete(key), None)

    async def publish(self, channel: str, event: dict[str, Any]) -> None:
        """Send ``event`` on ``channel``; dropped when the cache fails."""
        await self._call("publish", lambda: self.inner.publish(channel, event), None)

    def subscribe(self, channel: str) -> Subscription[dict[str, Any]]:
        """The backend's subscription (see :meth:`server.cache.base.Cache.subscribe`)."""
        return self.inner.subscribe(channel)

    def subscribe_pattern(self, pattern: str) -> Subscription[tuple[str, dict[str, Any]]]:
        """The backend's pattern subscription (see :meth:`server.cache.base.Cache.subscribe_pattern`)."""
        return self.inner.subscribe_pattern(pattern)

    async def ping(self) -> None:
        """Check the backend answers, updating :attr:`degraded`; while degraded, at most once per interval.

        Raises:
            CacheUnavailableError: it does not answer, or it is degraded and not yet
                due for another attempt (then at once, without contacting it).
        """
        if self._skip():
            raise CacheUnavailableError(f"cache {self.name} unavailable (degraded, next attempt pending)")
        try:
            await self._timed(self.inner.ping())
        except Exception as exc:
            if isinstance(exc, _OUTAGE):
                self._failed("ping", exc)
            if isinstance(exc, CacheUnavailableError):
                raise
            raise CacheUnavailableError(f"cache {self.name} unavailable (ping): {exc}") from exc
        self._succeeded()

    async def close(self) -> None:
        """Stop the probe and any running ``on_recover`` hooks, then close the backend (errors logged)."""
        self._closed = True
        tasks = [t for t in (self._probe, *self._hooks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self.inner.close()
        except Exception:
            log.warning("closing cache %s failed", self.name, exc_info=True)
