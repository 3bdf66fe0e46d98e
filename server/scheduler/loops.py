"""Runs the scheduler's loops as asyncio tasks beside the API, in the process that leads.

Loops: the dispatcher (fills each pool's window), the outbox relay (publishes),
the timeout checker (requeues expired leases) and the reconciler (repairs drift
between the database, the broker and the cache). With several server processes,
only the holder of the scheduler lock runs them (:mod:`server.scheduler.leader`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from server.context import FarmContext
from server.jobs.service import extend_leases
from server.scheduler.dispatcher import dispatch_once
from server.scheduler.leader import LeaderLock
from server.scheduler.reconciler import prune_outbox, reconcile_broker, reconcile_cache
from server.scheduler.relay import BATCH as RELAY_BATCH
from server.scheduler.relay import relay_once
from server.scheduler.timeout_checker import requeue_expired

log = logging.getLogger(__name__)


STOP_TIMEOUT_S = 30.0
"""Seconds :meth:`Scheduler.stop` waits for the loops to end after cancelling them."""


class Scheduler:
    """Starts and stops the background loops.

    Args:
        relay_poll_s: seconds between outbox polls when nothing signals new rows.
        lease_check_s: seconds between lease expiry checks.
        reconcile_s: seconds between reconciler passes.
        leader_check_s: seconds between checks that this process still holds the lock
            (and, when it does not, attempts to take it).
    """

    def __init__(
        self,
        ctx: FarmContext,
        relay_poll_s: float = 1.0,
        lease_check_s: float = 2.0,
        reconcile_s: float | None = None,
        leader_check_s: float = 2.0,
    ) -> None:
        self.ctx = ctx
        self.relay_poll_s = relay_poll_s
        self.lease_check_s = lease_check_s
        self.reconcile_s = reconcile_s if reconcile_s is not None else ctx.settings.reconcile_s
        self.leader_check_s = leader_check_s
        self.dispatch_poll_s = 0.5
        """Seconds between dispatcher passes when nothing wakes it."""
        self.leading = False
        self._task: asyncio.Task[None] | None = None
        self._lock = LeaderLock(ctx.db)
        self._stopping = False
        self._halt = False

    def start(self) -> None:
        """Start on the running event loop (the loops begin once this process leads)."""
        self._stopping = False
        self._task = asyncio.create_task(self._lead(), name="scheduler")

    async def stop(self) -> None:
        """Cancel the loops and wait for them; release the lock."""
        # a cancel swallowed inside a query (a driver turns it into an error) still ends _lead
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            done, _ = await asyncio.wait({self._task}, timeout=STOP_TIMEOUT_S)
            if not done:  # a loop that does not end must not hold the server's shutdown for ever
                log.error("scheduler loops did not stop within %g s; going on without them", STOP_TIMEOUT_S)
            else:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    self._task.result()
            self._task = None
        await self._lock.release()

    async def _lead(self) -> None:
        while not self._stopping:
            try:
                got = await self._lock.acquire()
            except Exception as exc:
                log.warning("cannot take the scheduler lock: %s", exc)
                got = False
            if not got or self._stopping:
                await asyncio.sleep(self.leader_check_s)
                continue
            log.info("this server runs the scheduler")
            self._halt = False
            self.leading = self.ctx.leading = True
            try:
                n = await extend_leases(self.ctx)
                if n:
                    log.info("gave %d running task(s) a fresh lease while their agents reconnect", n)
            except Exception as exc:
                log.warning("could not extend leases: %s", exc)
            loops = [
                asyncio.create_task(
                    self._every(self._dispatch, self.ctx.dispatch_ready, self.dispatch_poll_s),
                    name="dispatcher",
                ),
                asyncio.create_task(
                    self._every(self._relay, self.ctx.outbox_ready, self.relay_poll_s), name="relay"
                ),
                asyncio.create_task(
                    self._every(self._leases, None, self.lease_check_s), name="timeout-checker"
                ),
                asyncio.create_task(self._every(self._reconcile, None, self.reconcile_s), name="reconciler"),
                asyncio.create_task(self._listen_for_wakes(), name="wake-listener"),
            ]
            self.ctx.dispatch_ready.set()
            try:
                while not self._stopping and await self._lock.held():  # noqa: ASYNC110 (polls the database)
                    await asyncio.sleep(self.leader_check_s)
                if not self._stopping:
                    log.warning("scheduler lock lost; stopping the scheduler loops")
            finally:
                self.leading = self.ctx.leading = False
                self._halt = True  # a loop whose cancel a driver turned into an error ends at its next pass
                for t in loops:
                    t.cancel()
                # gather: the loops' own CancelledErrors become results, while a cancel of this
                # task (stop()) still propagates; suppressing CancelledError around each await
                # swallowed a stop() that came while the loops were ending (the lock check had
                # failed), and _lead went on leading for ever while stop() waited
                await asyncio.gather(*loops, return_exceptions=True)

    async def _listen_for_wakes(self) -> None:
        """Wake the dispatcher when another server process says so (``ctx.wake_channel``)."""
        sub = self.ctx.cache.subscribe(self.ctx.wake_channel)
        try:
            async for _event in sub:
                self.ctx.dispatch_ready.set()
        finally:
            await sub.aclose()

    async def _every(
        self, step: Callable[[], Awaitable[None]], signal: asyncio.Event | None, poll_s: float
    ) -> None:
        while not self._halt:
            if signal is None:
                await asyncio.sleep(poll_s)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(signal.wait(), poll_s)
                signal.clear()
            try:
                await step()
            except Exception as exc:
                log.warning("%s failed (retrying): %s", asyncio.current_task().get_name(), exc)  # type: ignore[union-attr]
                log.debug("details", exc_info=True)
                await asyncio.sleep(min(poll_s, 1.0))

    async def _dispatch(self) -> None:
        while await dispatch_once(self.ctx) > 0:
            pass

    async def _relay(self) -> None:
        # A short batch emptied the outbox; rows written since then set outbox_ready again.
        while await relay_once(self.ctx) >= RELAY_BATCH:
            pass

    async def _leases(self) -> None:
        n = await requeue_expired(self.ctx)
        if n:
            log.warning("requeued or failed %d task(s) with expired leases", n)

    async def _reconcile(self) -> None:
        await reconcile_broker(self.ctx)
        await reconcile_cache(self.ctx)
        await prune_outbox(self.ctx)
