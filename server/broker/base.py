"""The broker interface.

Semantics every backend keeps (those of RabbitMQ with manual ack):
messages are delivered to one consumer at a time; a consumer holds at most
``prefetch`` unacknowledged messages; a message not acked (nacked with
requeue, or its consumer gone) is delivered again with ``redelivered`` set;
higher ``priority`` first; a message nacked without requeue moves to the
queue's dead-letter queue ``Q.dead`` (counted by ``dead_letter_depth``).

Backends: ``memory://`` (:mod:`server.broker.memory`, one process, not
durable) and ``amqp://`` / ``amqps://`` (:mod:`server.broker.rabbitmq`,
RabbitMQ through aio-pika, durable).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Protocol
from urllib.parse import urlsplit

from server.urls import redact_url


class BrokerError(ConnectionError):
    """The broker could not do what was asked: unreachable, connection lost, closed, or a
    message not confirmed. Retrying later is the remedy; the message names the broker URL
    with its password redacted."""


class Delivery(Protocol):
    """One delivered message; exactly one of ``ack`` / ``nack`` must be awaited."""

    body: bytes
    redelivered: bool

    async def ack(self) -> None:
        """Remove the message from the queue for good (never raises for a lost connection)."""

    async def nack(self, requeue: bool = True) -> None:
        """Give the message back (``requeue``) or move it to the dead-letter queue."""


class Broker(Protocol):
    """A message broker: publish to named queues, consume with manual ack.

    ``durable`` says whether queued messages survive a restart of the farm (the server
    requeues queued tasks from the database on start when they do not).
    """

    durable: bool

    async def connect(self) -> None:
        """Connect now instead of on first use.

        Raises:
            BrokerError: the broker is unreachable (the message names its URL, redacted).
        """

    async def check(self) -> None:
        """Make sure the broker answers now (for ``/healthz`` and start-up).

        Raises:
            BrokerError: the broker is unreachable or closed.
        """

    async def publish(self, queue: str, body: bytes, priority: int = 0) -> None:
        """Publish one persistent message; returns once the broker holds it.

        Raises:
            BrokerError: the broker did not take it (publish it again later).
        """

    async def publish_many(self, messages: Iterable[tuple[str, bytes, int]]) -> None:
        """Publish ``(queue, body, priority)`` messages; returns once the broker holds all.

        Raises:
            BrokerError: some message was not taken (publish them all again later).
        """

    def consume(self, queue: str, prefetch: int = 1) -> AsyncIterator[Delivery]:
        """Yield deliveries from ``queue`` forever (until the broker closes)."""

    async def depth(self, queue: str) -> int:
        """Messages waiting in ``queue`` (not counting unacked ones)."""

    async def dead_letter_depth(self, queue: str) -> int:
        """Messages in the dead-letter queue of ``queue`` (nacked without requeue)."""

    async def close(self) -> None:
        """Stop all consumers and release connections."""


def open_broker(url: str) -> Broker:
    """Return the broker for ``url``: ``memory://``, or ``amqp://`` / ``amqps://`` (RabbitMQ).

    Nothing is connected yet (see :meth:`Broker.connect`).

    Raises:
        ValueError: naming the URL (password redacted) when its scheme is not supported or,
            for amqp, the host is missing or the port is bad.
    """
    try:
        scheme = urlsplit(url).scheme
    except ValueError:
        scheme = ""
    if scheme == "memory":
        from server.broker.memory import MemoryBroker

        return MemoryBroker()
    if scheme in ("amqp", "amqps"):
        from server.broker.rabbitmq import RabbitBroker

        return RabbitBroker(url)
    raise ValueError(
        f"unsupported broker URL {redact_url(url)!r}: expected memory:// or amqp://user:password@host:5672/vhost"
    )
