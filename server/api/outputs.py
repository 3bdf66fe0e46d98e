"""``/api/jobs/{job_id}/outputs``: stored frames, one by one or as a zip; ``/files/``: signed downloads."""

from __future__ import annotations

import asyncio
import os
import tempfile
import zipfile
from pathlib import Path

from aiohttp import web
from sqlalchemy import select

from server.api.middleware import CTX, json_ok, parse_frame_param
from server.api.registry import route
from server.api.schemas import OutputFrame, OutputList
from server.context import FarmContext
from server.errors import ApiError, not_found
from server.persistence.tables import Frame, Job
from server.storage.base import StorageKeyError


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
    """Built in a temp file (stored, not deflated: PNG/EXR/JPEG are compressed already)."""
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    job, frames = await _job_frames(ctx, request.match_info["job_id"])
    if not frames:
        raise ApiError(404, f"job {job.id} has no stored frames yet", "job_id")
    paths = [(f.filename, ctx.storage.local_path(f.storage_key)) for f in frames]
    fd, tmp = tempfile.mkstemp(suffix=".zip", dir=ctx.settings.tmp_dir)
    os.close(fd)

    def build() -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            for name, path in paths:
                if path is not None:
                    zf.write(path, name)

    try:
        await asyncio.to_thread(build)
        resp = web.StreamResponse(
            headers={
                "Content-Type": "application/zip",
                "Content-Disposition": f'attachment; filename="job-{job.id}.zip"',
                "Content-Length": str(os.path.getsize(tmp)),
            }
        )
        await resp.prepare(request)
        with open(tmp, "rb") as fh:
            while chunk := await asyncio.to_thread(fh.read, 1 << 20):
                await resp.write(chunk)
        await resp.write_eof()
        return resp
    finally:
        Path(tmp).unlink(missing_ok=True)


@route(
    "GET",
    "/api/jobs/{job_id}/outputs/{frame}",
    permission="output:read",
    summary="One stored frame (the image file)",
    response_content="application/octet-stream",
)
async def get_output(request: web.Request) -> web.StreamResponse:
    """The image of one frame; 404 when it is not stored (yet)."""
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    job_id, raw = request.match_info["job_id"], request.match_info["frame"]
    frame = parse_frame_param(raw)
    async with ctx.db.session() as s:
        if await s.get(Job, job_id) is None:
            raise not_found("job", job_id)
        f = await s.scalar(select(Frame).where(Frame.job_id == job_id, Frame.frame == frame))
    if f is None:
        raise ApiError(404, f"frame {frame} of job {job_id} is not stored", "frame")
    return _file_response(ctx, f.storage_key, f.filename)


def _file_response(ctx: FarmContext, key: str, filename: str) -> web.FileResponse:
    path = ctx.storage.local_path(key)
    if path is None or not path.is_file():
        raise ApiError(404, "object not found in storage")
    safe = "".join(c for c in filename if c.isalnum() or c in "._-") or "download"
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
