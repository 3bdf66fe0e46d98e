"""In-process cache and event bus."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any


class MemoryCache:
    """A dict with expiry, and per-channel subscriber queues (bounded; slow readers lose old events)."""

    def __init__(self, max_queue: int = 1000) -> None:
        self._data: dict[str, tuple[float | None, dict[str, Any]]] = {}
        self._subs: dict[str, set[asyncio.Queue[dict[str, Any]]]] = {}
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

    async def set(self, key: str, value: dict[str, Any], ttl_s: float | None = None) -> None:
        """See :meth:`server.cache.base.Cache.set`."""
        self._data[key] = (time.monotonic() + ttl_s if ttl_s else None, value)

    async def delete(self, key: str) -> None:
        """See :meth:`server.cache.base.Cache.delete`."""
        self._data.pop(key, None)

    async def publish(self, channel: str, event: dict[str, Any]) -> None:
        """See :meth:`server.cache.base.Cache.publish`."""
        for q in list(self._subs.get(channel, ())):
            if q.full():
                q.get_nowait()
            q.put_nowait(event)

    async def subscribe(self, channel: str) -> AsyncIterator[dict[str, Any]]:
        """See :meth:`server.cache.base.Cache.subscribe`."""
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(self._max_queue)
        self._subs.setdefault(channel, set()).add(q)
        try:
            while True:
                yield await q.get()
        finally:
            self._subs.get(channel, set()).discard(q)

    async def close(self) -> None:
        """See :meth:`server.cache.base.Cache.close`."""
        self._data.clear()
