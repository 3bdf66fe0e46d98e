"""Status cache and live event bus behind one interface (``memory://`` embedded, ``redis://`` production)."""

from server.cache.base import Cache, CacheUnavailableError, Subscription, open_cache, redact_url
from server.cache.resilient import ResilientCache

__all__ = ["Cache", "CacheUnavailableError", "ResilientCache", "Subscription", "open_cache", "redact_url"]
