"""``GET /api/events``: one server-sent event stream of every job the caller may read.

An artist of project A sees A's job events and never B's; an admin sees both; every event
names its job; silence is broken by keepalive comments; a revoked token or a lost role
ends the stream with an error event.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server.api import events as events_api
from server.jobs.service import status_of
from tests.conftest import Farm
from tests.test_auth import make_user, session
from tests.test_rbac import call

pytestmark = pytest.mark.asyncio


class Stream:
    """A reader of an open ``text/event-stream`` response."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp

    async def next(self, within_s: float = 5.0) -> tuple[str, Any]:
        """The next block: ``(type, data dict)`` for an event, ``(":", text)`` for a comment,
        ``("", None)`` when the stream ended."""
        deadline = time.monotonic() + within_s
        lines: list[str] = []
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"nothing complete within {within_s} s: {lines}"
            raw = await asyncio.wait_for(self.resp.content.readline(), left)
            if not raw:
                return "", None
            line = raw.decode().rstrip("\n")
            if line:
                lines.append(line)
                continue
            if not lines:
                continue
            if all(x.startswith(":") for x in lines):
                return ":", "\n".join(x[1:].strip() for x in lines)
            fields = dict(x.split(": ", 1) for x in lines)
            return fields["event"], json.loads(fields["data"])

    async def until(self, pred: Any, within_s: float = 10.0) -> list[tuple[str, Any]]:
        """Events (comments skipped) up to and including the first for which ``pred(type, data)``."""
        seen: list[tuple[str, Any]] = []
        deadline = time.monotonic() + within_s
        while True:
            kind, data = await self.next(max(0.1, deadline - time.monotonic()))
            assert kind, f"the stream ended early: {seen}"
            if kind == ":":
                continue
            seen.append((kind, data))
            if pred(kind, data):
                return seen


async def open_stream(farm: Farm, http: aiohttp.ClientSession, token: str) -> Stream:
    """GET /api/events with ``token``; waits for the ``: ready`` comment (subscribed)."""
    resp = await http.get(f"{farm.url}/api/events", headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "text/event-stream"
    stream = Stream(resp)
    assert await stream.next() == (":", "ready")
    return stream


async def member(farm: Farm, name: str, project: str, role: str = "artist") -> str:
    """A user with ``role`` in ``project``; returns an access token of a fresh login."""
    await make_user(farm, name)
    r = await call(farm, "PUT", f"/api/projects/{project}/members/{name}", farm.token, json={"role": role})
    assert r.status == 200, r.body
    return (await session(farm, name))["access_token"]


async def submit(farm: Farm, blend: bytes, project: str) -> str:
    """The sample scene uploaded to ``project`` and a one-frame job of it submitted (admin)."""
    r = await call(
        farm,
        "POST",
        f"/api/models?filename=sample.blend&project={project}",
        farm.token,
        data=blend,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status in (200, 201), r.body
    r = await call(farm, "POST", "/api/jobs", farm.token, json={"model_id": r.body["id"], "frames": "1"})
    assert r.status == 201, r.body
    return r.body["id"]


@pytest.mark.agents(0)
async def test_each_caller_sees_the_jobs_of_their_projects(farm: Farm, sample_blend: Path) -> None:
    for name in ("proj-a", "proj-b"):
        r = await call(farm, "POST", "/api/projects", farm.token, json={"name": name})
        assert r.status == 201, r.body
    tokens = {
        "artist_a": await member(farm, "artist_a", "proj-a"),
        "viewer_b": await member(farm, "viewer_b", "proj-b", "viewer"),
        "admin": farm.token,
    }
    blend = sample_blend.read_bytes()
    async with aiohttp.ClientSession() as http:
        streams = {who: await open_stream(farm, http, t) for who, t in tokens.items()}
        job_a = await submit(farm, blend, "proj-a")
        job_b = await submit(farm, blend, "proj-b")
        status = status_of(farm.ctx)
        # events without the job in them (as the service sends them), in this order
        await status.event(job_a, {"type": "frame", "frame": 1, "task_id": "t-a"})
        await status.event(job_b, {"type": "frame", "frame": 1, "task_id": "t-b"})
        await status.event(job_a, {"type": "progress", "frame": 1, "task_id": "t-a"})
        await status.event(job_b, {"type": "progress", "frame": 1, "task_id": "t-b"})

        def last_of(job: str) -> Any:
            return lambda kind, data: kind == "progress" and data["job_id"] == job

        # artist_a: up to A's last event, by which time B's earlier events would have come
        got = {
            "artist_a": await streams["artist_a"].until(last_of(job_a)),
            "viewer_b": await streams["viewer_b"].until(last_of(job_b)),
            "admin": await streams["admin"].until(last_of(job_b)),
        }
        for who, seen in got.items():
            for kind, data in seen:
                assert data["type"] == kind and data["job_id"] in (job_a, job_b), (who, kind, data)
                if kind == "job":
                    assert data["job"]["id"] == data["job_id"], data
                if kind == "task":
                    assert data["task"]["job_id"] == data["job_id"], data
        jobs_seen = {who: {d["job_id"] for _, d in seen} for who, seen in got.items()}
        assert jobs_seen == {"artist_a": {job_a}, "viewer_b": {job_b}, "admin": {job_a, job_b}}, got
        for who, job, task in (("artist_a", job_a, "t-a"), ("viewer_b", job_b, "t-b")):
            kinds = [k for k, _ in got[who]]
            assert "job" in kinds, (who, kinds)  # the new job's summary
            frame = [d for k, d in got[who] if k == "frame"]
            assert frame == [{"type": "frame", "frame": 1, "task_id": task, "job_id": job}], got[who]
        admin_frames = [(d["job_id"], d["task_id"]) for k, d in got["admin"] if k == "frame"]
        assert admin_frames == [(job_a, "t-a"), (job_b, "t-b")], got["admin"]
        subs = farm.ctx.cache.inner._psubs  # the memory cache's pattern subscribers
        assert len(subs.get("job:*", ())) == 3, subs
        for s in streams.values():
            s.resp.close()
        # a reader that went away is noticed without any event to write, and unsubscribed
        for _ in range(int((events_api.POLL_S + 3) * 10)):
            if not subs.get("job:*"):
                break
            await asyncio.sleep(0.1)
        assert not subs.get("job:*"), subs


@pytest.mark.agents(0)
async def test_keepalive_and_the_end_of_access(farm: Farm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events_api, "KEEPALIVE_S", 0.2)
    monkeypatch.setattr(events_api, "RESYNC_S", 0.3)
    revoked = await member(farm, "revoked", "default")
    removed = await member(farm, "removed", "default", "viewer")
    async with aiohttp.ClientSession() as http:
        s1 = await open_stream(farm, http, revoked)
        s2 = await open_stream(farm, http, removed)
        assert await s1.next(2) == (":", "keepalive")
        assert await s1.next(2) == (":", "keepalive")  # still allowed at the resyncs between

        r = await call(farm, "POST", "/api/auth/logout", revoked, json={})
        assert r.status == 204, r.body
        r = await call(farm, "DELETE", "/api/projects/default/members/removed", farm.token)
        assert r.status == 204, r.body
        for stream, status in ((s1, 401), (s2, 403)):
            started = time.monotonic()
            while True:
                kind, data = await stream.next(3)
                if kind != ":":
                    break
            assert kind == "error" and data["type"] == "error" and data["status"] == status, (kind, data)
            assert data["message"], data
            assert time.monotonic() - started < 3
            assert await stream.next(3) == ("", None), "the stream ends after the error"
    # the ended login cannot open a new stream at all
    r = await call(farm, "GET", "/api/events", revoked)
    assert r.status == 401, r.body
    r = await call(farm, "GET", "/api/events", removed)
    assert r.status == 403, r.body
