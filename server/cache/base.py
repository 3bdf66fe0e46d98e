"""The cache interface: JSON values by key, and pub/sub of JSON events by channel.

The database is the source of truth: writers commit first, then update the
cache; readers fall back to the database on a miss.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol
from urllib.parse import urlsplit


class Cache(Protocol):
    """Fast status reads and live events."""

    async def get(self, key: str) -> dict[str, Any] | None:
        """The JSON value stored at ``key``, or ``None``."""

    async def set(self, key: str, value: dict[str, Any], ttl_s: float | None = None) -> None:
        """Store ``value`` at ``key`` (expiring after ``ttl_s`` seconds if given)."""

    async def delete(self, key: str) -> None:
        """Remove ``key``."""

    async def publish(self, channel: str, event: dict[str, Any]) -> None:
        """Send ``event`` to the current subscribers of ``channel``."""

    def subscribe(self, channel: str) -> AsyncIterator[dict[str, Any]]:
        """Yield events published on ``channel`` from now on."""

    async def close(self) -> None:
        """Release connections."""


def open_cache(url: str) -> Cache:
    """Return the cache for ``url``.

    Raises:
        ValueError: naming the URL when its scheme is not supported.
    """
    if urlsplit(url).scheme == "memory":
        from server.cache.memory import MemoryCache

        return MemoryCache()
    raise ValueError(f"unsupported cache URL {url!r}: expected memory://")
