"""In-process broker with the semantics of :mod:`server.broker.base` (one event loop)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

from server.broker.base import BrokerError


@dataclass(order=True)
class _Item:
    sort_key: tuple[int, int]
    body: bytes = field(compare=False)
    priority: int = field(compare=False, default=0)
    redelivered: bool = field(compare=False, default=False)


class _MemoryDelivery:
    def __init__(self, queue: _Queue, dead: _Queue, item: _Item, slot: asyncio.Semaphore) -> None:
        self._queue, self._dead, self._item, self._slot = queue, dead, item, slot
        self.body = item.body
        self.redelivered = item.redelivered
        self._settled = False

    async def ack(self) -> None:
        """See :meth:`server.broker.base.Broker.ack`."""
        self._settle()

    async def nack(self, requeue: bool = True) -> None:
        """See :meth:`server.broker.base.Broker.nack`."""
        if not self._settle():
            return
        if requeue:
            self._queue.put(self._item.body, self._item.priority, redelivered=True)
        else:
            self._dead.put(self._item.body, self._item.priority)

    def _settle(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        self._slot.release()
        return True


class _Queue:
    def __init__(self) -> None:
        self.items: asyncio.PriorityQueue[_Item] = asyncio.PriorityQueue()
        self._seq = itertools.count()

    def put(self, body: bytes, priority: int, redelivered: bool = False) -> None:
        """See :meth:`server.broker.base.Broker.put`."""
        self.items.put_nowait(_Item((-priority, next(self._seq)), body, priority, redelivered))


class MemoryBroker:
    """Queues live in this process; a consumer that stops without acking gives its message back.

    Not durable: messages are lost when the process ends (``durable = False`` tells the
    server to requeue queued tasks from the database on start).
    """

    durable = False

    def __init__(self) -> None:
        self._queues: dict[str, _Queue] = {}
        self._closed = asyncio.Event()

    def _q(self, name: str) -> _Queue:
        return self._queues.setdefault(name, _Queue())

    async def connect(self) -> None:
        """See :meth:`server.broker.base.Broker.connect` (nothing to connect)."""
        await self.check()

    async def check(self) -> None:
        """See :meth:`server.broker.base.Broker.check`; raises BrokerError once closed."""
        if self._closed.is_set():
            raise BrokerError("broker memory:// is closed")

    async def publish(self, queue: str, body: bytes, priority: int = 0) -> None:
        """See :meth:`server.broker.base.Broker.publish`."""
        await self.check()
        self._q(queue).put(body, priority)

    async def publish_many(self, messages: Iterable[tuple[str, bytes, int]]) -> None:
        """See :meth:`server.broker.base.Broker.publish_many`."""
        await self.check()
        for queue, body, priority in messages:
            self._q(queue).put(body, priority)

    async def consume(self, queue: str, prefetch: int = 1) -> AsyncIterator[_MemoryDelivery]:
        """See :meth:`server.broker.base.Broker.consume`."""
        q = self._q(queue)
        slot = asyncio.Semaphore(prefetch)
        while not self._closed.is_set():
            await slot.acquire()
            get = asyncio.ensure_future(q.items.get())
            closed = asyncio.ensure_future(self._closed.wait())
            try:
                await asyncio.wait({get, closed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closed.cancel()
                if not get.done():
                    get.cancel()
            if not get.done() or get.cancelled():
                slot.release()
                return
            delivery = _MemoryDelivery(q, self._q(queue + ".dead"), get.result(), slot)
            try:
                yield delivery
            except GeneratorExit:
                await delivery.nack(requeue=True)
                raise

    async def depth(self, queue: str) -> int:
        """See :meth:`server.broker.base.Broker.depth`."""
        return self._q(queue).items.qsize()

    async def dead_letter_depth(self, queue: str) -> int:
        """See :meth:`server.broker.base.Broker.dead_letter_depth`."""
        return await self.depth(queue + ".dead")

    async def close(self) -> None:
        """See :meth:`server.broker.base.Broker.close`."""
        self._closed.set()
