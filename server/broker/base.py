"""The broker interface.

Semantics every backend keeps (those of RabbitMQ with manual ack):
messages are delivered to one consumer at a time; a consumer holds at most
``prefetch`` unacknowledged messages; a message not acked (nacked with
requeue, or its consumer gone) is delivered again; higher ``priority`` first.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol
from urllib.parse import urlsplit


class Delivery(Protocol):
    """One delivered message; exactly one of ``ack`` / ``nack`` must be awaited."""

    body: bytes
    redelivered: bool

    async def ack(self) -> None:
        """Remove the message from the queue for good."""

    async def nack(self, requeue: bool = True) -> None:
        """Give the message back (``requeue``) or drop it."""


class Broker(Protocol):
    """A message broker: publish to named queues, consume with manual ack."""

    async def publish(self, queue: str, body: bytes, priority: int = 0) -> None:
        """Publish one persistent message; returns once the broker holds it."""

    def consume(self, queue: str, prefetch: int = 1) -> AsyncIterator[Delivery]:
        """Yield deliveries from ``queue`` forever (until the broker closes)."""

    async def depth(self, queue: str) -> int:
        """Messages waiting in ``queue`` (not counting unacked ones)."""

    async def close(self) -> None:
        """Stop all consumers and release connections."""


def open_broker(url: str) -> Broker:
    """Return the broker for ``url``.

    Raises:
        ValueError: naming the URL when its scheme is not supported.
    """
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        from server.broker.memory import MemoryBroker

        return MemoryBroker()
    raise ValueError(f"unsupported broker URL {url!r}: expected memory://")
