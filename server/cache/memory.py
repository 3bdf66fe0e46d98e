"""In-process cache and event bus."""

from __future__ import annotations

import asyncio
import fnmatch
import time
from typing import Any, Generic, TypeVar

from server.cache.base import dumps

T = TypeVar("T")
_CLOSED: Any = object()


class _MemorySubscription(Generic[T]):
    """A subscriber queue, registered when made; see :class:`server.cache.base.Subscription`."""

    def __init__(self, registry: dict[str, set[_MemorySubscription[Any]]], key: str, max_queue: int) -> None:
        self._registry = registry
        self._key = key
        self._queue: asyncio.Queue[Any] = asyncio.Queue(max_queue)
        self._closed = False
        registry.setdefault(key, set()).add(self)

    def _put(self, item: Any) -> None:
        if self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(item)

    def __aiter__(self) -> _MemorySubscription[T]:
        return self

    async def __anext__(self) -> T:
        if self._closed and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _CLOSED:
            raise StopAsyncIteration
        return item

    async def ready(self, timeout_s: float | None = None) -> None:
        """Already registered: returns at once."""

    async def aclose(self) -> None:
        """Unregister; a pending ``__anext__`` ends the iteration."""
        if self._closed:
            return
        self._closed = True
        subs = self._registry.get(self._key)
        if subs is not None:
            subs.discard(self)
            if not subs:
                self._registry.pop(self._key, None)
        self._put(_CLOSED)


class MemoryCache:
    """A dict with expiry, and per-channel subscriber queues (bounded; slow readers lose old events).

    One process only. Values are kept as the given objects (not copied or
    encoded); :meth:`get_raw` encodes on each call.
    """

    def __init__(self, max_queue: int = 1000) -> None:
        self._data: dict[str, tuple[float | None, dict[str, Any]]] = {}
        self._subs: dict[str, set[_MemorySubscription[Any]]] = {}
        self._psubs: dict[str, set[_MemorySubscription[Any]]] = {}
        self._max_queue = max_queue

    async def get(self, key: str) -> dict[str, Any] | None:
        """See :meth:`server.cache.base.Cache.get`."""
        item = self._data.get(key)
        if item is None:
            return None
        expires, value = item
        if expires is not None and expires < time.monotonic():
            self._data.pop(key, None)
            return None
        return value

    async def get_raw(self, key: str) -> bytes | None:
        """See :meth:`server.cache.base.Cache.get_raw`."""
        value = await self.get(key)
        return None if value is None else dumps(value)

    async def set(self, key: str, value: dict[str, Any], ttl_s: float | None = None) -> None:
        """See :meth:`server.cache.base.Cache.set`."""
        self._data[key] = (time.monotonic() + ttl_s if ttl_s else None, value)

    async def set_many(self, items: dict[str, dict[str, Any]], ttl_s: float | None = None) -> None:
        """See :meth:`server.cache.base.Cache.set_many`."""
        for key, value in items.items():
            await self.set(key, value, ttl_s)

    async def delete(self, key: str) -> None:
        """See :meth:`server.cache.base.Cache.delete`."""
        self._data.pop(key, None)

    async def publish(self, channel: str, event: dict[str, Any]) -> None:
        """See :meth:`server.cache.base.Cache.publish`."""
        for sub in list(self._subs.get(channel, ())):
            sub._put(event)
        for pattern, subs in list(self._psubs.items()):
            if fnmatch.fnmatchcase(channel, pattern):
                for sub in list(subs):
                    sub._put((channel, event))

    def subscribe(self, channel: str) -> _MemorySubscription[dict[str, Any]]:
        """See :meth:`server.cache.base.Cache.subscribe`; registered when called."""
        return _MemorySubscription(self._subs, channel, self._max_queue)

    def subscribe_pattern(self, pattern: str) -> _MemorySubscription[tuple[str, dict[str, Any]]]:
        """See :meth:`server.cache.base.Cache.subscribe_pattern` (``[!abc]`` negates, as in fnmatch)."""
        return _MemorySubscription(self._psubs, pattern, self._max_queue)

    async def ping(self) -> None:
        """Always answers."""

    async def close(self) -> None:
        """See :meth:`server.cache.base.Cache.close`."""
        self._data.clear()
        for registry in (self._subs, self._psubs):
            for subs in list(registry.values()):
                for sub in list(subs):
                    await sub.aclose()
