"""A per-process cache of resolved principals, invalidated at once across servers.

Resolving a bearer token costs two or three database queries (the token or the user,
the memberships). The result is kept here for at most :data:`TTL_S` seconds, tagged
with the farm's *access epoch*: a value in the shared cache (Redis across servers) at
``auth:epoch:<database>`` that every change of access replaces (a token revoked, a
user disabled or given a new password, a role granted or removed: see
:mod:`server.auth.service`). A request uses a cached principal only if it was resolved
under the current epoch, which each process reads at most once a second
(:data:`EPOCH_READ_S`); so a revocation takes effect at once on the server that made it
and within a second on every other server.

When the shared cache is unreachable, nothing is served from here (every request goes
to the database); when it comes back, the local entries are dropped and a new epoch is
set, so that a change whose epoch write was lost in the outage still counts.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections import OrderedDict
from typing import Any

from server.auth.principal import Principal

log = logging.getLogger(__name__)

TTL_S = 30.0
"""Longest a resolved principal is reused, in seconds."""
EPOCH_READ_S = 1.0
"""How long a process reuses the access epoch it read, in seconds: a revocation on another
server counts here within this time (on the server that made it, at once)."""
MAX_ENTRIES = 10_000
"""Principals kept per process (least recently used dropped first)."""


class AccessCache:
    """Principals by token hash, valid under one access epoch.

    Args:
        cache: the farm's cache (:class:`server.cache.resilient.ResilientCache`).
        database_url: names the farm (farms sharing a Redis keep separate epochs).
    """

    def __init__(self, cache: Any, database_url: str) -> None:
        self.cache = cache
        self.key = "auth:epoch:" + hashlib.sha256(database_url.encode()).hexdigest()[:16]
        self._entries: OrderedDict[str, tuple[Principal, bytes, float]] = OrderedDict()
        self._epoch: bytes | None = None
        self._epoch_until = 0.0
        hooks = getattr(cache, "on_recover", None)
        if isinstance(hooks, list):
            hooks.append(self._recovered)

    async def epoch(self) -> bytes | None:
        """The current access epoch, or None when the shared cache cannot say (then do not cache).

        Read from the shared cache at most every :data:`EPOCH_READ_S` seconds; a change made
        by this process is seen at once (:meth:`bump` resets it), one made by another server
        within that time.
        """
        now = time.monotonic()
        if self._epoch is not None and now < self._epoch_until:
            return self._epoch
        raw = await self.cache.get_raw(self.key)
        if raw is None and not getattr(self.cache, "degraded", False):
            await self.bump()  # a new cache (or the key evicted): start an epoch
            raw = await self.cache.get_raw(self.key)
        if raw is not None and raw != self._epoch:
            self._entries.clear()
        self._epoch, self._epoch_until = raw, now + EPOCH_READ_S
        return raw

    def get(self, token_key: str, epoch: bytes | None) -> Principal | None:
        """The principal cached for ``token_key`` under ``epoch``, if still fresh."""
        if epoch is None:
            return None
        hit = self._entries.get(token_key)
        if hit is None:
            return None
        principal, at_epoch, expires = hit
        if at_epoch != epoch or time.monotonic() > expires:
            self._entries.pop(token_key, None)
            return None
        self._entries.move_to_end(token_key)
        return principal

    def put(self, token_key: str, epoch: bytes | None, principal: Principal, ttl_s: float = TTL_S) -> None:
        """Keep ``principal`` for ``token_key``, resolved under ``epoch`` (read before resolving),
        for ``ttl_s`` seconds at most (:data:`TTL_S`; less for a token about to expire)."""
        if epoch is None or ttl_s <= 0:
            return
        self._entries[token_key] = (principal, epoch, time.monotonic() + min(ttl_s, TTL_S))
        self._entries.move_to_end(token_key)
        while len(self._entries) > MAX_ENTRIES:
            self._entries.popitem(last=False)

    async def bump(self) -> None:
        """Start a new epoch: every server's cached principals stop counting. Never raises."""
        self._entries.clear()
        self._epoch = None
        await self.cache.set(self.key, {"epoch": uuid.uuid4().hex})

    async def _recovered(self) -> None:
        self._entries.clear()
        await self.bump()


def access_cache(ctx: Any) -> AccessCache:
    """The farm's access cache (made on first use and kept on the context)."""
    ac = getattr(ctx, "_access_cache", None)
    if ac is None:
        ac = AccessCache(ctx.cache, ctx.settings.database_url)
        ctx._access_cache = ac
    return ac
