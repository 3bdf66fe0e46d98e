"""Status cache and live event bus behind one interface (``memory://`` embedded)."""

from server.cache.base import Cache, open_cache

__all__ = ["Cache", "open_cache"]
