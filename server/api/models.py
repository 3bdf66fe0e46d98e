"""``/api/models``: upload a .blend or .zip package (streamed), read its metadata."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web
from sqlalchemy import select

from server.api.access import note, principal_of, target_of
from server.api.middleware import CTX, json_ok
from server.api.registry import route
from server.api.schemas import ModelList, ModelOut
from server.context import FarmContext
from server.errors import ApiError, not_found
from server.model_manager import ModelRejected, ingest
from server.persistence.tables import Model, new_id
from server.storage import StorageUnavailableError

log = logging.getLogger(__name__)

CHUNK = 1 << 20


def model_out(m: Model) -> ModelOut:
    """The API shape of a model row."""
    return ModelOut(
        id=m.id,
        filename=m.filename,
        kind=m.kind,  # type: ignore[arg-type]
        main=m.main,
        sha256=m.sha256,
        size_bytes=m.size_bytes,
        created_at=m.created_at.isoformat() + "Z",
        info=m.info,
        project_id=m.project_id,
    )


async def _receive(request: web.Request, dest: Path, max_bytes: int) -> tuple[str, int, str]:
    """Stream the upload into ``dest``; returns (filename, size in bytes, sha256).

    Accepts ``multipart/form-data`` (the first file part, field ``file``) or a raw
    body with ``?filename=``.

    Raises:
        ApiError: 413 past ``max_bytes``; 400 when no file or no filename is given.
    """
    if request.content_type == "multipart/form-data":
        reader = await request.multipart()
        part = await reader.next()
        while part is not None and not getattr(part, "filename", None):
            part = await reader.next()
        if part is None:
            raise ApiError(400, "multipart upload has no file part", "file")
        filename = part.filename or ""
        source: Any = part
    else:
        filename = request.query.get("filename", "")
        source = request.content
    if not filename:
        raise ApiError(
            400, "filename is required (?filename=scene.blend, or a multipart file name)", "filename"
        )
    h = hashlib.sha256()
    size = 0
    with open(dest, "wb") as fh:
        while True:
            chunk = await (source.read_chunk(CHUNK) if source is not request.content else source.read(CHUNK))
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise ApiError(413, f"upload is larger than the limit of {max_bytes} bytes", "file")
            h.update(chunk)
            await asyncio.to_thread(fh.write, chunk)
    if size == 0:
        raise ApiError(400, "the uploaded file is empty", "file")
    return filename, size, h.hexdigest()


@route(
    "POST",
    "/api/models",
    permission="model:create",
    summary="Upload a .blend or a .zip holding a .blend and its files; returns its metadata "
    "(201; 200 with the earlier model when the same content was uploaded before)",
    request_content="application/octet-stream, multipart/form-data",
    response=ModelOut,
    query={
        "filename": "name of the uploaded file (raw body)",
        "main": "the .blend to open inside a zip",
        "project": "the project (name or id) it belongs to; default the caller's only project",
    },
    scope="upload",
    status=201,
    also={200: "the same content was uploaded before: the earlier model"},
)
async def upload_model(request: web.Request) -> web.Response:
    """Stream, check and inspect an upload; nothing is kept when it is refused."""
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    limits = ctx.settings.limits
    work = Path(tempfile.mkdtemp(prefix="upload-", dir=ctx.settings.tmp_dir))
    try:
        raw = work / "upload.bin"
        filename, size, sha = await _receive(request, raw, limits.max_upload_bytes)
        project_id = target_of(request).project_id
        existing = await _same_model(ctx, sha, request.query.get("main") or None, project_id)
        if existing is not None:  # the same bytes again: no second copy, no second inspection
            note(request, f"model_id={existing.id}", sha256=sha, same_as_before=True)
            return json_ok(model_out(existing), status=200)
        try:
            async with ctx.inspect_slots:
                info = await ingest(
                    raw,
                    filename,
                    work / "model",
                    limits,
                    ctx.executor,
                    main=request.query.get("main") or None,
                )
        except ModelRejected as exc:
            raise ApiError(exc.status, exc.message, exc.field or "file") from exc
        model_id = new_id()
        meta = info.to_dict()
        for dep in meta.get("dependencies", []):
            if dep.get("outside_root"):  # never show the server's own paths
                dep["resolved"] = dep.get("path")
        safe_name = meta.get("filename") or "model.blend"
        key = f"models/{model_id}/{'package.zip' if info.kind == 'zip' else _key_name(safe_name)}"
        try:
            await ctx.storage.put_file(key, raw)
        except StorageUnavailableError as exc:
            log.error("model upload not stored: %s", exc)
            raise ApiError(503, "storage is unavailable; the upload was not kept, try again later") from None
        row = Model(
            id=model_id,
            filename=safe_name,
            kind=info.kind,
            main=info.main,
            sha256=sha,
            size_bytes=size,
            storage_key=key,
            info=meta,
            project_id=project_id,
            owner_id=principal_of(request).user_id,
        )
        async with ctx.db.session() as s:
            s.add(row)
            try:
                await s.commit()
            except Exception:
                await ctx.storage.delete(key)
                raise
        note(
            request, f"model_id={row.id}", filename=row.filename, sha256=row.sha256, size_bytes=row.size_bytes
        )
        return json_ok(model_out(row), status=201)
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)


async def _same_model(
    ctx: FarmContext, sha256: str, main: str | None, project_id: str | None
) -> Model | None:
    """An earlier upload to the same project of the same content that would open the same .blend, if any."""
    async with ctx.db.session() as s:
        q = select(Model).where(Model.sha256 == sha256, Model.project_id == project_id)
        rows = (await s.scalars(q.order_by(Model.created_at))).all()
    for m in rows:
        if (main is None and m.kind == "blend") or (main is not None and main == m.main):
            return m
    return None


def _key_name(filename: str) -> str:
    stem, ext = os.path.splitext(filename)
    safe = (
        "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in stem).strip("._-")
        or "model"
    )
    return f"{safe[:100]}{ext.lower() if ext.lower() in ('.blend', '.zip') else '.blend'}"


@route(
    "GET",
    "/api/models",
    permission="model:read",
    summary="List uploaded models of your projects, newest first",
    response=ModelList,
    scope="any",
)
async def list_models(request: web.Request) -> web.Response:
    """Newest 200 models."""
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    p = principal_of(request)
    q = select(Model).order_by(Model.created_at.desc()).limit(200)
    if not p.is_admin:
        q = q.where(Model.project_id.in_(p.projects_with("model:read")))
    async with ctx.db.session() as s:
        rows = (await s.scalars(q)).all()
    return json_ok(ModelList(models=[model_out(m) for m in rows]))


@route(
    "GET",
    "/api/models/{model_id}",
    permission="model:read",
    summary="A model and its metadata: scenes, cameras, frame range, engine, output, dependencies",
    response=ModelOut,
)
async def get_model(request: web.Request) -> web.Response:
    """One model."""
    ctx: FarmContext = request.app[CTX]  # type: ignore[assignment]
    model_id = request.match_info["model_id"]
    async with ctx.db.session() as s:
        m = await s.get(Model, model_id)
    if m is None:
        raise not_found("model", model_id)
    return json_ok(model_out(m))
