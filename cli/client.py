"""An async client of the renderfarm REST API, used by the CLI (and the benchmark)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import yarl

FINISHED = ("completed", "failed", "canceled")


def _sha256(path: Path) -> str | None:
    """SHA-256 of a file, or None when it is not a readable regular file."""
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _q(ident: str) -> str:
    """An id as one URL path segment (``/``, ``?``, ``..`` cannot reach another route)."""
    return quote(ident, safe="")


class ClientError(Exception):
    """An API call failed; the message is the server's (naming the field at fault) or the connection error.

    ``status`` is the HTTP status (0 when the server was not reached); ``retry_after`` the
    seconds of a ``Retry-After`` header (429), else None.
    """

    def __init__(
        self, message: str, status: int = 0, field: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.field = field
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


class FarmClient:
    """Talks to one server. Use as ``async with FarmClient(url) as c: ...``.

    Args:
        server: base URL, e.g. ``http://127.0.0.1:3000``.
        token: a bearer token (personal API token or access token) sent to this server only,
            never to the object-store links it hands out.
    """

    def __init__(self, server: str, token: str | None = None) -> None:
        self.server = server.rstrip("/")
        self.token = token
        self._http: aiohttp.ClientSession | None = None

    @property
    def auth(self) -> dict[str, str]:
        """The ``Authorization`` header for requests to the server (empty without a token)."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def __aenter__(self) -> FarmClient:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http:
            await self._http.close()

    @property
    def http(self) -> aiohttp.ClientSession:
        """The open HTTP session."""
        if self._http is None:
            raise RuntimeError("use FarmClient as an async context manager")
        return self._http

    async def _json(self, method: str, path: str, **kw: Any) -> Any:
        try:
            kw["headers"] = {**self.auth, **(kw.get("headers") or {})}
            async with self.http.request(method, self.server + path, **kw) as resp:
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    body = None
                if resp.status >= 400:
                    err = (body or {}).get("error", {}) if isinstance(body, dict) else {}
                    raise ClientError(
                        err.get("message") or f"HTTP {resp.status}",
                        resp.status,
                        err.get("field"),
                        _retry_after(resp.headers.get("Retry-After")),
                    )
                return body
        except aiohttp.ClientConnectionError as exc:
            raise ClientError(f"cannot reach the server at {self.server}: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise ClientError(f"request to {self.server} failed: {exc}") from exc

    # ------------------------------------------------------------ accounts

    async def login(self, username: str, password: str) -> dict[str, Any]:
        """``POST /api/auth/login``: ``{access_token, token_type, expires_in, refresh_token}``.

        Raises:
            ClientError: 401 for a wrong user name or password; 429 (``retry_after`` set)
                after too many failed logins.
        """
        return await self._json("POST", "/api/auth/login", json={"username": username, "password": password})

    async def logout_session(self, refresh_token: str | None = None) -> None:
        """``POST /api/auth/logout``: end the login of ``refresh_token`` (default: the caller's)."""
        await self._json("POST", "/api/auth/logout", json={"refresh_token": refresh_token})

    async def me(self) -> dict[str, Any]:
        """``GET /api/me``: ``{id, username, is_admin, projects: [{id, name, role}]}``."""
        return await self._json("GET", "/api/me")

    async def tokens(self, kind: str | None = None, all_users: bool = False) -> list[dict[str, Any]]:
        """``GET /api/tokens``: token records (never the tokens); ``kind="agent"`` and
        ``all_users`` are for admins."""
        params = {}
        if kind:
            params["kind"] = kind
        if all_users:
            params["all"] = "1"
        return (await self._json("GET", "/api/tokens", params=params))["tokens"]

    async def create_token(self, name: str, expires_days: float | None = None) -> dict[str, Any]:
        """``POST /api/tokens``: a personal token, ``{id, name, token, expires_at, ...}`` (shown once)."""
        body: dict[str, Any] = {"name": name}
        if expires_days is not None:
            body["expires_days"] = expires_days
        return await self._json("POST", "/api/tokens", json=body)

    async def create_agent_token(self, agent_name: str, name: str = "") -> dict[str, Any]:
        """``POST /api/agent-tokens`` (admins): ``{id, agent_name, token, ...}`` (shown once)."""
        return await self._json("POST", "/api/agent-tokens", json={"agent_name": agent_name, "name": name})

    async def revoke_token(self, token_id: str) -> dict[str, Any]:
        """``DELETE /api/tokens/{id}``: the revoked token's record."""
        return await self._json("DELETE", f"/api/tokens/{_q(token_id)}")

    async def users(self) -> list[dict[str, Any]]:
        """``GET /api/users`` (admins): ``[{id, username, is_admin, disabled, created_at, projects}]``."""
        return (await self._json("GET", "/api/users"))["users"]

    async def create_user(self, username: str, password: str, is_admin: bool = False) -> dict[str, Any]:
        """``POST /api/users`` (admins): the new user."""
        return await self._json(
            "POST", "/api/users", json={"username": username, "password": password, "is_admin": is_admin}
        )

    async def update_user(self, user: str, **fields: Any) -> dict[str, Any]:
        """``PATCH /api/users/{user}`` (admins) with ``disabled``, ``password`` and/or ``is_admin``;
        ``user`` is a name or id. Disabling or a new password revokes the user's tokens."""
        return await self._json("PATCH", f"/api/users/{_q(user)}", json=fields)

    async def change_password(self, current: str, new: str) -> None:
        """``POST /api/me/password``: every token of the caller is revoked."""
        await self._json("POST", "/api/me/password", json={"current_password": current, "new_password": new})

    async def projects(self) -> list[dict[str, Any]]:
        """``GET /api/projects``: ``[{id, name, role, members}]`` (an admin: every project)."""
        return (await self._json("GET", "/api/projects"))["projects"]

    async def create_project(self, name: str) -> dict[str, Any]:
        """``POST /api/projects`` (admins): the new project."""
        return await self._json("POST", "/api/projects", json={"name": name})

    async def project(self, project: str) -> dict[str, Any]:
        """``GET /api/projects/{project}`` (name or id):
        ``{id, name, role, members: [{user, user_id, role}]}``."""
        return await self._json("GET", f"/api/projects/{_q(project)}")

    async def set_member(self, project: str, user: str, role: str) -> dict[str, Any]:
        """``PUT /api/projects/{project}/members/{user}``: add ``user`` or change their role."""
        return await self._json("PUT", f"/api/projects/{_q(project)}/members/{_q(user)}", json={"role": role})

    async def remove_member(self, project: str, user: str) -> None:
        """``DELETE /api/projects/{project}/members/{user}``."""
        await self._json("DELETE", f"/api/projects/{_q(project)}/members/{_q(user)}")

    async def audit(self, **filters: Any) -> dict[str, Any]:
        """``GET /api/audit`` (admins) with filters actor, action, outcome, target, project_id,
        since, until (ISO 8601), limit, before; ``None`` values are left out.
        Returns ``{"entries": [...], "next_before": int | None}``, newest first."""
        params = {k: str(v) for k, v in filters.items() if v is not None}
        return await self._json("GET", "/api/audit", params=params)

    async def audit_verify(self) -> dict[str, Any]:
        """``GET /api/audit/verify`` (admins): ``{ok, checked, first_broken_seq, reason}``."""
        return await self._json("GET", "/api/audit/verify")

    # ------------------------------------------------------------ models and jobs

    async def upload_model(
        self,
        path: Path,
        main: str | None = None,
        progress: Callable[[int], None] | None = None,
        project: str | None = None,
    ) -> dict[str, Any]:
        """Stream a .blend or .zip to ``POST /api/models``; ``progress`` gets bytes sent so far.

        ``project`` (a name or id) is the project the model belongs to (``?project=``); without
        it the server picks the caller's only project.

        Raises:
            ClientError: the server refused the upload, e.g. 400 with field ``project`` when
                ``project`` is None and the caller belongs to several projects, 404 with field
                ``project`` for an unknown one.
        """

        async def body() -> AsyncIterator[bytes]:
            sent = 0
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    sent += len(chunk)
                    if progress:
                        progress(sent)
                    yield chunk

        params = {"filename": path.name}
        if main:
            params["main"] = main
        if project:
            params["project"] = project
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(path.stat().st_size)}
        return await self._json("POST", "/api/models", params=params, data=body(), headers=headers)

    async def create_job(self, **fields: Any) -> dict[str, Any]:
        """``POST /api/jobs``; ``None`` values are left out."""
        return await self._json("POST", "/api/jobs", json={k: v for k, v in fields.items() if v is not None})

    async def job(self, job_id: str) -> dict[str, Any]:
        """``GET /api/jobs/{id}``."""
        return await self._json("GET", f"/api/jobs/{_q(job_id)}")

    async def tasks(self, job_id: str) -> list[dict[str, Any]]:
        """``GET /api/jobs/{id}/tasks``."""
        return (await self._json("GET", f"/api/jobs/{_q(job_id)}/tasks"))["tasks"]

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """``POST /api/jobs/{id}/cancel``."""
        return await self._json("POST", f"/api/jobs/{_q(job_id)}/cancel")

    async def set_priority(self, job_id: str, priority: int) -> dict[str, Any]:
        """``PATCH /api/jobs/{id}`` with a new priority."""
        return await self._json("PATCH", f"/api/jobs/{_q(job_id)}", json={"priority": priority})

    async def blocklist(self, job_id: str) -> dict[str, Any]:
        """``GET /api/jobs/{id}/blocklist``: ``{"job_id", "blocklist_after", "agents": [...]}``."""
        return await self._json("GET", f"/api/jobs/{_q(job_id)}/blocklist")

    async def clear_blocklist(self, job_id: str, agent: str) -> dict[str, Any]:
        """``DELETE /api/jobs/{id}/blocklist/{agent}``: ``{"job_id", "agent", "cleared"}``."""
        return await self._json("DELETE", f"/api/jobs/{_q(job_id)}/blocklist/{_q(agent)}")

    async def agents(self) -> list[dict[str, Any]]:
        """``GET /api/agents``: registered agents, online ones first."""
        return (await self._json("GET", "/api/agents"))["agents"]

    async def outputs(self, job_id: str) -> dict[str, Any]:
        """``GET /api/jobs/{id}/outputs``."""
        return await self._json("GET", f"/api/jobs/{_q(job_id)}/outputs")

    async def events(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        """The job's live events (``GET /api/jobs/{id}/events``, server-sent events) until it finishes.

        Yields ``{"type": "job" | "task" | "progress" | "frame", ...}``; the first is the job's
        summary and the stream ends after a summary in a finished state.

        Raises:
            ClientError: the job is unknown, or the server cannot be reached.
        """
        url = f"{self.server}/api/jobs/{_q(job_id)}/events"
        try:
            async with self.http.get(
                url, headers=self.auth, timeout=aiohttp.ClientTimeout(sock_read=60)
            ) as resp:
                if resp.status >= 400:
                    body = await resp.json(content_type=None)
                    err = (body or {}).get("error", {})
                    raise ClientError(err.get("message", resp.reason or ""), resp.status, err.get("field"))
                async for raw in resp.content:
                    line = raw.decode("utf-8", "replace").rstrip("\r\n")
                    if line.startswith("data:"):
                        yield json.loads(line[5:])
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ClientError(f"lost the event stream of {self.server}: {exc}") from exc

    async def wait(
        self, job_id: str, on_update: Callable[[dict[str, Any]], None] | None = None, poll_s: float = 2.0
    ) -> dict[str, Any]:
        """Follow the job's live events until it finishes; returns its final summary.

        Falls back to polling every ``poll_s`` seconds when the event stream breaks.
        """
        try:
            async for ev in self.events(job_id):
                if ev.get("type") != "job":
                    continue
                job = ev["job"]
                if on_update:
                    on_update(job)
                if job["state"] in FINISHED:
                    return job
        except ClientError as exc:
            if exc.status == 404:
                raise
        while True:
            job = await self.job(job_id)
            if on_update:
                on_update(job)
            if job["state"] in FINISHED:
                return job
            await asyncio.sleep(poll_s)

    async def download(self, job_id: str, dest: Path, overwrite: bool = False) -> list[Path]:
        """Download every stored frame into ``dest`` (checked against its SHA-256); returns the paths.

        A file already there with the same content is kept (downloading again is a
        no-op); one with other content is not replaced unless ``overwrite``. Each file
        is written under a temp name and renamed once whole, so an interrupted download
        leaves no half-written frame.

        Raises:
            ClientError: for an unknown job, a failed or corrupted download, a ``dest``
                that cannot be written, or a different file in the way.
        """
        out = await self.outputs(job_id)
        frames = out["frames"]
        try:
            dest.mkdir(parents=True, exist_ok=True)
            have = {f["filename"]: _sha256(dest / Path(f["filename"]).name) for f in frames}
            clash = [f["filename"] for f in frames if have[f["filename"]] not in (None, f["sha256"])]
            if clash and not overwrite:
                shown = ", ".join(Path(n).name for n in clash[:5]) + (" ..." if len(clash) > 5 else "")
                raise ClientError(
                    f"{len(clash)} file(s) in {dest} differ from the job's frames and would be replaced "
                    f"({shown}); choose another folder or pass --overwrite"
                )
            await self._download_frames([f for f in frames if have[f["filename"]] != f["sha256"]], dest)
            return [dest / Path(f["filename"]).name for f in frames]
        except OSError as exc:
            raise ClientError(f"cannot write frames into {dest}: {exc.strerror or exc}") from exc

    async def _download_frames(self, frames: list[dict[str, Any]], dest: Path) -> list[Path]:
        paths: list[Path] = []
        for f in frames:
            name = Path(f["filename"]).name
            target = dest / name
            tmp = dest / f".{name}.part"
            h = hashlib.sha256()
            try:
                url = f["url"]
                if url.startswith("/"):
                    req = self.http.get(self.server + url, headers=self.auth)
                else:  # a presigned object-store link: used exactly as signed, with no credentials of ours
                    req = self.http.get(yarl.URL(url, encoded=True))
                async with req as resp:
                    if resp.status != 200:
                        raise ClientError(
                            f"download of frame {f['frame']} failed: HTTP {resp.status}", resp.status
                        )
                    with open(tmp, "wb") as fh:
                        async for chunk in resp.content.iter_chunked(1 << 20):
                            h.update(chunk)
                            fh.write(chunk)
                if h.hexdigest() != f["sha256"]:
                    raise ClientError(f"frame {f['frame']} arrived corrupted (SHA-256 mismatch)")
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            paths.append(target)
        return paths
