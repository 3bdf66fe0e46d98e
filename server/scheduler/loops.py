"""Runs the relay and the timeout checker as asyncio tasks beside the API."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from server.context import FarmContext
from server.scheduler.relay import relay_once
from server.scheduler.timeout_checker import requeue_expired

log = logging.getLogger(__name__)


class Scheduler:
    """Starts and stops the background loops.

    Args:
        relay_poll_s: seconds between outbox polls when nothing signals new rows.
        lease_check_s: seconds between lease expiry checks.
    """

    def __init__(self, ctx: FarmContext, relay_poll_s: float = 1.0, lease_check_s: float = 2.0) -> None:
        self.ctx = ctx
        self.relay_poll_s = relay_poll_s
        self.lease_check_s = lease_check_s
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start both loops on the running event loop."""
        self._tasks = [
            asyncio.create_task(self._relay_loop(), name="outbox-relay"),
            asyncio.create_task(self._lease_loop(), name="timeout-checker"),
        ]

    async def stop(self) -> None:
        """Cancel both loops and wait for them."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []

    async def _relay_loop(self) -> None:
        ready = self.ctx.outbox_ready
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ready.wait(), self.relay_poll_s)
            ready.clear()
            try:
                while await relay_once(self.ctx) > 0:
                    pass
            except Exception:
                log.exception("outbox relay failed; retrying")
                await asyncio.sleep(self.relay_poll_s)

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_check_s)
            try:
                n = await requeue_expired(self.ctx)
                if n:
                    log.warning("requeued or failed %d task(s) with expired leases", n)
            except Exception:
                log.exception("timeout checker failed; retrying")
