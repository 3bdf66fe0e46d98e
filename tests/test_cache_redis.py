"""The Redis cache and event bus, and the resilient wrapper, against real Redis servers.

Round trips and pub/sub use the shared Redis on 127.0.0.1:6379 under a unique key
prefix per test. Fault tests start a private ``redis-server`` on a free port in a
temporary folder and kill, stop or restart that one only.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis

from server.cache import CacheUnavailableError, ResilientCache, open_cache
from server.cache.memory import MemoryCache
from server.cache.redis import RedisCache

SHARED_URL = "redis://127.0.0.1:6379/0"
T = TypeVar("T")


async def within(aw: Awaitable[T], limit_s: float = 5.0) -> T:
    """``await aw``, failing the test when it takes longer than ``limit_s`` seconds."""
    return await asyncio.wait_for(aw, limit_s)


async def quick(aw: Awaitable[T], limit_s: float = 1.0) -> T:
    """``await aw``, asserting it returns within ``limit_s`` seconds."""
    start = time.monotonic()
    result = await asyncio.wait_for(aw, limit_s + 2)
    took = time.monotonic() - start
    assert took < limit_s, f"call took {took:.2f} s"
    return result


async def until(cond: Any, limit_s: float = 10.0, step_s: float = 0.05) -> None:
    """Wait until ``cond()`` is true (awaiting it when it returns an awaitable), at most ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while True:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await asyncio.wait_for(value, limit_s)
        if value:
            return
        assert time.monotonic() < deadline, f"condition not met within {limit_s} s"
        await asyncio.sleep(step_s)


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A unique key prefix on the shared Redis; its keys are deleted afterwards."""
    p = f"test-cache:{uuid.uuid4().hex}:"
    yield p
    raw = aioredis.from_url(SHARED_URL)
    try:
        keys = [k async for k in raw.scan_iter(match=p + "*")]
        if keys:
            await within(raw.delete(*keys))
    finally:
        await raw.aclose()


@pytest.fixture
async def cache() -> AsyncIterator[RedisCache]:
    """A RedisCache on the shared Redis."""
    c = RedisCache(SHARED_URL)
    yield c
    await within(c.close())


# -- round trips on the shared Redis ---------------------------------------------


async def test_get_set_delete_get_raw(cache: RedisCache, prefix: str) -> None:
    key = prefix + "job:1"
    assert await within(cache.get(key)) is None
    assert await within(cache.get_raw(key)) is None
    value = {"state": "running", "done": 3, "name": "Szene ü", "tasks": {"queued": 1}}
    await within(cache.set(key, value))
    assert await within(cache.get(key)) == value
    raw = await within(cache.get_raw(key))
    assert isinstance(raw, bytes)
    assert raw == '{"state":"running","done":3,"name":"Szene ü","tasks":{"queued":1}}'.encode()
    await within(cache.delete(key))
    assert await within(cache.get(key)) is None
    await within(cache.delete(key))  # absent: no error
    await within(cache.ping())


async def test_ttl(cache: RedisCache, prefix: str) -> None:
    raw = aioredis.from_url(SHARED_URL)
    try:
        await within(cache.set(prefix + "short", {"a": 1}, ttl_s=0.4))
        await within(cache.set(prefix + "forever", {"a": 2}))
        await within(cache.set(prefix + "zero", {"a": 3}, ttl_s=0))
        assert 0 < await within(raw.pttl(prefix + "short")) <= 400
        assert await within(raw.pttl(prefix + "forever")) == -1
        assert await within(raw.pttl(prefix + "zero")) == -1
        with pytest.raises(ValueError):
            await within(cache.set(prefix + "neg", {"a": 4}, ttl_s=-1))
        await asyncio.sleep(0.6)
        assert await within(cache.get(prefix + "short")) is None
        assert await within(cache.get(prefix + "forever")) == {"a": 2}
    finally:
        await raw.aclose()


async def test_set_many(cache: RedisCache, prefix: str) -> None:
    items = {f"{prefix}task:{i}": {"id": i, "state": "queued"} for i in range(200)}
    await within(cache.set_many(items, ttl_s=60))
    await within(cache.set_many({}, ttl_s=60))  # nothing to do
    for key, value in items.items():
        assert await within(cache.get(key)) == value
    raw = aioredis.from_url(SHARED_URL)
    try:
        ttls = await within(asyncio.gather(*(raw.pttl(k) for k in list(items)[:5])))
        assert all(55_000 < t <= 60_000 for t in ttls), ttls
    finally:
        await raw.aclose()
    # a value that is not JSON: nothing is written, the error is the caller's
    with pytest.raises(TypeError):
        await within(cache.set_many({prefix + "ok": {"a": 1}, prefix + "bad": {"a": object()}}))
    assert await within(cache.get(prefix + "ok")) is None


async def test_pubsub_two_subscribers_in_order(cache: RedisCache, prefix: str) -> None:
    channel = prefix + "job:42"
    other = cache.subscribe(prefix + "job:other")
    subs = [cache.subscribe(channel), cache.subscribe(channel)]
    try:
        for s in [*subs, other]:
            await within(s.ready(5))
        events = [{"type": "progress", "n": i} for i in range(100)]
        for ev in events:
            await within(cache.publish(channel, ev))
        for s in subs:
            got = [await within(anext(s)) for _ in events]
            assert got == events
        with pytest.raises(asyncio.TimeoutError):  # nothing for another channel
            await asyncio.wait_for(anext(other), 0.3)
    finally:
        for s in [*subs, other]:
            await within(s.aclose())
    # closed: the iteration ends
    with pytest.raises(StopAsyncIteration):
        await within(anext(subs[0]))


async def test_pattern_subscription(cache: RedisCache, prefix: str) -> None:
    sub = cache.subscribe_pattern(prefix + "job:*")
    try:
        await within(sub.ready(5))
        await within(cache.publish(prefix + "job:a", {"n": 1}))
        await within(cache.publish(prefix + "node:a", {"n": 2}))  # does not match
        await within(cache.publish(prefix + "job:b", {"n": 3}))
        assert await within(anext(sub)) == (prefix + "job:a", {"n": 1})
        assert await within(anext(sub)) == (prefix + "job:b", {"n": 3})
    finally:
        await within(sub.aclose())


async def test_close_ends_pending_iteration(prefix: str) -> None:
    c = RedisCache(SHARED_URL)
    sub = c.subscribe(prefix + "ch")
    await within(sub.ready(5))
    pending = asyncio.ensure_future(anext(sub))
    await asyncio.sleep(0.1)
    assert not pending.done()
    await within(c.close())
    with pytest.raises(StopAsyncIteration):
        await within(pending)
    with pytest.raises(CacheUnavailableError):
        await within(c.get(prefix + "x"))


async def test_resilient_swallows_bad_values_without_degrading(prefix: str) -> None:
    c = open_cache(SHARED_URL)
    try:
        assert isinstance(c, ResilientCache)
        await within(c.set(prefix + "bad", {"a": object()}))  # logged, dropped
        assert not c.degraded
        await within(c.set(prefix + "good", {"a": 1}))
        assert await within(c.get_raw(prefix + "good")) == b'{"a":1}'
    finally:
        await within(c.close())


async def test_more_concurrent_calls_than_connections_wait_instead_of_failing(prefix: str) -> None:
    """A burst of reads beyond the pool's connections queues for a connection; it is not an outage
    (redis-py's default pool raises MaxConnectionsError, which would make the cache degraded)."""
    c = ResilientCache(RedisCache(SHARED_URL, max_connections=4), name="burst")
    try:
        await within(c.set(prefix + "k", {"a": 1}))
        got = await within(asyncio.gather(*(c.get_raw(prefix + "k") for _ in range(300))))
        assert got == [b'{"a":1}'] * 300
        assert not c.degraded and c.outages == 0
        sub = c.subscribe(prefix + "chan")  # subscriptions do not take the commands' connections
        await within(sub.ready(2.0))
        await within(c.publish(prefix + "chan", {"n": 1}))
        assert await within(sub.__anext__()) == {"n": 1}
        await sub.aclose()
    finally:
        await within(c.close())


def test_bad_urls_are_refused_with_the_password_redacted() -> None:
    for url in [
        "redis://:hunter2@cache.example:99999/0",
        "redis://user:hunter2@cache.example/notadb",
        "redis://:hunter2@/0",
        "redis://:hunter2@cache.example/0?sockettimeout=1",
        "redis://:hunter2@cache.example/0?socket_timeout=soon",
        "unix://:hunter2@",
        "rediss://hunter2@cache.example:port/0",
        "mysql://:hunter2@cache.example/0",
        "redis:hunter2@cache.example",
        "redis:/user:hunter2@cache.example",
    ]:
        with pytest.raises(ValueError) as err:
            open_cache(url)
        assert "hunter2" not in str(err.value), str(err.value)
        assert "cache URL" in str(err.value)
    assert "***@cache.example" in _refusal("redis://:hunter2@cache.example:99999/0")
    # good ones are accepted (nothing is connected yet)
    for url in [
        "redis://127.0.0.1:6379/0",
        "redis://:pw@cache.example/3?socket_timeout=1&max_connections=50",
        "rediss://cache.example:6380/0",
        "unix:///run/redis/redis.sock?db=1",
        "memory://",
    ]:
        assert isinstance(open_cache(url), ResilientCache)


def _refusal(url: str) -> str:
    try:
        open_cache(url)
    except ValueError as exc:
        return str(exc)
    raise AssertionError(f"{url} accepted")


async def test_memory_cache_has_the_same_interface() -> None:
    c = MemoryCache()
    await c.set_many({"a": {"x": 1}, "b": {"y": "é"}}, ttl_s=60)
    assert await c.get_raw("b") == '{"y":"é"}'.encode()
    assert await c.get_raw("nope") is None
    await c.ping()
    sub, psub = c.subscribe("job:1"), c.subscribe_pattern("job:*")
    await within(sub.ready(1))
    await c.publish("job:1", {"n": 1})
    await c.publish("task:1", {"n": 2})
    assert await within(anext(sub)) == {"n": 1}
    assert await within(anext(psub)) == ("job:1", {"n": 1})
    pending = asyncio.ensure_future(anext(sub))
    await c.close()
    with pytest.raises(StopAsyncIteration):
        await within(pending)


# -- faults, on a private redis-server --------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A throwaway ``redis-server`` on a free loopback port, in its own folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        assert exe, "redis-server not installed"
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--daemonize", "no", "--dir", str(self.folder)]
        with (self.folder / "redis.log").open("ab") as out:
            self.proc = subprocess.Popen([exe, *args], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            assert self.proc.poll() is None, (self.folder / "redis.log").read_text()
            assert time.monotonic() < deadline, "private redis-server did not start"
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # in case it was stopped
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A private redis-server, killed at the end of the test."""
    r = PrivateRedis(tmp_path)
    r.start()
    try:
        yield r
    finally:
        r.kill()


async def _all_calls_answer_quickly(c: ResilientCache, key: str) -> None:
    """Every call returns (None, no exception) in under a second."""
    assert await quick(c.get(key)) is None
    assert await quick(c.get_raw(key)) is None
    assert await quick(c.set(key, {"a": 1}, ttl_s=10)) is None
    assert await quick(c.set_many({key: {"a": 2}}, ttl_s=10)) is None
    assert await quick(c.delete(key)) is None
    assert await quick(c.publish("job:1", {"type": "job"})) is None


async def test_redis_killed_and_restarted(private_redis: PrivateRedis) -> None:
    c = ResilientCache(RedisCache(private_redis.url, resubscribe_interval_s=0.2), retry_interval_s=0.2)
    recovered = asyncio.Event()
    calls: list[float] = []

    async def hook() -> None:
        calls.append(time.time())
        recovered.set()

    c.on_recover.append(hook)
    sub = c.subscribe("job:1")
    try:
        await within(c.set("job:1", {"state": "running"}))
        assert await within(c.get("job:1")) == {"state": "running"}
        await within(sub.ready(5))
        await within(c.publish("job:1", {"n": 1}))
        assert await within(anext(sub)) == {"n": 1}
        pending = asyncio.ensure_future(anext(sub))  # a reader waiting across the outage
        assert not c.degraded and c.degraded_since is None

        private_redis.kill()  # SIGKILL mid-use
        before = time.time()
        await _all_calls_answer_quickly(c, "job:1")
        assert c.degraded
        assert c.degraded_since is not None and c.degraded_since >= before - 1
        assert c.outages == 1
        # while degraded, calls skip the dead backend: many calls cost almost nothing
        start = time.monotonic()
        for _ in range(200):
            assert await within(c.get("job:1")) is None
        assert time.monotonic() - start < 1.0
        with pytest.raises(CacheUnavailableError):
            await quick(c.ping())
        await asyncio.sleep(0.5)  # the subscriber keeps retrying; its reader sees nothing wrong
        assert not pending.done()
        assert c.degraded and not recovered.is_set()

        private_redis.start()  # same port
        await until(lambda: not c.degraded)  # the background ping notices
        await within(recovered.wait())
        assert len(calls) == 1
        assert c.degraded_since is None
        assert await within(c.get("job:1")) is None  # Redis restarted empty
        await within(c.set("job:1", {"state": "done"}))
        assert await within(c.get("job:1")) == {"state": "done"}

        # the subscriber started before the outage gets events published after it
        await within(sub.ready(10))
        await within(c.publish("job:1", {"n": 2}))
        assert await within(pending) == {"n": 2}
        assert sub.reconnects >= 1  # type: ignore[attr-defined]
        await within(c.publish("job:1", {"n": 3}))
        assert await within(anext(sub)) == {"n": 3}
        assert c.outages == 1
    finally:
        await within(sub.aclose())
        await within(c.close())


async def test_redis_hung_then_resumed(private_redis: PrivateRedis) -> None:
    """A Redis that accepts connections but never answers (SIGSTOP): socket timeouts keep calls short."""
    c = ResilientCache(RedisCache(private_redis.url, ping_interval_s=0.5), retry_interval_s=0.3)
    recovered = asyncio.Event()
    c.on_recover.append(recovered.set)  # a plain function works too
    sub = c.subscribe("job:7")
    try:
        await within(c.set("k", {"v": 1}))
        await within(sub.ready(5))
        private_redis.signal(signal.SIGSTOP)
        try:
            await _all_calls_answer_quickly(c, "k")
            assert c.degraded
            # degraded: calls no longer wait for the socket timeout (0.5 s each) but skip
            start = time.monotonic()
            for _ in range(20):
                assert await within(c.get("k")) is None
            assert time.monotonic() - start < 0.4
            # the subscriber's PING goes unanswered: it drops the connection and retries
            await until(lambda: sub.reconnects >= 1, limit_s=10)  # type: ignore[attr-defined]
        finally:
            private_redis.signal(signal.SIGCONT)
        await until(lambda: not c.degraded)
        await within(recovered.wait())
        assert await within(c.get("k")) == {"v": 1}  # nothing lost: the server only paused
        await within(sub.ready(10))
        await within(c.publish("job:7", {"n": 1}))
        assert await within(anext(sub)) == {"n": 1}
    finally:
        await within(sub.aclose())
        await within(c.close())


async def test_recovery_by_a_call(private_redis: PrivateRedis) -> None:
    """Degraded ends at the first successful call, not only by the background ping."""
    c = ResilientCache(RedisCache(private_redis.url), retry_interval_s=0.2)
    try:
        private_redis.kill()
        assert await quick(c.get("k")) is None
        assert c.degraded
        c._probe.cancel()  # type: ignore[union-attr]  # leave recovery to the calls
        private_redis.start()
        await asyncio.sleep(0.3)  # past the back-off
        assert c.degraded
        await quick(c.set("k", {"v": 2}))
        assert not c.degraded
        assert await within(c.get("k")) == {"v": 2}
    finally:
        await within(c.close())
