"""Remember whether the storage backend is failing, for ``/healthz`` and the metrics.

Storage is checked at start; afterwards the farm only learns of an outage when a
write or read fails. :class:`TrackedStorage` wraps the backend and records the last
failure (:class:`~server.storage.base.StorageUnavailableError`) and the last success,
so that ``/healthz`` can say ``degraded`` while uploads of frames and models fail.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from server.storage.base import StorageUnavailableError

T = TypeVar("T")


class TrackedStorage:
    """Delegates everything to ``inner``; ``degraded`` is true after a failed call until one succeeds."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.failed_at: float | None = None
        """Unix time of the last failure not followed by a success, or None."""
        self.last_error = ""
        self.recheck_s = 10.0
        """``/healthz`` checks a degraded store again at most this often, in seconds."""

    @property
    def degraded(self) -> bool:
        """Whether the last storage call failed because the backend was unavailable."""
        return self.failed_at is not None

    async def _track(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            result = await call()
        except StorageUnavailableError as exc:
            self.failed_at, self.last_error = time.time(), str(exc)
            raise
        self.failed_at = None
        return result

    async def put_file(self, key: str, src: Path) -> int:
        """See :meth:`server.storage.base.Storage.put_file`."""
        return await self._track(lambda: self.inner.put_file(key, src))

    async def exists(self, key: str) -> bool:
        """See :meth:`server.storage.base.Storage.exists`."""
        return await self._track(lambda: self.inner.exists(key))

    async def check(self) -> None:
        """See :meth:`server.storage.base.Storage.check`."""
        await self._track(self.inner.check)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
