"""Login throttling: per account and per client address, counted from the audit log.

The counts come from the audit log's failed ``auth.login`` rows
(:func:`server.audit.log.recent_failures`), so every server agrees. Checking the count,
verifying the password (argon2, about 0.1 s) and recording the outcome must not
interleave with another attempt on the same account or from the same address, or a
burst of parallel attempts would all pass the check before any failure is recorded: so
each server runs the attempts of one account, and those of one address, one at a time
(:func:`login_gate`). A burst spread over several servers gets at most one attempt in
flight per server beyond the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class _Gates:
    """One lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


_GATES = _Gates()


@contextlib.asynccontextmanager
async def login_gate(username: str, ip: str) -> AsyncIterator[None]:
    """Hold the account's gate, then the address's (always in that order: no deadlock)."""
    async with _GATES.hold(f"account:{username}"), _GATES.hold(f"ip:{ip}"):
        yield
