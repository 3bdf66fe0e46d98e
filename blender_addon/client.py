"""The farm's REST API over the standard library (``urllib``), for Blender's own Python.

Nothing here imports ``bpy``: worker threads call it while Blender's main thread draws.
Every call raises :class:`FarmError` on failure, with a ``kind`` the panel words for the
artist: ``unreachable`` (no answer: wrong URL, server down, DNS), ``auth`` (401: the token
expired or was revoked, log in again), ``refused`` (another 4xx: the server's message as
is, naming the field) and ``server`` (5xx or an answer that is not the API's JSON).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

TIMEOUT_S = 30.0
"""Seconds a request may wait for the server's answer (an upload waits per block)."""
BLOCK = 1 << 20
"""Bytes read, sent or written at a time during uploads and downloads (1 MiB)."""

MAX_DOWNLOAD_BYTES = 4 << 30
"""Most bytes one download may bring (4 GiB), whatever size the farm announces."""

Progress = Callable[[int, int], None]
"""``progress(done_bytes, total_bytes)``."""


class FarmError(Exception):
    """A request that failed.

    Attributes:
        kind: ``unreachable``, ``auth``, ``refused`` or ``server`` (see the module's doc),
            ``invalid`` (found wrong here, before asking the farm: a server URL, a frame spec), or
            ``canceled`` (an upload the caller canceled).
        status: the HTTP status (0 when there was no answer).
        field: the request field the server named as wrong, if any.
    """

    def __init__(self, kind: str, message: str, status: int = 0, field: str | None = None) -> None:
        # what a peer sent may hold control characters (a banner of another service): not for the panel
        super().__init__("".join(c if c.isprintable() else " " for c in message).strip())
        self.kind = kind
        self.status = status
        self.field = field


def normalise_server(url: str) -> str:
    """``farm:3000`` or ``http://farm:3000/`` as ``http://farm:3000``.

    Raises:
        FarmError: (``refused``) not an http(s) URL with a host.
    """
    url = url.strip()
    if url and "://" not in url:
        url = "http://" + url
    bad = f"server URL {url!r} is not an http:// or https:// URL with a host (such as http://farm:3000)"
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise FarmError("invalid", f"{bad}: it contains spaces or control characters")
    if not url.isascii():
        raise FarmError(
            "invalid",
            f"{bad}: it contains characters such as typographic quotes (write the "
            "host name in plain letters; an international name in its xn-- form)",
        )
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        why = "its port is not a number from 1 to 65535" if "port" in str(exc).lower() else str(exc)
        raise FarmError("invalid", f"{bad}: {why}") from None
    if port == 0:
        raise FarmError("invalid", f"{bad}: its port is not a number from 1 to 65535")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise FarmError("invalid", bad)
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


class _SameHostRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects, but drops the ``Authorization`` header when one leads to another
    host or scheme (urllib would otherwise send the token along)."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            old, nxt = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(new.full_url)
            if (old.scheme, old.netloc) != (nxt.scheme, nxt.netloc):
                new.remove_header("Authorization")
                new.unredirected_hdrs.pop("Authorization", None)
        return new


_OPENER = urllib.request.build_opener(_SameHostRedirects)


class _CountingReader:
    """A file whose reads report how many bytes were sent (``http.client`` reads bodies
    in blocks, so progress follows what really went out)."""

    def __init__(
        self, fh: IO[bytes], total: int, progress: Progress | None, cancelled: Callable[[], bool] | None
    ) -> None:
        self.fh, self.total, self.progress, self.cancelled = fh, total, progress, cancelled
        self.sent = 0

    def read(self, size: int = -1) -> bytes:
        if self.cancelled and self.cancelled():
            raise FarmError("canceled", "the upload was canceled")
        data = self.fh.read(BLOCK if size is None or size < 0 else min(size, BLOCK))
        self.sent += len(data)
        if self.progress:
            self.progress(self.sent, self.total)
        return data


class FarmClient:
    """One farm server, one token (a personal API token ``rfp_...`` or an access JWT).

    Args:
        server: the server's base URL (``http://farm:3000``); see :func:`normalise_server`.
        token: sent as ``Authorization: Bearer``; ``None`` for public calls and login.
        timeout: seconds to wait for an answer.
    """

    def __init__(self, server: str, token: str | None = None, timeout: float = TIMEOUT_S) -> None:
        self.server = normalise_server(server)
        self.token = token
        self.timeout = timeout

    # -------------------------------------------------------------- plumbing

    def url(self, path: str, params: dict[str, Any] | None = None) -> str:
        """``path`` (``/api/...`` or an absolute URL, such as a signed S3 link) with ``params``."""
        if "://" in path:
            if urllib.parse.urlsplit(path).scheme not in ("http", "https"):
                raise FarmError("server", f"the farm gave a link that is not http(s): {path[:80]!r}")
            base = path
        else:
            base = self.server + path
        if params:
            base += ("&" if "?" in base else "?") + urllib.parse.urlencode(params)
        return base

    def _open(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
    ) -> Any:
        url = self.url(path, params)
        h = {"Accept": "application/json", "User-Agent": "renderfarm-blender-addon"}
        if auth and self.token and url.startswith(self.server + "/"):
            h["Authorization"] = f"Bearer {self.token}"  # never to another host (a signed S3 URL)
        h.update(headers or {})
        req = urllib.request.Request(url, data=body, headers=h, method=method)  # noqa: S310 (http(s) only)
        try:
            return _OPENER.open(req, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            raise _http_error(exc) from None
        except FarmError:
            raise  # the upload was canceled
        except (
            TimeoutError,
            urllib.error.URLError,
            OSError,
            ssl.SSLError,
            http.client.HTTPException,
            ValueError,
        ) as exc:
            reason = getattr(exc, "reason", exc)
            raise FarmError("unreachable", f"cannot reach the farm at {self.server}: {reason}") from None

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        payload: Any = None,
        auth: bool = True,
    ) -> Any:
        """Send JSON ``payload`` (if any) and return the decoded JSON answer (``None`` for 204).

        Raises:
            FarmError: as described in the module's doc.
        """
        body = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        with self._open(method, path, params=params, body=body, headers=headers, auth=auth) as resp:
            return _decode(resp.read(), resp.status)

    # -------------------------------------------------------------- accounts

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: the server's and each backend's state."""
        return self.request("GET", "/healthz", auth=False)

    def login(self, username: str, password: str) -> dict[str, Any]:
        """``POST /api/auth/login``: ``{access_token, refresh_token, ...}`` (401 on a wrong password)."""
        return self.request(
            "POST", "/api/auth/login", payload={"username": username, "password": password}, auth=False
        )

    def logout_session(self, refresh_token: str) -> None:
        """``POST /api/auth/logout``: end the login that ``refresh_token`` belongs to."""
        self.request("POST", "/api/auth/logout", payload={"refresh_token": refresh_token})

    def me(self) -> dict[str, Any]:
        """``GET /api/me``: ``{id, username, is_admin, projects: [{id, name, role}]}``."""
        return self.request("GET", "/api/me")

    def projects(self) -> list[dict[str, Any]]:
        """``GET /api/projects``: the caller's projects (``[{id, name, ...}]``)."""
        return self.request("GET", "/api/projects")["projects"]

    def create_token(self, name: str, expires_days: int) -> dict[str, Any]:
        """``POST /api/tokens``: a personal token ``{id, name, token, expires_at}`` (shown once)."""
        return self.request("POST", "/api/tokens", payload={"name": name, "expires_days": expires_days})

    def revoke_token(self, token_id: str) -> None:
        """``DELETE /api/tokens/{id}``."""
        self.request("DELETE", f"/api/tokens/{_q(token_id)}")

    # -------------------------------------------------------------- models and jobs

    def upload_model(
        self,
        path: Path,
        *,
        filename: str,
        main: str | None = None,
        project: str | None = None,
        progress: Progress | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> dict[str, Any]:
        """``POST /api/models``: stream ``path`` (a .blend or .zip) as the raw body.

        Args:
            path: the file to send; ``filename`` is the name the server records.
            main: the .blend to open inside a zip.
            project: the project's name or id.
            progress: called with ``(sent_bytes, total_bytes)`` as blocks go out.
            cancelled: polled before each block; when true the upload stops (``FarmError``).

        Returns:
            The model's metadata (``id``, ``dependencies``, ``missing``, ``scenes`` ...).
        """
        params = {"filename": filename}
        if main:
            params["main"] = main
        if project:
            params["project"] = project
        size = path.stat().st_size
        with open(path, "rb") as fh:
            reader = _CountingReader(fh, size, progress, cancelled)
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
            with self._open("POST", "/api/models", params=params, body=reader, headers=headers) as resp:
                return _decode(resp.read(), resp.status)

    def create_job(self, fields: dict[str, Any]) -> dict[str, Any]:
        """``POST /api/jobs`` with ``fields`` (``None`` values left out): the job's summary."""
        return self.request("POST", "/api/jobs", payload={k: v for k, v in fields.items() if v is not None})

    def job(self, job_id: str) -> dict[str, Any]:
        """``GET /api/jobs/{id}``: state, progress (percent), ``frames_done``, ``frame_count``."""
        return self.request("GET", f"/api/jobs/{_q(job_id)}")

    def jobs(self, limit: int = 10, mine: bool = True) -> list[dict[str, Any]]:
        """``GET /api/jobs``: the newest ``limit`` jobs (only the caller's with ``mine``)."""
        return self.request("GET", "/api/jobs", params={"limit": limit, "mine": str(mine).lower()})["jobs"]

    def tasks(self, job_id: str) -> list[dict[str, Any]]:
        """``GET /api/jobs/{id}/tasks``: ``[{frames, state, current_frame, message, ...}]``."""
        return self.request("GET", f"/api/jobs/{_q(job_id)}/tasks")["tasks"]

    def outputs(self, job_id: str) -> list[dict[str, Any]]:
        """``GET /api/jobs/{id}/outputs``: stored frames ``[{frame, filename, size_bytes, sha256, url}]``."""
        return self.request("GET", f"/api/jobs/{_q(job_id)}/outputs")["frames"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        """``POST /api/jobs/{id}/cancel``: the job's summary."""
        return self.request("POST", f"/api/jobs/{_q(job_id)}/cancel")

    def download(
        self,
        url: str,
        dest: Path,
        *,
        sha256: str | None = None,
        progress: Progress | None = None,
        total: int = 0,
        max_bytes: int | None = None,
        deadline_s: float | None = None,
    ) -> Path:
        """Fetch ``url`` (a signed link from :meth:`outputs`, or an API path) into ``dest``.

        The bytes go to ``dest.part`` first and are renamed into place once complete (and,
        given ``sha256``, checked), so ``dest`` is never a partial file.

        Args:
                max_bytes: refuse an answer longer than this many bytes (default: ``total`` when
                given, as a frame's size is known, but never more than :data:`MAX_DOWNLOAD_BYTES`).
            deadline_s: seconds the whole download may take (default: 120 s plus 1 s per MiB of
                that cap), so a server that trickles bytes cannot hold it for ever.

        Raises:
            FarmError: the request failed, took too long, sent more than ``max_bytes``, or
                (``server``) the bytes do not match ``sha256``.
        """
        part = dest.with_name(dest.name + ".part")
        h = hashlib.sha256()
        done = 0
        cap = max_bytes if max_bytes is not None else (total if 0 < total <= MAX_DOWNLOAD_BYTES else None)
        cap = min(cap or MAX_DOWNLOAD_BYTES, MAX_DOWNLOAD_BYTES)
        allowed_s = deadline_s if deadline_s is not None else 120 + cap / (1 << 20)
        deadline = time.monotonic() + allowed_s
        try:
            with self._open("GET", url, headers={"Accept": "*/*"}) as resp, open(part, "wb") as out:
                while True:
                    try:
                        chunk = resp.read1(BLOCK)
                    except (OSError, http.client.HTTPException) as exc:
                        raise FarmError(
                            "unreachable", f"{dest.name}: the download was cut off: {exc}"
                        ) from None
                    if not chunk:
                        break
                    done += len(chunk)
                    if cap is not None and done > cap:
                        raise FarmError(
                            "server", f"{dest.name}: the farm sent more than the {cap} bytes expected"
                        )
                    if time.monotonic() > deadline:
                        raise FarmError("unreachable", f"{dest.name}: the download took too long; try again")
                    out.write(chunk)
                    h.update(chunk)
                    if progress:
                        progress(done, total)
            if sha256 and h.hexdigest() != sha256:
                raise FarmError("server", f"{dest.name}: the downloaded bytes do not match the stored frame")
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)
        return dest


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def _decode(raw: bytes, status: int) -> Any:
    if status == 204 or not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise FarmError("server", f"the server's answer (HTTP {status}) is not JSON", status) from None


def _http_error(exc: urllib.error.HTTPError) -> FarmError:
    """The API's ``{"error": {"status", "message", "field"}}`` as a :class:`FarmError`."""
    status = exc.code
    message, field = "", None
    try:
        err = json.loads(exc.read() or b"{}").get("error") or {}
        message, field = str(err.get("message") or ""), err.get("field")
    except (ValueError, AttributeError, OSError):
        pass
    message = message or f"HTTP {status} {exc.reason}"
    if status == 401:
        return FarmError("auth", message, status, field)
    if 400 <= status < 500:
        return FarmError("refused", message, status, field)
    return FarmError("server", f"the farm failed (HTTP {status}): {message}", status, field)
