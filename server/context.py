"""The farm's shared objects, built once at start-up and handed to every component."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from node_agent.executor.base import Executor
from node_agent.executor.local import LocalExecutor
from server.broker import Broker, open_broker
from server.cache import Cache, open_cache
from server.config import Settings
from server.persistence import Database
from server.storage import Storage, open_storage
from server.storage.tracked import TrackedStorage

WAKE_CHANNEL = "scheduler:wake"
"""Cache channel on which server processes wake the one that schedules."""


@dataclass
class FarmContext:
    """Settings plus one instance of each backend, and the Blender executor used to inspect models.

    ``outbox_ready`` is set whenever rows are added to the outbox, so the relay
    publishes them at once instead of at its next poll; ``dispatch_ready`` whenever
    tasks become dispatchable or a slot of the dispatch window frees up.
    """

    settings: Settings
    db: Database
    broker: Broker
    cache: Cache
    storage: Storage
    executor: Executor
    lock_fd: int = -1
    inspect_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2))
    outbox_ready: asyncio.Event = field(default_factory=asyncio.Event)
    dispatch_ready: asyncio.Event = field(default_factory=asyncio.Event)
    status: Any = None
    """The :class:`server.jobs.status.StatusPublisher` (made on first use by the service)."""
    metrics: Any = None
    """The :class:`server.metrics.FarmMetrics` of the app serving this farm, if any."""

    leading: bool = False
    """Whether this process runs the scheduler now (see :mod:`server.scheduler.leader`)."""

    async def wake_dispatcher(self) -> None:
        """Tell the dispatcher that tasks became dispatchable or a window slot freed up.

        In the process that schedules this sets ``dispatch_ready``; in another server
        process it is sent over the cache's ``scheduler:wake`` channel to the one that
        does (which would otherwise notice within its 0.5 s poll). Never raises.
        """
        self.dispatch_ready.set()
        if not self.leading:
            try:
                await self.cache.publish(self.wake_channel, {"wake": 1})
            except Exception:
                logging.getLogger(__name__).debug("wake not sent", exc_info=True)

    @property
    def wake_channel(self) -> str:
        """``scheduler:wake:<hash of the database URL>``: farms sharing a Redis do not wake each other."""
        digest = hashlib.sha256(self.settings.database_url.encode()).hexdigest()[:16]
        return f"{WAKE_CHANNEL}:{digest}"

    def observe(self, name: str, value: float, **labels: Any) -> None:
        """Record a measurement in the farm's metrics (no-op without metrics); never raises."""
        if self.metrics is None:
            return
        try:
            self.metrics.observe(name, value, **labels)
        except Exception:
            logging.getLogger(__name__).debug("metric %s not recorded", name, exc_info=True)

    @classmethod
    def from_settings(cls, settings: Settings) -> FarmContext:
        """Open every backend named by ``settings``.

        Raises:
            ValueError: naming the first backend URL that is not usable, or the data
                folder when it cannot be written or another farm uses it.
        """
        settings.ensure_dirs()
        lock_fd = settings.lock_data_dir()
        if swept := settings.sweep_tmp():
            logging.getLogger(__name__).info(
                "removed %d leftovers of interrupted uploads from %s", len(swept), settings.tmp_dir
            )
        return cls(
            settings=settings,
            db=Database(settings.database_url),
            broker=open_broker(settings.broker_url),
            cache=open_cache(settings.cache_url),
            storage=TrackedStorage(open_storage(settings.storage_url, settings.signing_secret())),
            executor=LocalExecutor(settings.blender),
            lock_fd=lock_fd,
        )

    async def close(self) -> None:
        """Close every backend."""
        if self.status is not None:
            await self.status.close()
        await self.broker.close()
        await self.cache.close()
        await self.db.close()
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1
