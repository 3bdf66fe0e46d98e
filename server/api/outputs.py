"""``/api/jobs/{job_id}/outputs``: stored frames, one by one or as a zip; ``/files/``: signed downloads.

With a storage that has local files (``file://``) a frame is served from its file; with
one that has none (S3) ``/api/jobs/{id}/outputs/{frame}`` answers 302 with a short-lived
presigned URL, and the zip streams the objects from storage into the response.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import zipfile
from collections.abc import AsyncIterator

from aiohttp import web
from sqlalchemy import select

from server.api.middleware import CTX, json_ok, parse_frame_param
from server.api.registry import route
from server.api.schemas import OutputFrame, OutputList
from server.context import FarmContext
from server.errors import ApiError, not_found
from server.persistence.tables import Frame, Job
from server.storage.base import (
    ObjectNotFoundError,
    StorageKeyError,
    StorageUnavailableError,
    download_name,
)

log = logging.getLogger(__name__)

REDIRECT_TTL_S = 300
"""Longest life of the presigned URL a frame download is redirected to, in seconds."""


async def _job_frames(ctx: FarmContext, job_id: str) -> tuple[Job, list[Frame]]:
    async with ctx.db.session() as s:
        job = await s.get(Job, job_id)
        if job is None:
            raise not_found("job", job_id)
        frames = (await s.scalars(select(Frame).where(Frame.job_id == job_id).order_by(Frame.frame))).all()
    return job, list(frames)


@route(
    "GET",
    "/api/jobs/{job_id}/outputs",
    permission="output:read",
    summary="The job's stored frames with download links (signed, expiring)",
    response=OutputList,
)
async def list_outputs(request: web.Request) -> web.Response:
    """Frames stored so far, in frame order."""
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    job, frames = await _job_frames(ctx, request.match_info["job_id"])
    ttl = ctx.settings.download_url_ttl_s
    return json_ok(
        OutputList(
            job_id=job.id,
            state=job.state,
            frames=[
                OutputFrame(
                    frame=f.frame,
                    filename=f.filename,
                    size_bytes=f.size_bytes,
                    sha256=f.sha256,
                    url=ctx.storage.signed_url(f.storage_key, ttl, f.filename),
                )
                for f in frames
            ],
            zip_url=f"/api/jobs/{job.id}/outputs.zip",
        )
    )


@route(
    "GET",
    "/api/jobs/{job_id}/outputs.zip",
    permission="output:read",
    summary="Every stored frame of the job in one zip",
    response_content="application/zip",
)
async def outputs_zip(request: web.Request) -> web.StreamResponse:
    """Streamed as it is read from storage (entries stored, not deflated: PNG/EXR/JPEG are
    compressed already; sizes and CRCs follow each entry, so no temp file is needed)."""
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    job, frames = await _job_frames(ctx, request.match_info["job_id"])
    if not frames:
        raise ApiError(404, f"job {job.id} has no stored frames yet", "job_id")
    # Open the first object before answering, so a storage that cannot be read is a
    # clean error rather than a cut-off zip.
    try:
        first = await ctx.storage.open_read(frames[0].storage_key)
    except ObjectNotFoundError:
        raise ApiError(404, f"frame {frames[0].frame} of job {job.id} is missing from storage") from None
    except StorageUnavailableError as exc:
        log.error("zip of job %s: %s", job.id, exc)
        raise ApiError(503, "storage is unavailable; try again later") from None
    resp = web.StreamResponse(
        headers={
            "Content-Type": "application/zip",
            "Content-Disposition": f'attachment; filename="job-{job.id}.zip"',
        }
    )
    sink = _ZipSink()
    async with contextlib.aclosing(first):
        await resp.prepare(request)
        try:
            await _write_zip(resp, sink, ctx, job, frames, first)
        except (ConnectionError, asyncio.CancelledError):
            raise  # the client went away
        except Exception:
            # Too late for an error status: cut the connection so the client sees a
            # failed download rather than a complete-looking, truncated zip.
            log.exception("zip of job %s failed while streaming", job.id)
            if request.transport is not None:
                request.transport.abort()
            return resp
        await resp.write_eof()
    return resp


async def _write_zip(
    resp: web.StreamResponse,
    sink: _ZipSink,
    ctx: FarmContext,
    job: Job,
    frames: list[Frame],
    first: AsyncIterator[bytes],
) -> None:
    """Write the zip of ``frames`` into ``resp`` (the first one already opened as ``first``)."""
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for i, f in enumerate(frames):
            try:
                chunks = first if i == 0 else await ctx.storage.open_read(f.storage_key)
            except ObjectNotFoundError:  # deleted since listed: leave it out, keep the others
                log.warning("frame %s of job %s is missing from storage", f.frame, job.id)
                continue
            info = zipfile.ZipInfo(download_name(f.filename), date_time=f.created_at.timetuple()[:6])
            info.compress_type = zipfile.ZIP_STORED
            info.file_size = f.size_bytes
            async with contextlib.aclosing(chunks):
                with zf.open(info, "w") as entry:
                    async for chunk in chunks:
                        entry.write(chunk)
                        await resp.write(sink.take())
            await resp.write(sink.take())
    await resp.write(sink.take())


class _ZipSink(io.RawIOBase):
    """A write-only, unseekable file that collects what ``zipfile`` writes until taken."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self._buf += b
        self._pos += len(b)
        return len(b)

    def tell(self) -> int:
        return self._pos

    def take(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out


@route(
    "GET",
    "/api/jobs/{job_id}/outputs/{frame}",
    permission="output:read",
    summary="One stored frame (the image file)",
    response_content="application/octet-stream",
    also={302: "storage without local files (S3): redirect to a presigned URL valid for 5 minutes"},
)
async def get_output(request: web.Request) -> web.StreamResponse:
    """The image of one frame; 404 when it is not stored (yet).

    Served from the file with local storage; with S3 a 302 to a presigned URL, so the
    bytes go from the store to the client directly.
    """
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    job_id, raw = request.match_info["job_id"], request.match_info["frame"]
    frame = parse_frame_param(raw)
    async with ctx.db.session() as s:
        if await s.get(Job, job_id) is None:
            raise not_found("job", job_id)
        f = await s.scalar(select(Frame).where(Frame.job_id == job_id, Frame.frame == frame))
    if f is None:
        raise ApiError(404, f"frame {frame} of job {job_id} is not stored", "frame")
    if ctx.storage.local_path(f.storage_key) is None:  # no local file (S3): send the client there
        ttl = min(ctx.settings.download_url_ttl_s, REDIRECT_TTL_S)
        raise web.HTTPFound(ctx.storage.signed_url(f.storage_key, ttl, f.filename))
    return _file_response(ctx, f.storage_key, f.filename)


def _file_response(ctx: FarmContext, key: str, filename: str) -> web.FileResponse:
    path = ctx.storage.local_path(key)
    if path is None or not path.is_file():
        raise ApiError(404, "object not found in storage")
    safe = download_name(filename)
    return web.FileResponse(path, headers={"Content-Disposition": f'attachment; filename="{safe}"'})


@route(
    "GET",
    "/files/{key:.+}",
    permission="public",
    summary="Download a stored object through a signed, expiring URL",
    response_content="application/octet-stream",
    query={"exp": "expiry (Unix seconds)", "sig": "signature", "name": "download file name"},
)
async def signed_file(request: web.Request) -> web.StreamResponse:
    """The signature binds the URL to one object and one expiry time."""
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    key = request.match_info["key"]
    verify = getattr(ctx.storage, "verify", None)
    try:
        ok = verify is not None and verify(key, request.query.get("exp", ""), request.query.get("sig", ""))
    except StorageKeyError:
        ok = False
    if not ok:
        raise ApiError(403, "download link is invalid or expired")
    return _file_response(ctx, key, request.query.get("name") or key.rsplit("/", 1)[-1])
