"""The RabbitMQ broker (aio-pika) against the real RabbitMQ at 127.0.0.1:5672, and the same
semantics on the in-process broker.

Every test uses its own queue names (deleted afterwards) and its own connection names, and
only closes its own connections, so tests of other engineers on the same RabbitMQ go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import aio_pika
import pytest

from server.broker import BrokerError, open_broker, redact_url
from server.broker.memory import MemoryBroker
from server.broker.rabbitmq import (
    MAX_PRIORITY,
    RabbitBroker,
    amqp_priority,
    dead_letter_queue,
    parse_amqp_url,
    queue_arguments,
)

HOST, PORT = "127.0.0.1", 5672
URL = f"amqp://guest:guest@{HOST}:{PORT}/"
T = TypeVar("T")

pytestmark = pytest.mark.timeout(120)


def _rabbit_up() -> bool:
    try:
        with socket.create_connection((HOST, PORT), timeout=2):
            return True
    except OSError:
        return False


RABBIT_UP = _rabbit_up()
needs_rabbit = pytest.mark.skipif(not RABBIT_UP, reason=f"RabbitMQ is not reachable at {HOST}:{PORT}")
needs_rabbitmqctl = pytest.mark.skipif(
    shutil.which("rabbitmqctl") is None, reason="rabbitmqctl is not installed here"
)


async def within(aw: Awaitable[T], seconds: float = 10.0) -> T:
    """Await ``aw`` with a timeout so a test fails instead of hanging."""
    return await asyncio.wait_for(aw, seconds)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rabbitmqctl(*args: str) -> str:
    out = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=True)
    return out.stdout


async def close_connections_named(name: str) -> int:
    """Close (server side) the RabbitMQ connections whose client named itself ``name``."""
    listing = await asyncio.to_thread(rabbitmqctl, "list_connections", "pid", "client_properties")
    closed = 0
    for line in listing.splitlines():
        pid, _, props = line.partition("\t")
        if f'{{"connection_name","{name}"}}' in props:
            await asyncio.to_thread(rabbitmqctl, "close_connection", pid, "test: closed on purpose")
            closed += 1
    return closed


class Collector:
    """Runs ``broker.consume(queue, prefetch)`` in a task; the test settles the deliveries."""

    def __init__(self, broker: Any, queue: str, prefetch: int = 1) -> None:
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.ended = asyncio.Event()
        self.task = asyncio.create_task(self._run(broker, queue, prefetch))

    async def _run(self, broker: Any, queue: str, prefetch: int) -> None:
        try:
            async for delivery in broker.consume(queue, prefetch=prefetch):
                await self.inbox.put(delivery)
        finally:
            self.ended.set()

    async def get(self, seconds: float = 10.0) -> Any:
        return await within(self.inbox.get(), seconds)

    async def nothing_for(self, seconds: float) -> bool:
        await asyncio.sleep(seconds)
        return self.inbox.empty()

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await within(self.task)


@pytest.fixture
async def queue() -> AsyncIterator[str]:
    """A fresh queue name; the queue and its dead-letter queue are deleted afterwards."""
    name = f"test_broker_{uuid.uuid4().hex[:12]}"
    yield name
    if RABBIT_UP:
        with contextlib.suppress(Exception):
            conn = await within(aio_pika.connect(URL))
            async with conn:
                ch = await conn.channel()
                for q in (name, dead_letter_queue(name)):
                    await within(ch.queue_delete(q, if_unused=False, if_empty=False))


def make_rabbit(url: str = URL, name: str | None = None) -> RabbitBroker:
    return RabbitBroker(
        url,
        connection_name=name or f"rf-test-{uuid.uuid4().hex[:12]}",
        connect_timeout=3,
        operation_timeout=5,
        retry_min_s=0.1,
        retry_max_s=0.5,
    )


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=needs_rabbit)])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """Each backend in turn: the semantics of server.broker.base hold for both."""
    b: Any = MemoryBroker() if request.param == "memory" else make_rabbit()
    yield b
    await within(b.close())


@pytest.fixture
async def rabbit() -> AsyncIterator[RabbitBroker]:
    if not RABBIT_UP:
        pytest.skip(f"RabbitMQ is not reachable at {HOST}:{PORT}")
    b = make_rabbit()
    yield b
    await within(b.close())


async def eventually(check: Any, seconds: float = 10.0) -> None:
    """Poll the coroutine function ``check`` until it returns true."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not await within(check()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not true within {seconds} s: {check}")
        await asyncio.sleep(0.1)


# -- semantics shared by both backends ---------------------------------------------------


async def test_publish_consume_ack(broker: Any, queue: str) -> None:
    await within(broker.check())
    await within(broker.publish(queue, b"hello", priority=0))
    assert await within(broker.depth(queue)) == 1
    c = Collector(broker, queue)
    d = await c.get()
    assert d.body == b"hello" and d.redelivered is False
    assert await within(broker.depth(queue)) == 0
    await within(d.ack())
    await within(d.ack())  # a second settle does nothing
    await c.stop()
    # acked: nothing comes back once its consumer is gone
    await asyncio.sleep(0.3)
    assert await within(broker.depth(queue)) == 0
    assert await within(broker.dead_letter_depth(queue)) == 0


async def test_nack_requeue_redelivers(broker: Any, queue: str) -> None:
    await within(broker.publish(queue, b"again"))
    c = Collector(broker, queue)
    first = await c.get()
    assert first.redelivered is False
    await within(first.nack(requeue=True))
    second = await c.get()
    assert second.body == b"again" and second.redelivered is True
    await within(second.ack())
    await c.stop()
    assert await within(broker.depth(queue)) == 0


async def test_nack_without_requeue_dead_letters(broker: Any, queue: str) -> None:
    await within(broker.publish(queue, b"poison", priority=3))
    c = Collector(broker, queue)
    d = await c.get()
    await within(d.nack(requeue=False))
    await eventually(lambda: _equals(broker.dead_letter_depth(queue), 1))
    assert await within(broker.depth(queue)) == 0
    assert await c.nothing_for(0.3)
    await c.stop()
    dead = Collector(broker, dead_letter_queue(queue))
    got = await dead.get()
    assert got.body == b"poison"
    await within(got.ack())
    await dead.stop()
    assert await within(broker.dead_letter_depth(queue)) == 0


async def _equals(aw: Awaitable[int], expected: int) -> bool:
    return await aw == expected


async def test_higher_priority_first(broker: Any, queue: str) -> None:
    for body, priority in [(b"low", -5), (b"normal", 0), (b"high", 5)]:
        await within(broker.publish(queue, body, priority=priority))
    c = Collector(broker, queue)
    order = []
    for _ in range(3):
        d = await c.get()
        order.append(d.body)
        await within(d.ack())
    await c.stop()
    assert order == [b"high", b"normal", b"low"]


async def test_prefetch_one_holds_back_the_next_message(broker: Any, queue: str) -> None:
    await within(broker.publish_many([(queue, b"one", 0), (queue, b"two", 0)]))
    a = Collector(broker, queue, prefetch=1)
    first = await a.get()
    assert first.body == b"one"
    # A holds one unacked message: the second stays in the queue, not in A's buffer
    assert await a.nothing_for(0.5)
    assert await within(broker.depth(queue)) == 1
    b = Collector(broker, queue, prefetch=1)
    second = await b.get()
    assert second.body == b"two"
    await within(first.ack())
    await within(second.ack())
    assert await a.nothing_for(0.3) and await b.nothing_for(0)
    await a.stop()
    await b.stop()


async def test_close_ends_consumers_and_refuses_publish(broker: Any, queue: str) -> None:
    await within(broker.publish(queue, b"x"))
    c = Collector(broker, queue)
    d = await c.get()
    await within(d.ack())
    await within(broker.close())
    await within(c.ended.wait(), 5)
    assert c.task.exception() is None  # the async for just ends
    with pytest.raises(BrokerError):
        await within(broker.publish(queue, b"y"))
    with pytest.raises(BrokerError):
        await within(broker.check())


# -- RabbitMQ specifics -----------------------------------------------------------------


def test_priority_mapping() -> None:
    assert [amqp_priority(p) for p in (-100, -6, -5, -1, 0, 1, 5, 6, 100)] == [0, 0, 0, 4, 5, 6, 10, 10, 10]
    assert all(0 <= amqp_priority(p) <= MAX_PRIORITY for p in range(-1000, 1000, 7))


@pytest.mark.parametrize(
    "url",
    [
        "http://user:s3cret@host:5672/",
        "amqp://user:s3cret@/vhost",
        "amqp://user:s3cret@host:99999/",
        "amqp://user:s3cret@host:port/",
        "redis://:s3cret@host:6379/0",
        "",
    ],
)
def test_bad_urls_are_refused_without_the_password(url: str) -> None:
    with pytest.raises(ValueError) as err:
        open_broker(url)
    message = str(err.value)
    assert "s3cret" not in message
    if "@" in url:
        assert "***" in message or "unparsable" in message


def test_good_urls_open_without_connecting() -> None:
    b = open_broker("amqp://user:s3cret@rabbit.example:5672/farm?heartbeat=30")
    assert isinstance(b, RabbitBroker) and b.durable is True
    assert b.display_url == "amqp://user:***@rabbit.example:5672/farm?heartbeat=30"
    assert isinstance(open_broker("amqps://user:pw@rabbit.example/"), RabbitBroker)
    assert open_broker("memory://").durable is False
    assert parse_amqp_url("amqp://h") == "amqp://h"
    assert redact_url("amqp://u:p%40ss@h/") == "amqp://u:***@h/"
    assert redact_url("amqp://h/") == "amqp://h/"


async def test_unreachable_rabbitmq_raises_naming_the_redacted_url() -> None:
    port = free_port()  # nothing listens there
    b = make_rabbit(f"amqp://guest:pa%40ss-word@127.0.0.1:{port}/")
    for call in (b.check(), b.connect(), b.publish("q", b"x"), b.depth("q")):
        with pytest.raises(BrokerError) as err:
            await within(call)
        message = str(err.value)
        assert f"127.0.0.1:{port}" in message and "***" in message
        assert "pa%40ss" not in message and "pa@ss" not in message
    await within(b.close())


@needs_rabbit
async def test_queues_are_durable_with_priority_and_dead_letter_and_messages_persistent(
    rabbit: RabbitBroker, queue: str
) -> None:
    await within(rabbit.publish(queue, json.dumps({"task": 1}).encode(), priority=2))
    conn = await within(aio_pika.connect(URL))
    async with conn:
        ch = await within(conn.channel())
        # the same declaration is accepted: durable, with exactly these arguments
        q = await within(ch.declare_queue(queue, durable=True, arguments=queue_arguments(queue)))
        assert queue_arguments(queue) == {
            "x-max-priority": 10,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": f"{queue}.dead",
        }
        await within(ch.declare_queue(dead_letter_queue(queue), durable=True))
        msg = await within(q.get(timeout=5))
        assert msg.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert msg.priority == amqp_priority(2) == 7
        assert json.loads(msg.body) == {"task": 1}
        await within(msg.nack(requeue=True))
        # a transient (non-durable) declaration of the same queues is refused
        for name, args in ((queue, queue_arguments(queue)), (dead_letter_queue(queue), {})):
            ch2 = await within(conn.channel())
            with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
                await within(ch2.declare_queue(name, durable=False, arguments=args))
    assert await within(rabbit.depth(queue)) == 1


@needs_rabbit
@needs_rabbitmqctl
async def test_publish_raises_when_rabbitmq_does_not_confirm(rabbit: RabbitBroker, queue: str) -> None:
    # A policy on this queue only: at most 1 message, further publishes are nacked.
    policy = f"rf-test-{queue}"
    definition = json.dumps({"max-length": 1, "overflow": "reject-publish"})
    await asyncio.to_thread(
        rabbitmqctl,
        "set_policy",
        "--apply-to",
        "queues",
        "--priority",
        "100",
        policy,
        f"^{queue}$",
        definition,
    )
    try:
        await within(rabbit.publish(queue, b"fits"))

        async def policy_applied() -> bool:
            out = await asyncio.to_thread(rabbitmqctl, "list_queues", "name", "policy")
            return any(line.split("\t") == [queue, policy] for line in out.splitlines())

        await eventually(policy_applied, 20)
        with pytest.raises(BrokerError, match="did not confirm"):
            await within(rabbit.publish(queue, b"refused"))
        assert await within(rabbit.depth(queue)) == 1
        # the channel is still usable after a nack
        with pytest.raises(BrokerError, match="did not confirm"):
            await within(rabbit.publish_many([(queue, b"a", 0), (queue, b"b", 0)]))
    finally:
        await asyncio.to_thread(rabbitmqctl, "clear_policy", policy)


@needs_rabbit
@needs_rabbitmqctl
async def test_reconnects_after_its_connection_is_closed(queue: str) -> None:
    name = f"rf-test-reconnect-{uuid.uuid4().hex[:8]}"
    b = make_rabbit(name=name)
    try:
        c = Collector(b, queue)
        await within(b.publish(queue, b"m1"))
        held = await c.get()
        assert held.body == b"m1" and not held.redelivered

        assert await close_connections_named(name) == 1

        # the unacked message of the lost connection comes again, to the resumed consumer
        again = await c.get(15)
        assert again.body == b"m1" and again.redelivered is True
        # settling the old delivery neither raises nor touches the new one (same delivery tag)
        await within(held.ack())
        await within(again.nack(requeue=True))
        third = await c.get()
        assert third.body == b"m1" and third.redelivered is True
        await within(third.ack())

        # publishing works again (after a short while at most) and the consumer receives it
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            try:
                await within(b.publish(queue, b"m2"))
                break
            except BrokerError:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.2)
        got = await c.get()
        assert got.body == b"m2" and got.redelivered is False
        await within(got.ack())
        await c.stop()
        assert await within(b.depth(queue)) == 0
    finally:
        await within(b.close())


class Proxy:
    """A TCP relay to RabbitMQ that the test can cut (RabbitMQ "down") and restore."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, PORT)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self.writers):
            w.transport.abort()
        self.writers.clear()
        self.server = None


@needs_rabbit
async def test_rabbitmq_down_then_back(queue: str) -> None:
    proxy = Proxy()
    await proxy.start()
    b = make_rabbit(f"amqp://guest:guest@127.0.0.1:{proxy.port}/")
    try:
        await within(b.check())
        c = Collector(b, queue)
        await within(b.publish(queue, b"before"))
        d = await c.get()
        await within(d.ack())

        await proxy.stop()  # RabbitMQ unreachable: publish raises, nothing hangs
        await asyncio.sleep(0.2)
        for _ in range(2):
            with pytest.raises(BrokerError):
                await within(b.publish(queue, b"while down"))
        with pytest.raises(BrokerError):
            await within(b.check())

        await proxy.start()  # back: publish and consume resume without a new broker object
        await within(b.check())
        await within(b.publish(queue, b"after"))
        got = await c.get(15)
        if got.body == b"before":  # its ack was sent but may have been cut with the link
            assert got.redelivered is True
            await within(got.ack())
            got = await c.get(15)
        assert got.body == b"after"
        await within(got.ack())
        await c.stop()
    finally:
        await within(b.close())
        if proxy.server is not None:
            await proxy.stop()


@needs_rabbit
async def test_depth_of_a_missing_queue_is_zero(rabbit: RabbitBroker) -> None:
    missing = f"test_broker_missing_{uuid.uuid4().hex[:8]}"
    assert await within(rabbit.depth(missing)) == 0
    assert await within(rabbit.dead_letter_depth(missing)) == 0
    await within(rabbit.check())  # the broker is still usable after the NOT_FOUND


@needs_rabbit
async def test_publish_many_is_confirmed(rabbit: RabbitBroker, queue: str) -> None:
    n = 300
    await within(rabbit.publish_many((queue, str(i).encode(), i % 11 - 5) for i in range(n)), 30)
    assert await within(rabbit.depth(queue)) == n
