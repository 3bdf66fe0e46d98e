"""Error handling, origin checks and body parsing of every request (permissions: server.api.access)."""

from __future__ import annotations

import json
import logging
from typing import Any, TypeVar
from urllib.parse import urlsplit

from aiohttp import web
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import OperationalError

from protocol.frames import MAX_FRAME, MIN_FRAME
from server.broker import BrokerError
from server.errors import ApiError
from server.storage import StorageUnavailableError

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
CTX = web.AppKey("ctx", object)


def error_response(err: ApiError) -> web.Response:
    """The JSON response for ``err`` (with ``Retry-After`` when the error carries ``retry_after``)."""
    retry_after = getattr(err, "retry_after", None)
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return web.json_response(err.to_dict(), status=err.status, headers=headers)


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Turn every failure into a JSON error; never leak a traceback to the client."""
    try:
        return await handler(request)
    except ApiError as err:
        return error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(ApiError(exc.status, exc.reason or "error"))
    except (StorageUnavailableError, BrokerError, OperationalError) as exc:
        log.warning("backend unavailable on %s %s: %s", request.method, request.path, exc)
        return error_response(ApiError(503, "a backend of the farm is unavailable; retry shortly"))
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(ApiError(500, "internal server error; see the server log"))


LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@web.middleware
async def origin_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Refuse what a web page in the user's browser could send on the user's behalf.

    * A state-changing request whose ``Origin`` is not this server's own is refused
      (403): browsers send ``Origin`` on every cross-site POST/PUT/DELETE, including the
      "simple" form and ``text/plain`` posts that need no CORS preflight.
    * While the farm listens on a loopback address, a ``Host`` other than a loopback
      name is refused (421), so a DNS-rebound name cannot reach it.
    """
    settings = request.app[CTX].settings  # type: ignore[attr-defined]
    host = request.host or ""
    if settings.loopback_only and _hostname(host) not in LOOPBACK_NAMES:
        raise ApiError(421, f"this farm only answers to loopback host names, not {host!r}")
    origin = request.headers.get("Origin")
    if origin is not None and request.method not in SAFE_METHODS:
        parsed = urlsplit(origin)
        if origin == "null" or parsed.netloc.lower() != host.lower():
            raise ApiError(403, f"cross-origin request from {origin!r} refused")
    return await handler(request)


def _hostname(host: str) -> str:
    if host.startswith("["):
        return host[1:].split("]", 1)[0].lower()
    return host.rsplit(":", 1)[0].lower() if host.count(":") == 1 else host.lower()


async def parse_body(request: web.Request, model: type[M]) -> M:
    """Read a JSON body into ``model``.

    Raises:
        ApiError: 415 unless the body is sent as ``application/json``; 400 naming the
            first field at fault, or saying the body is not JSON.
    """
    if request.content_type != "application/json":
        raise ApiError(415, f"send the body as application/json, not {request.content_type!r}")
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(400, f"{field}: {first['msg']}" if field else first["msg"], field) from exc


async def open_event_stream(request: web.Request) -> web.StreamResponse:
    """Start a server-sent events answer (``text/event-stream``, not cached, not buffered by a
    proxy); the caller writes ``event:``/``data:`` blocks to it."""
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await resp.prepare(request)
    return resp


def json_ok(model: BaseModel, status: int = 200) -> web.Response:
    """A JSON response from a pydantic model."""
    return web.json_response(text=model.model_dump_json(), status=status)


def parse_frame_param(raw: str) -> int:
    """A frame number from a URL path: an optional ``-`` and ASCII digits, within Blender's bounds.

    Raises:
        ApiError: 400 naming ``frame``.
    """
    digits = raw[1:] if raw.startswith("-") else raw
    if not digits.isascii() or not digits.isdigit() or len(digits) > 8:
        raise ApiError(400, f"frame must be an integer, not {raw!r}", "frame")
    frame = int(raw)
    if not MIN_FRAME <= frame <= MAX_FRAME:
        raise ApiError(400, f"frame {frame} is outside {MIN_FRAME}..{MAX_FRAME}", "frame")
    return frame
