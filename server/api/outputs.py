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
import tempfile
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

from aiohttp import web
from PIL import Image, UnidentifiedImageError
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
THUMBNAIL_SIZES = (16, 1024)
"""Smallest and largest ``size`` (longest side, pixels) of a thumbnail."""
THUMBNAIL_DEFAULT = 256
"""Longest side of a thumbnail when no ``size`` is asked for, in pixels."""
THUMBNAIL_FORMATS = ("PNG", "JPEG")
"""The frame formats a thumbnail is made of (Pillow format names); others answer 415."""
THUMBNAIL_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")
"""Signatures of those formats: a frame read from remote storage that starts otherwise is refused
after its first chunk, before the rest is downloaded."""
SPOOL_MEMORY = 8 << 20
"""A frame read from remote storage for a thumbnail stays in memory up to this many bytes, then
goes to a temporary file."""


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
    f = await _stored_frame(ctx, request)
    if ctx.storage.local_path(f.storage_key) is None:  # no local file (S3): send the client there
        ttl = min(ctx.settings.download_url_ttl_s, REDIRECT_TTL_S)
        raise web.HTTPFound(ctx.storage.signed_url(f.storage_key, ttl, f.filename))
    return _file_response(ctx, f.storage_key, f.filename)


async def _stored_frame(ctx: FarmContext, request: web.Request) -> Frame:
    """The ``Frame`` row named by the path's ``{job_id}`` and ``{frame}``.

    Raises:
        ApiError: 400 naming ``frame`` for a frame number that is not one; 404 for an unknown
            job, or (naming ``frame``) for a frame that is not stored.
    """
    job_id, raw = request.match_info["job_id"], request.match_info["frame"]
    frame = parse_frame_param(raw)
    async with ctx.db.session() as s:
        if await s.get(Job, job_id) is None:
            raise not_found("job", job_id)
        f = await s.scalar(select(Frame).where(Frame.job_id == job_id, Frame.frame == frame))
    if f is None:
        raise ApiError(404, f"frame {frame} of job {job_id} is not stored", "frame")
    return f


@route(
    "GET",
    "/api/jobs/{job_id}/outputs/{frame}/thumbnail",
    permission="output:read",
    summary="A small PNG of one stored frame (PNG or JPEG frames; 415 for OpenEXR)",
    response_content="image/png",
    query={
        "size": f"longest side in pixels, {THUMBNAIL_SIZES[0]}-{THUMBNAIL_SIZES[1]} "
        f"(default {THUMBNAIL_DEFAULT})"
    },
    integer_query=("size",),
    also={415: "the frame's format has no thumbnail (OpenEXR) or the file cannot be read"},
)
async def get_thumbnail(request: web.Request) -> web.Response:
    """The frame scaled down (aspect ratio kept, never up) to ``size`` pixels on its longest side,
    as PNG (RGB, or RGBA when the frame has alpha); private and cacheable for an hour, since a
    stored frame never changes.

    Decoded and encoded in a worker thread. A frame of local storage is read from its file; one
    of remote storage (S3) is downloaded into memory, or a temporary file past ``SPOOL_MEMORY``.
    """
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    size = _thumbnail_size(request.query.get("size"))
    f = await _stored_frame(ctx, request)
    full = f"/api/jobs/{f.job_id}/outputs/{f.frame}"
    path = ctx.storage.local_path(f.storage_key)
    try:
        if path is not None:
            if not path.is_file():
                raise ObjectNotFoundError(f.storage_key)
            png = await asyncio.to_thread(_thumbnail_png, path, size)
        else:
            with tempfile.SpooledTemporaryFile(SPOOL_MEMORY) as spool:
                await _download(ctx, f.storage_key, spool)
                png = await asyncio.to_thread(_thumbnail_png, spool, size)
    except ObjectNotFoundError:
        raise ApiError(404, f"frame {f.frame} of job {f.job_id} is missing from storage", "frame") from None
    except StorageUnavailableError as exc:
        log.error("thumbnail of frame %s of job %s: %s", f.frame, f.job_id, exc)
        raise ApiError(503, "storage is unavailable; try again later") from None
    except _NoThumbnail as exc:
        raise ApiError(
            415,
            f"no thumbnail can be made for this format ({f.filename}: {exc}); the full frame is at {full}",
            "frame",
        ) from None
    return web.Response(
        body=png, content_type="image/png", headers={"Cache-Control": "private, max-age=3600"}
    )


class _NoThumbnail(Exception):
    """The frame is not a PNG or JPEG image Pillow can read (the message says why)."""


def _thumbnail_size(raw: str | None) -> int:
    """The ``size`` query parameter: ASCII digits within :data:`THUMBNAIL_SIZES`.

    Raises:
        ApiError: 400 naming ``size``.
    """
    if raw is None:
        return THUMBNAIL_DEFAULT
    low, high = THUMBNAIL_SIZES
    if not raw.isascii() or not raw.isdigit() or len(raw) > 6:
        raise ApiError(400, f"size must be an integer from {low} to {high}, not {raw!r}", "size")
    size = int(raw)
    if not low <= size <= high:
        raise ApiError(400, f"size must be from {low} to {high} pixels, not {size}", "size")
    return size


async def _download(ctx: FarmContext, key: str, sink: IO[bytes]) -> None:
    """Copy the object ``key`` into ``sink`` (writes in a worker thread, as they may go to disk).

    Raises:
        ObjectNotFoundError, StorageUnavailableError: from the storage.
        _NoThumbnail: when its first bytes are not a PNG or JPEG signature (the rest is not read).
    """
    checked = False
    chunks = await ctx.storage.open_read(key)
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            await asyncio.to_thread(sink.write, chunk)
            if not checked and sink.tell() >= len(THUMBNAIL_MAGIC[0]):
                checked = True
                sink.seek(0)
                head = sink.read(len(THUMBNAIL_MAGIC[0]))
                sink.seek(0, io.SEEK_END)
                if not head.startswith(THUMBNAIL_MAGIC):
                    raise _NoThumbnail("not a PNG or JPEG file")
    sink.seek(0)


def _thumbnail_png(src: Path | IO[bytes], size: int) -> bytes:
    """``src`` (a PNG or JPEG image) scaled to fit ``size`` x ``size`` pixels, encoded as PNG.

    Blocking: run it in a worker thread. Frames with alpha give RGBA, others RGB (16-bit gray
    is scaled to 8 bits).

    Raises:
        _NoThumbnail: another format, a file Pillow cannot decode, or one over Pillow's
            decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``).
        ObjectNotFoundError: ``src`` is a path to no file.
    """
    try:
        with Image.open(src, formats=THUMBNAIL_FORMATS) as im:
            if im.mode in ("1", "P", "PA"):  # resized by nearest neighbour otherwise
                im = im.convert("RGBA" if im.has_transparency_data else "RGB")
            im.thumbnail((size, size))
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                im = im.convert("I").point(lambda v: v * (1 / 256)).convert("L")
            alpha = "A" in im.getbands() or "transparency" in im.info
            im = im.convert("RGBA" if alpha else "RGB")
            out = io.BytesIO()
            im.save(out, "PNG")
            return out.getvalue()
    except UnidentifiedImageError:
        raise _NoThumbnail("not a PNG or JPEG image") from None
    except Image.DecompressionBombError:
        raise _NoThumbnail("too many pixels to decode") from None
    except FileNotFoundError:  # deleted since it was looked up
        raise ObjectNotFoundError(str(src)) from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise _NoThumbnail(f"the image cannot be decoded: {exc}") from None


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
