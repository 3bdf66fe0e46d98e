"""``GET /api/jobs/{job_id}/outputs/{frame}/thumbnail``: small PNGs of frames Blender really rendered."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageStat

from server.errors import not_found
from tests.conftest import Farm, farm_on
from tests.s3server import make_bucket

pytestmark = [pytest.mark.asyncio, pytest.mark.blender]

WIDTH, HEIGHT = 64, 40
"""Resolution of the rendered frames: tiny, and not square, so that the aspect ratio shows."""


async def _get(farm: Farm, path: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """``(status, headers, body)`` of ``GET path`` with ``token`` (default: the admin's)."""
    headers = {"Authorization": f"Bearer {token or farm.token}"}
    async with farm.client.http.get(farm.url + path, headers=headers) as r:
        return r.status, dict(r.headers), await r.read()


async def _error(farm: Farm, path: str, token: str | None = None) -> tuple[int, dict[str, Any]]:
    """``(status, the "error" object)`` of a request that must fail with a JSON error body."""
    status, headers, body = await _get(farm, path, token)
    assert headers["Content-Type"].startswith("application/json"), (status, body[:200])
    return status, json.loads(body)["error"]


def _image(body: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(body))
    im.load()
    return im


@pytest.mark.parametrize("storage", ["file", "s3"])
async def test_thumbnails_of_rendered_png_jpeg_and_exr_frames(
    storage: str, sample_blend: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """On local storage the frame is read from its file; on S3 (moto) it is downloaded first."""
    url = make_bucket(request.getfixturevalue("s3_endpoint")) if storage == "s3" else ""
    async with farm_on(tmp_path, agents=1, storage_url=url) as farm:
        await _rendered_thumbnails(farm, sample_blend)


async def _rendered_thumbnails(farm: Farm, sample_blend: Path) -> None:
    model = await farm.client.upload_model(sample_blend)
    jobs = {
        fmt: await farm.client.create_job(
            model_id=model["id"],
            frames="1",
            samples=1,
            resolution_x=WIDTH,
            resolution_y=HEIGHT,
            resolution_percentage=100,
            output_format=fmt,
        )
        for fmt in ("PNG", "JPEG", "OPEN_EXR")
    }
    for fmt, job in jobs.items():
        final = await asyncio.wait_for(farm.client.wait(job["id"], poll_s=0.2), 300)
        assert final["state"] == "completed", (fmt, final)

    # PNG: the thumbnail is the frame, scaled down with its aspect ratio kept
    png = f"/api/jobs/{jobs['PNG']['id']}/outputs/1"
    status, _, full = await _get(farm, png)
    assert status == 200
    frame = _image(full)
    assert frame.format == "PNG" and frame.size == (WIDTH, HEIGHT)
    status, headers, body = await _get(farm, f"{png}/thumbnail?size=32")
    assert status == 200, body[:300]
    assert headers["Content-Type"] == "image/png"
    assert headers["Cache-Control"] == "private, max-age=3600"
    thumb = _image(body)
    assert thumb.format == "PNG" and thumb.mode in ("RGB", "RGBA")
    assert thumb.size == (32, 20)  # longest side 32, 64:40 kept
    # the same picture: mean colour within a few levels of the frame's
    want = ImageStat.Stat(frame.convert("RGB")).mean
    got = ImageStat.Stat(thumb.convert("RGB")).mean
    assert all(abs(a - b) < 4 for a, b in zip(want, got, strict=True)), (want, got)
    # the default size (256) is larger than the frame: it is not scaled up, and it is the frame
    status, _, body = await _get(farm, f"{png}/thumbnail")
    assert status == 200
    same = _image(body)
    assert same.size == (WIDTH, HEIGHT)
    assert same.tobytes() == frame.convert(same.mode).tobytes()

    # JPEG: a PNG thumbnail, RGB
    jpeg = f"/api/jobs/{jobs['JPEG']['id']}/outputs/1"
    status, _, full = await _get(farm, jpeg)
    assert status == 200 and _image(full).format == "JPEG"
    status, headers, body = await _get(farm, f"{jpeg}/thumbnail?size=16")
    assert status == 200 and headers["Content-Type"] == "image/png", body[:300]
    thumb = _image(body)
    assert (thumb.format, thumb.mode, thumb.size) == ("PNG", "RGB", (16, 10))

    # OpenEXR: Pillow cannot read it; the message points at the full frame
    exr = f"/api/jobs/{jobs['OPEN_EXR']['id']}/outputs/1"
    status, _, full = await _get(farm, exr)
    assert status == 200 and full[:4] == b"\x76\x2f\x31\x01"  # it is stored, and it is OpenEXR
    status, err = await _error(farm, f"{exr}/thumbnail?size=64")
    assert status == 415 and err["status"] == 415, err
    assert "no thumbnail can be made for this format" in err["message"], err
    assert exr in err["message"], err


@pytest.mark.agents(0)
async def test_thumbnail_errors_and_another_projects_job(farm: Farm, sample_blend: Path) -> None:
    """Bad sizes 400 naming ``size``; a frame not stored 404 naming ``frame``; a job of a project the
    caller has no role in 404 exactly as a missing job, while a member of its project gets further."""
    model = await farm.client.upload_model(sample_blend)
    job = await farm.client.create_job(model_id=model["id"], frames="1")  # queued: nothing is stored
    base = f"/api/jobs/{job['id']}/outputs/1/thumbnail"
    for size in ("0", "abc", "15", "1025", "-5", "1e3", "", "١٠٠"):
        status, err = await _error(farm, f"{base}?size={size}")
        assert status == 400 and err["field"] == "size", (size, err)
    status, err = await _error(farm, base)
    assert status == 404 and err["field"] == "frame" and "not stored" in err["message"], err
    status, err = await _error(farm, f"/api/jobs/{job['id']}/outputs/x/thumbnail")
    assert status == 400 and err["field"] == "frame", err
    missing = "0" * 32
    status, err = await _error(farm, f"/api/jobs/{missing}/outputs/1/thumbnail")
    assert status == 404 and {"error": err} == not_found("job", missing).to_dict(), err

    # a viewer of the job's project, and a viewer of another project only
    tokens = {}
    for project, user in (("default", "viewer_in"), ("elsewhere", "viewer_out")):
        if project != "default":
            async with farm.client.http.post(
                farm.url + "/api/projects", json={"name": project}, headers=farm.auth
            ) as r:
                assert r.status == 201, await r.text()
        async with farm.client.http.post(
            farm.url + "/api/users",
            json={"username": user, "password": "thumbs-password-01"},
            headers=farm.auth,
        ) as r:
            assert r.status == 201, await r.text()
        async with farm.client.http.put(
            farm.url + f"/api/projects/{project}/members/{user}", json={"role": "viewer"}, headers=farm.auth
        ) as r:
            assert r.status == 200, await r.text()
        async with farm.client.http.post(
            farm.url + "/api/auth/login", json={"username": user, "password": "thumbs-password-01"}
        ) as r:
            assert r.status == 200, await r.text()
            tokens[user] = (await r.json())["access_token"]
    status, err = await _error(farm, base, tokens["viewer_in"])
    assert status == 404 and err["field"] == "frame", err  # past the access check, to the frame
    status, err = await _error(farm, base, tokens["viewer_out"])
    assert status == 404 and {"error": err} == not_found("job", job["id"]).to_dict(), err
