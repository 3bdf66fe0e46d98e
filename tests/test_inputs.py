"""The agent's input cache: fetched once per model, verified, capped in size with LRU eviction.

A real aiohttp server serves the models and counts the downloads.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from node_agent.inputs import BLEND_NAME, InputCache, InputError
from protocol.messages import TaskSpec

KIB = 1024


class ModelServer:
    """Serves ``/m/<name>`` from a dict of bodies and counts the requests per name."""

    def __init__(self) -> None:
        self.bodies: dict[str, bytes] = {}
        self.hits: dict[str, int] = {}
        self.url = ""

    def add(self, name: str, body: bytes) -> str:
        self.bodies[name] = body
        return hashlib.sha256(body).hexdigest()

    async def handle(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.hits[name] = self.hits.get(name, 0) + 1
        if name not in self.bodies:
            raise web.HTTPNotFound()
        return web.Response(body=self.bodies[name])


@pytest.fixture
async def models() -> AsyncIterator[ModelServer]:
    srv = ModelServer()
    app = web.Application()
    app.router.add_get("/m/{name}", srv.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    srv.url = f"http://127.0.0.1:{port}"
    try:
        yield srv
    finally:
        await runner.cleanup()


def blend(n_bytes: int, seed: str) -> bytes:
    """A body that starts like a .blend (the cache does not parse it)."""
    body = b"BLENDER-v500" + seed.encode()
    return body + os.urandom(max(0, n_bytes - len(body)))


def spec(name: str, sha: str, kind: str = "blend", main: str | None = None) -> TaskSpec:
    return TaskSpec(
        task_id="t",
        job_id="j",
        lease_id="l",
        frames=[1],
        model_sha256=sha,
        model_kind=kind,
        model_url=f"/m/{name}",
        model_main=main,
    )


async def test_a_model_is_downloaded_once_and_kept_read_only(models: ModelServer, tmp_path: Path) -> None:
    sha = models.add("a", blend(64 * KIB, "a"))
    cache = InputCache(tmp_path / "inputs")
    async with aiohttp.ClientSession() as http:
        first = await cache.fetch(http, models.url, spec("a", sha))
        second = await cache.fetch(http, models.url, spec("a", sha))  # the second task of the job
    assert first == second and first.name == BLEND_NAME
    assert models.hits == {"a": 1} and cache.downloads == 1
    assert hashlib.sha256(first.read_bytes()).hexdigest() == sha
    assert first.stat().st_mode & 0o222 == 0  # read-only: a render cannot change the cache
    assert int((tmp_path / "inputs" / sha / "ready").read_text()) == 64 * KIB


async def test_the_least_recently_used_models_go_past_the_cap(models: ModelServer, tmp_path: Path) -> None:
    shas = {n: models.add(n, blend(100 * KIB, n)) for n in "abcd"}
    cache = InputCache(tmp_path / "inputs", max_bytes=250 * KIB)  # room for two models
    async with aiohttp.ClientSession() as http:
        await cache.fetch(http, models.url, spec("a", shas["a"]))
        await cache.fetch(http, models.url, spec("b", shas["b"]))
        os.utime(tmp_path / "inputs" / shas["a"] / "ready", (1, 1))  # as if a and b were used long ago
        os.utime(tmp_path / "inputs" / shas["b"] / "ready", (2, 2))
        await cache.fetch(http, models.url, spec("a", shas["a"]))  # a used again: now the newest
        await cache.fetch(http, models.url, spec("c", shas["c"]))  # over the cap: b goes, not a
        kept = {sha for _, _, sha in cache.entries()}
        assert kept == {shas["a"], shas["c"]} and cache.evicted == 1
        assert not (tmp_path / "inputs" / shas["b"]).exists()
        await cache.fetch(http, models.url, spec("b", shas["b"]))  # b again: downloaded again
    assert models.hits == {"a": 1, "b": 2, "c": 1}
    assert sum(size for _, size, _ in cache.entries()) <= 250 * KIB
    assert not [p for p in (tmp_path / "inputs").iterdir() if p.name.startswith(".fetch-")]


async def test_a_model_larger_than_the_cap_is_kept_while_it_is_the_one_in_use(
    models: ModelServer, tmp_path: Path
) -> None:
    small = models.add("s", blend(10 * KIB, "s"))
    big = models.add("big", blend(300 * KIB, "big"))
    cache = InputCache(tmp_path / "inputs", max_bytes=100 * KIB)
    async with aiohttp.ClientSession() as http:
        await cache.fetch(http, models.url, spec("s", small))
        path = await cache.fetch(http, models.url, spec("big", big))
        assert path.is_file()  # the task about to render keeps its input
        assert {sha for _, _, sha in cache.entries()} == {big}


async def test_a_package_counts_its_unpacked_files(models: ModelServer, tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("shot/scene.blend", blend(20 * KIB, "z"))
        zf.writestr("shot/textures/wood.png", b"\x89PNG" + b"\0" * (30 * KIB))
    sha = models.add("pkg", buf.getvalue())
    cache = InputCache(tmp_path / "inputs")
    async with aiohttp.ClientSession() as http:
        main = await cache.fetch(http, models.url, spec("pkg", sha, "zip", "shot/scene.blend"))
    assert main.name == "scene.blend"
    [(_, size, got)] = cache.entries()
    assert got == sha and size == 20 * KIB + 4 + 30 * KIB


async def test_a_wrong_hash_keeps_nothing(models: ModelServer, tmp_path: Path) -> None:
    models.add("x", blend(8 * KIB, "x"))
    cache = InputCache(tmp_path / "inputs")
    async with aiohttp.ClientSession() as http:
        with pytest.raises(InputError, match="SHA-256"):
            await cache.fetch(http, models.url, spec("x", "0" * 64))
    assert cache.entries() == [] and list((tmp_path / "inputs").iterdir()) == []
