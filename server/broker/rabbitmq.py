"""RabbitMQ broker (aio-pika) with the semantics of :mod:`server.broker.base`.

Chosen by ``open_broker("amqp://user:pass@host:5672/vhost")`` (``amqps://`` for TLS; the
query takes aio-pika's options, e.g. ``?heartbeat=30&name=agent-1``).

What it guarantees:

* **Durable queues, persistent messages.** Each queue ``Q`` is declared durable, classic,
  with ``x-max-priority`` = :data:`MAX_PRIORITY` and a dead-letter route to ``Q.dead``
  (declared durable too); messages are published with ``delivery_mode`` 2 (persistent).
* **Publisher confirms.** :meth:`RabbitBroker.publish` returns only once RabbitMQ confirmed
  the message (``basic.ack``); a ``basic.nack``, a returned (unroutable) message, a lost
  connection or a timeout raise :class:`~server.broker.base.BrokerError` (a
  ``ConnectionError``), so the outbox relay keeps the row and retries.
* **Manual ack, prefetch per consumer.** Each :meth:`RabbitBroker.consume` runs on its own
  channel with ``basic.qos(prefetch)``; a delivery stays unacked until the caller awaits
  ``ack()`` or ``nack()``.
* **Dead letters.** ``nack(requeue=False)`` makes RabbitMQ move the message to ``Q.dead``
  (same body, headers say why); :meth:`RabbitBroker.dead_letter_depth` counts them.
* **Reconnects.** The broker holds one connection per instance (publisher and consumers
  share it, one channel each). When it is lost, ``publish`` raises until RabbitMQ answers
  again and then works without a restart; consumers reconnect by themselves with a
  backoff and go on yielding. Deliveries that were unacked on the lost connection are
  delivered again by RabbitMQ (``redelivered=True``); their old ``ack()``/``nack()`` is
  logged and swallowed, never raised, since it can no longer reach RabbitMQ.

Priorities: the farm's job priority is any int (the API allows -100..100, default 0);
RabbitMQ's is 0..10. :func:`amqp_priority` maps ``p`` to ``clamp(p + 5, 0, 10)``, so the
default job is in the middle, priorities -5..5 keep their exact order and values beyond
saturate. The scheduler orders the outbox by the exact priority before publishing, so
the queue priority only reorders messages already waiting in RabbitMQ.

Long renders: RabbitMQ closes a channel whose delivery stays unacked longer than its
``consumer_timeout`` (30 min by default in 3.10); a farm with longer tasks raises it in
``rabbitmq.conf``. The message is then delivered again like any unacked one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import aio_pika
import aiormq.exceptions
import pamqp.exceptions
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue
from aiormq.abc import ConfirmationFrameType
from pamqp.commands import Basic

from server.broker.base import BrokerError, redact_url

log = logging.getLogger(__name__)

MAX_PRIORITY = 10
"""Highest AMQP priority; every queue is declared with ``x-max-priority`` = this."""

PRIORITY_OFFSET = 5
"""Job priority 0 maps to this AMQP priority (see :func:`amqp_priority`)."""

DEAD_LETTER_SUFFIX = ".dead"
"""``Q`` dead-letters into ``Q + DEAD_LETTER_SUFFIX``."""

# What a lost or refused connection, a closed channel or a protocol error raise in aio-pika.
_AMQP_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    pamqp.exceptions.PAMQPException,
    ConnectionError,
    OSError,
    TimeoutError,
)


def amqp_priority(priority: int) -> int:
    """The AMQP priority (0..:data:`MAX_PRIORITY`) of a farm priority (any int).

    ``clamp(priority + PRIORITY_OFFSET, 0, MAX_PRIORITY)``: 0 -> 5, -5 -> 0, 5 -> 10,
    monotonic, so a higher farm priority never gets a lower AMQP priority.
    """
    return max(0, min(MAX_PRIORITY, int(priority) + PRIORITY_OFFSET))


def dead_letter_queue(queue: str) -> str:
    """The name of the dead-letter queue of ``queue`` (``Q`` -> ``Q.dead``)."""
    return queue + DEAD_LETTER_SUFFIX


def queue_arguments(queue: str) -> dict[str, Any]:
    """The ``x-`` arguments ``queue`` is declared with (a dead-letter queue has none).

    Returns:
        ``{"x-max-priority": 10, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "Q.dead"}``
        for a work queue ``Q``; ``{}`` for a queue named ``*.dead``.
    """
    if queue.endswith(DEAD_LETTER_SUFFIX):
        return {}
    return {
        "x-max-priority": MAX_PRIORITY,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dead_letter_queue(queue),
    }


def parse_amqp_url(url: str) -> str:
    """Check an ``amqp://`` / ``amqps://`` URL and return it unchanged.

    Raises:
        ValueError: naming the URL (password redacted) when the scheme is not amqp/amqps,
            the host is missing or the port is not a number in 1..65535.
    """
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad broker URL {shown}: {exc}") from None
    if parts.scheme not in ("amqp", "amqps"):
        raise ValueError(f"bad broker URL {shown}: the scheme must be amqp:// or amqps://")
    if not parts.hostname:
        raise ValueError(f"bad broker URL {shown}: no host (expected amqp://user:password@host:5672/vhost)")
    if port == 0:
        raise ValueError(f"bad broker URL {shown}: port 0")
    return url


class RabbitDelivery:
    """One message from :meth:`RabbitBroker.consume`; await exactly one of ``ack``/``nack``.

    Attributes:
        body: the message body as published.
        redelivered: RabbitMQ delivered it before (nacked with requeue, or its consumer's
            connection was lost before it was settled).
        queue: the queue it came from.
        priority: its AMQP priority (0..10), see :func:`amqp_priority`.
    """

    def __init__(self, message: AbstractIncomingMessage, queue: str, timeout: float) -> None:
        self._message = message
        self._timeout = timeout
        self._settled = False
        self.body: bytes = message.body
        self.redelivered: bool = bool(message.redelivered)
        self.queue = queue
        self.priority: int = message.priority or 0

    @property
    def delivery_mode(self) -> int:
        """2 for a persistent message, 1 for a transient one."""
        return int(self._message.delivery_mode or 1)

    async def ack(self) -> None:
        """Remove the message from its queue for good.

        Never raises for a lost channel: the message is then delivered again by RabbitMQ
        (logged as a warning). A second settle of the same delivery does nothing.
        """
        await self._settle("ack", self._message.ack)

    async def nack(self, requeue: bool = True) -> None:
        """Give the message back to its queue (``requeue``) or dead-letter it to ``Q.dead``.

        Never raises for a lost channel (see :meth:`ack`).
        """

        async def send() -> None:
            await self._message.nack(requeue=requeue)

        await self._settle("nack(requeue)" if requeue else "nack(dead-letter)", send)

    async def _settle(self, what: str, send: Any) -> None:
        if self._settled:
            return
        self._settled = True
        try:
            await asyncio.wait_for(send(), self._timeout)
        except (*_AMQP_ERRORS, aio_pika.exceptions.MessageProcessError) as exc:
            log.warning(
                "%s of a message from %r not sent (%s: %s); RabbitMQ will deliver it again",
                what,
                self.queue,
                type(exc).__name__,
                exc,
            )


@dataclass(eq=False)
class _Link:
    """One AMQP connection and what was set up on it."""

    connection: AbstractConnection
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    publish_channel: AbstractChannel | None = None
    query_channel: AbstractChannel | None = None
    declared: set[str] = field(default_factory=set)
    channel_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def alive(self) -> bool:
        c = self.connection
        transport = c.transport
        return (
            not self.lost.is_set()
            and not c.is_closed
            and c.connected.is_set()
            and transport is not None
            and not transport.connection.is_closed
        )

    def on_close(self, *_: object) -> None:
        self.lost.set()


class RabbitBroker:
    """A :class:`~server.broker.base.Broker` on RabbitMQ (see the module docstring).

    Connects lazily on first use; :meth:`connect` / :meth:`check` connect at once (to fail
    fast at start-up). Creating the object never touches the network, so a server can
    start while RabbitMQ is down and publish once it is back.

    Args:
        url: ``amqp[s]://user:password@host[:port]/[vhost][?options]``.
        connection_name: shown by ``rabbitmqctl list_connections client_properties``
            (default ``renderfarm <host> pid <pid>``; the URL's ``?name=`` wins).
        connect_timeout: seconds to open a connection.
        operation_timeout: seconds for one declare / publish confirm / ack.
        retry_min_s, retry_max_s: a consumer's reconnect backoff (doubling between them).

    Raises:
        ValueError: a bad URL (see :func:`parse_amqp_url`), or non-positive timeouts.
    """

    durable = True
    """Messages survive a broker restart: the server need not requeue queued tasks on start."""

    def __init__(
        self,
        url: str,
        *,
        connection_name: str | None = None,
        connect_timeout: float = 5.0,
        operation_timeout: float = 10.0,
        retry_min_s: float = 0.2,
        retry_max_s: float = 5.0,
    ) -> None:
        self._url = parse_amqp_url(url)
        if min(connect_timeout, operation_timeout, retry_min_s, retry_max_s) <= 0:
            raise ValueError("broker timeouts must be positive")
        self.display_url = redact_url(url)
        password = urlsplit(url).password
        self._secrets = [s for s in {password or "", unquote(password or "")} if s]
        url_name = parse_qs(urlsplit(url).query).get("name", [None])[0]
        self.connection_name = (
            url_name or connection_name or f"renderfarm {socket.gethostname()} pid {os.getpid()}"
        )
        self._connect_timeout = connect_timeout
        self._op_timeout = operation_timeout
        self._retry_min, self._retry_max = retry_min_s, max(retry_min_s, retry_max_s)
        self._link: _Link | None = None
        self._connect_lock = asyncio.Lock()
        self._closing = asyncio.Event()

    # -- connection ---------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _error(self, doing: str, exc: BaseException) -> BrokerError:
        detail = self._scrub(f"{type(exc).__name__}: {exc}".rstrip(": "))
        return BrokerError(f"RabbitMQ at {self.display_url}: {doing} failed ({detail})")

    async def _current(self) -> _Link:
        if self._closing.is_set():
            raise BrokerError(f"broker {self.display_url} is closed")
        link = self._link
        if link is not None and link.alive:
            return link
        async with self._connect_lock:
            link = self._link
            if link is not None and link.alive:
                return link
            if link is not None:
                self._link = None
                await self._discard(link)
            if self._closing.is_set():
                raise BrokerError(f"broker {self.display_url} is closed")
            try:
                connection = await asyncio.wait_for(
                    aio_pika.connect(
                        self._url,
                        timeout=self._connect_timeout,
                        client_properties={"connection_name": self.connection_name},
                    ),
                    self._connect_timeout + 1,
                )
            except (*_AMQP_ERRORS, RuntimeError) as exc:
                raise self._error("connecting", exc) from exc
            link = _Link(connection)
            connection.close_callbacks.add(link.on_close)
            self._link = link
            log.info("connected to RabbitMQ at %s as %r", self.display_url, self.connection_name)
            return link

    async def _discard(self, link: _Link) -> None:
        link.lost.set()
        with contextlib.suppress(*_AMQP_ERRORS, RuntimeError):
            await asyncio.wait_for(link.connection.close(), self._op_timeout)

    async def connect(self) -> None:
        """Open the connection now (it is otherwise opened on first use).

        Raises:
            BrokerError: RabbitMQ is unreachable or refused the login; the message names
                the URL with its password redacted.
        """
        await self._current()

    async def check(self) -> None:
        """Make sure RabbitMQ answers now: connect if needed and open and close a channel.

        Raises:
            BrokerError: unreachable, login refused, or no answer within the timeout; the
                message names the URL with its password redacted.
        """
        link = await self._current()
        try:
            channel = await asyncio.wait_for(
                link.connection.channel(publisher_confirms=False), self._op_timeout
            )
            await asyncio.wait_for(channel.close(), self._op_timeout)
        except (*_AMQP_ERRORS, RuntimeError) as exc:
            link.lost.set()
            raise self._error("opening a channel", exc) from exc

    ping = check

    async def _declare(self, link: _Link, channel: AbstractChannel, queue: str) -> AbstractQueue:
        """Declare ``queue`` (and its dead-letter queue) durable with :func:`queue_arguments`."""
        if not queue:
            raise ValueError("queue name must not be empty")
        try:
            if not queue.endswith(DEAD_LETTER_SUFFIX):
                await channel.declare_queue(dead_letter_queue(queue), durable=True, timeout=self._op_timeout)
            q = await channel.declare_queue(
                queue, durable=True, arguments=queue_arguments(queue), timeout=self._op_timeout
            )
        except aio_pika.exceptions.ChannelPreconditionFailed as exc:
            raise BrokerError(
                f"RabbitMQ at {self.display_url}: queue {queue!r} (or its dead-letter queue) exists "
                f"with other settings than durable with {queue_arguments(queue)} ({exc}); "
                "delete it or move its messages"
            ) from exc
        link.declared.add(queue)
        return q

    async def _publish_channel(self, link: _Link) -> AbstractChannel:
        async with link.channel_lock:
            ch = link.publish_channel
            if ch is None or ch.is_closed:
                ch = await asyncio.wait_for(
                    link.connection.channel(publisher_confirms=True, on_return_raises=True),
                    self._op_timeout,
                )
                link.publish_channel = ch
            return ch

    async def _query_channel(self, link: _Link) -> AbstractChannel:
        async with link.channel_lock:
            ch = link.query_channel
            if ch is None or ch.is_closed:
                ch = await asyncio.wait_for(
                    link.connection.channel(publisher_confirms=False), self._op_timeout
                )
                link.query_channel = ch
            return ch

    # -- publishing ---------------------------------------------------------------------

    async def publish(self, queue: str, body: bytes, priority: int = 0) -> None:
        """Publish one persistent message to ``queue``; returns once RabbitMQ confirmed it.

        Args:
            queue: queue name (declared on first use, see :func:`queue_arguments`).
            body: the message bytes.
            priority: farm priority, any int; sent as :func:`amqp_priority` (0..10).

        Raises:
            BrokerError: not confirmed (nack, returned, timeout) or RabbitMQ unreachable;
                publishing again later is safe (consumers tolerate duplicates).
            ValueError: an empty queue name.
        """
        await self.publish_many([(queue, body, priority)])

    async def publish_many(self, messages: Iterable[tuple[str, bytes, int]]) -> None:
        """Publish ``(queue, body, priority)`` messages at once; returns when all are confirmed.

        Faster than one :meth:`publish` at a time (the confirms are awaited together).

        Raises:
            BrokerError: as :meth:`publish`, when any message was not confirmed; some others
                may have been, so the caller publishes them all again.
        """
        items = list(messages)
        if not items:
            return
        link = await self._current()
        try:
            channel = await self._publish_channel(link)
            for queue in dict.fromkeys(q for q, _, _ in items):
                if queue not in link.declared:
                    await self._declare(link, channel, queue)
            results = await asyncio.gather(
                *(
                    channel.default_exchange.publish(
                        aio_pika.Message(
                            body,
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            priority=amqp_priority(priority),
                        ),
                        routing_key=queue,
                        mandatory=True,
                        timeout=self._op_timeout,
                    )
                    for queue, body, priority in items
                ),
                return_exceptions=True,
            )
        except BrokerError:
            raise
        except (*_AMQP_ERRORS, RuntimeError) as exc:
            if isinstance(exc, TimeoutError):
                link.lost.set()  # no answer: open a fresh connection next time
            raise self._error(f"publishing to {items[0][0]!r}", exc) from exc
        if any(isinstance(r, TimeoutError) for r in results):
            link.lost.set()
        for (queue, _, _), result in zip(items, results, strict=True):
            self._confirmed(queue, result)

    def _confirmed(self, queue: str, result: ConfirmationFrameType | BaseException | None) -> None:
        if isinstance(result, Basic.Ack):
            return
        if isinstance(result, aio_pika.exceptions.DeliveryError):
            raise BrokerError(
                f"RabbitMQ at {self.display_url} did not confirm a message for {queue!r} "
                f"(returned or nacked: {self._scrub(str(result))}); publish it again later"
            ) from result
        if isinstance(result, BaseException):
            if not isinstance(result, (*_AMQP_ERRORS, RuntimeError)):
                raise result
            raise self._error(f"publishing to {queue!r}", result) from result
        raise BrokerError(
            f"RabbitMQ at {self.display_url} did not confirm a message for {queue!r} (got {result!r})"
        )

    # -- consuming ----------------------------------------------------------------------

    async def consume(self, queue: str, prefetch: int = 1) -> AsyncIterator[RabbitDelivery]:
        """Yield deliveries from ``queue`` until :meth:`close`, reconnecting when the link drops.

        Runs on its own channel with ``basic.qos(prefetch_count=prefetch)``: at most
        ``prefetch`` unacked deliveries at a time. Closing the generator (``aclose``, or
        leaving the ``async for``) nacks with requeue the delivery it yielded last, if
        still unsettled, and closes the channel (RabbitMQ requeues whatever else is unacked).

        Raises:
            ValueError: ``prefetch`` < 1 or an empty queue name.
        """
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, not {prefetch}")
        if not queue:
            raise ValueError("queue name must not be empty")
        delay = self._retry_min
        while not self._closing.is_set():
            channel: AbstractChannel | None = None
            try:
                link = await self._current()
                channel = await asyncio.wait_for(
                    link.connection.channel(publisher_confirms=False), self._op_timeout
                )
                await channel.set_qos(prefetch_count=prefetch, timeout=self._op_timeout)
                q = await self._declare(link, channel, queue)
                inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
                await q.consume(inbox.put, no_ack=False, timeout=self._op_timeout)
                delay = self._retry_min
                while True:
                    message = await self._next(inbox, channel, link)
                    if message is None:
                        if self._closing.is_set():
                            return
                        raise BrokerError(f"RabbitMQ at {self.display_url}: consumer channel closed")
                    delivery = RabbitDelivery(message, queue, self._op_timeout)
                    try:
                        yield delivery
                    except GeneratorExit:
                        await delivery.nack(requeue=True)
                        raise
            except (*_AMQP_ERRORS, RuntimeError) as exc:
                if self._closing.is_set():
                    return
                log.warning(
                    "consumer of %r lost RabbitMQ (%s); reconnecting in %.1f s",
                    queue,
                    self._scrub(f"{type(exc).__name__}: {exc}"),
                    delay,
                )
            finally:
                if channel is not None and not channel.is_closed:
                    with contextlib.suppress(*_AMQP_ERRORS, RuntimeError):
                        await asyncio.wait_for(channel.close(), self._op_timeout)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay)
            delay = min(delay * 2, self._retry_max)

    async def _next(
        self,
        inbox: asyncio.Queue[AbstractIncomingMessage],
        channel: AbstractChannel,
        link: _Link,
    ) -> AbstractIncomingMessage | None:
        """The next message, or None once the channel, the connection or the broker closed."""
        if not inbox.empty():
            return inbox.get_nowait()
        get = asyncio.ensure_future(inbox.get())
        stops = [
            asyncio.ensure_future(channel.closed()),
            asyncio.ensure_future(link.lost.wait()),
            asyncio.ensure_future(self._closing.wait()),
        ]
        try:
            await asyncio.wait([get, *stops], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for stop in stops:
                stop.cancel()
            if not get.done():
                get.cancel()
        if get.done() and not get.cancelled():
            return get.result()
        return None

    # -- inspection and shutdown ------------------------------------------------------

    async def depth(self, queue: str) -> int:
        """Messages ready in ``queue`` (not counting unacked ones); 0 when it does not exist.

        Raises:
            BrokerError: RabbitMQ unreachable.
        """
        link = await self._current()
        try:
            channel = await self._query_channel(link)
            q = await channel.declare_queue(queue, passive=True, timeout=self._op_timeout)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return 0
        except (*_AMQP_ERRORS, RuntimeError) as exc:
            raise self._error(f"counting {queue!r}", exc) from exc
        result = q.declaration_result
        return int(result.message_count or 0)

    async def dead_letter_depth(self, queue: str) -> int:
        """Messages waiting in the dead-letter queue of ``queue`` (``Q.dead``).

        Raises:
            BrokerError: RabbitMQ unreachable.
        """
        return await self.depth(dead_letter_queue(queue))

    async def close(self) -> None:
        """Stop every consumer (their ``async for`` ends) and close the connection.

        Unacked deliveries go back to their queues. Publishing afterwards raises
        :class:`~server.broker.base.BrokerError`.
        """
        self._closing.set()
        async with self._connect_lock:
            link, self._link = self._link, None
        if link is not None:
            await self._discard(link)
