"""The REST API without rendering: validation, errors, agent leases, frames stored once."""

from __future__ import annotations

import io
from pathlib import Path

import aiohttp
import pytest
from openapi_spec_validator import validate
from PIL import Image
from sqlalchemy import func, select

from server.api.registry import ROUTES
from server.jobs import service as jobs_service
from server.persistence.tables import Frame, Model
from tests.conftest import REAL, Farm

pytestmark = pytest.mark.asyncio


async def _req(farm: Farm, method: str, path: str, token: str | None = None, **kw):  # type: ignore[no-untyped-def]
    """``(status, JSON body)`` of a request sent with ``token`` (default: the admin's; ``""``: none)."""
    headers = kw.pop("headers", {})
    if token != "":
        headers["Authorization"] = f"Bearer {token or farm.token}"
    async with farm.client.http.request(method, farm.url + path, headers=headers, **kw) as r:
        return r.status, await r.json(content_type=None)


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.agents(0)
async def test_openapi_describes_every_route_with_its_permission(farm: Farm) -> None:
    status, doc = await _req(farm, "GET", "/api/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    described = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    for info, _ in ROUTES:
        assert (info.method, info.path.replace("{key:.+}", "{key}")) in described
    for ops in doc["paths"].values():
        for op in ops.values():
            assert op["x-permission"]
    validate(doc)  # a valid OpenAPI 3.1 document
    assert doc["components"]["securitySchemes"]["agentToken"]["scheme"] == "bearer"
    assert doc["paths"]["/api/agent/tasks/{task_id}/claim"]["post"]["security"] == [{"agentToken": []}]
    assert set(doc["paths"]["/api/models"]["post"]["responses"]) >= {"200", "201", "4XX"}
    for required in (
        "/api/models",
        "/api/jobs",
        "/api/jobs/{job_id}/outputs.zip",
        "/api/tasks/{task_id}/status",
        "/healthz",
    ):
        assert required in doc["paths"]


@pytest.mark.agents(0)
async def test_healthz(farm: Farm) -> None:
    status, body = await _req(farm, "GET", "/healthz")
    assert status == 200 and body["database"] == "ok" and body["broker"] == "ok"


@pytest.mark.agents(0)
@pytest.mark.parametrize(
    ("body", "status", "field", "words"),
    [
        ({"model_id": "nope", "frames": "1-4"}, 404, "model_id", "not found"),
        ({"model_id": "x", "frames": "1-4", "chunk_size": 0}, 400, "chunk_size", "greater than or equal"),
        ({"model_id": "x", "frames": "1-4", "colour": "red"}, 400, "colour", "Extra inputs"),
        ({"model_id": "x", "frames": "1-4", "output_format": "GIF"}, 400, "output_format", "PNG"),
        ({"frames": "1-4"}, 400, "model_id", "required"),
    ],
)
async def test_bad_job_requests_name_the_field(
    farm: Farm, body: dict, status: int, field: str, words: str
) -> None:
    got, err = await _req(farm, "POST", "/api/jobs", json=body)
    assert got == status
    assert err["error"]["field"] == field
    assert words in err["error"]["message"]


@pytest.mark.agents(0)
async def test_non_json_body_is_400(farm: Farm) -> None:
    status, err = await _req(
        farm, "POST", "/api/jobs", data=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert status == 400 and "JSON" in err["error"]["message"]


@pytest.mark.agents(0)
async def test_unknown_objects_are_json_404(farm: Farm) -> None:
    for path in (
        "/api/jobs/abc",
        "/api/jobs/abc/tasks",
        "/api/jobs/abc/outputs",
        "/api/tasks/abc/status",
        "/api/models/abc",
        "/api/jobs/abc/outputs/1",
        "/api/nothing",
    ):
        status, err = await _req(farm, "GET", path)
        assert status == 404, path
        assert err["error"]["message"], path


async def _count_models(farm: Farm) -> int:
    async with farm.ctx.db.session() as s:
        return await s.scalar(select(func.count()).select_from(Model)) or 0


@pytest.mark.agents(0)
@pytest.mark.parametrize(
    ("content", "status", "words"),
    [
        (b"hello, this is not a blend file at all", 415, "not a .blend"),
        ((REAL / "corrupt_only_magic.blend").read_bytes(), 422, "corrupt"),
        (b"", 400, "empty"),
    ],
)
async def test_bad_uploads_are_refused_and_leave_nothing(
    farm: Farm, content: bytes, status: int, words: str
) -> None:
    got, err = await _req(farm, "POST", "/api/models?filename=scene.blend", data=content)
    assert got == status, err
    assert words in err["error"]["message"].lower()
    assert await _count_models(farm) == 0
    assert list(farm.settings.tmp_dir.iterdir()) == []
    models = farm.settings.data_dir / "storage" / "models"
    assert not models.exists() or list(models.iterdir()) == []


@pytest.mark.agents(0)
async def test_upload_without_filename_is_400(farm: Farm) -> None:
    status, err = await _req(farm, "POST", "/api/models", data=b"BLENDER")
    assert status == 400 and err["error"]["field"] == "filename"


@pytest.mark.agents(0)
async def test_upload_over_the_limit_is_413(farm: Farm) -> None:
    farm.settings.limits = type(farm.settings.limits)(max_upload_bytes=1000)
    status, err = await _req(
        farm, "POST", "/api/models?filename=big.blend", data=b"BLENDER-v279" + b"\0" * 5000
    )
    assert status == 413, err
    assert await _count_models(farm) == 0
    assert list(farm.settings.tmp_dir.iterdir()) == []


async def _queued_task(farm: Farm) -> tuple[str, str]:
    """``(job id, task id)`` of a new one-frame job, on a model row made without Blender."""
    async with farm.ctx.db.session() as s:
        m = Model(
            filename="a.blend", kind="blend", main="a.blend", sha256="0" * 64, size_bytes=1, storage_key="k"
        )
        s.add(m)
        await s.commit()
        model_id = m.id
    job = await jobs_service.create_job(farm.ctx, {"model_id": model_id, "frames": "1", "chunk_size": 1})
    [task] = await farm.client.tasks(job.id)
    return job.id, task["id"]


@pytest.mark.agents(0)
async def test_agent_routes_need_the_agent_token(farm: Farm) -> None:
    """No token 401, a user's token 403, another agent's token on a task leased to one 409
    (the agent drops it), a revoked agent token 401."""
    job_id, tid = await _queued_task(farm)
    claim = f"/api/agent/tasks/{tid}/claim"
    status, err = await _req(farm, "POST", claim, token="", json={})
    assert status == 401 and "authentication required" in err["error"]["message"]
    status, _ = await _req(farm, "POST", claim, token="wrong", json={})
    assert status == 401
    status, err = await _req(farm, "POST", claim, json={})  # the admin's personal token
    assert status == 403 and "agent token" in err["error"]["message"]

    sim = await farm.agent_token("sim")
    status, err = await _req(farm, "POST", claim, token=sim, json={})
    assert status == 409 and "not registered" in err["error"]["message"]  # an agent registers first
    sim = await farm.agent_token("sim", register=True)
    status, spec = await _req(farm, "POST", claim, token=sim, json={})
    assert status == 200 and spec["frames"] == [1]
    lease = spec["lease_id"]
    other = await farm.agent_token("other")
    for method, path, body in (
        ("POST", claim, {}),
        ("POST", f"/api/agent/tasks/{tid}/heartbeat", {"lease_id": lease}),
        ("POST", f"/api/agent/tasks/{tid}/result", {"lease_id": lease, "status": "failed", "message": "x"}),
    ):
        status, err = await _req(farm, method, path, token=other, json=body)
        assert status == 409, path
    status, _ = await _req(
        farm,
        "PUT",
        f"/api/agent/tasks/{tid}/frames/1?ext=.png&lease_id={lease}",
        token=other,
        data=_png((1, 2, 3)),
    )
    assert status == 409
    status, _ = await _req(
        farm, "POST", f"/api/agent/tasks/{tid}/heartbeat", token=sim, json={"lease_id": lease}
    )
    assert status == 200  # the lease is still sim's, untouched
    [task] = await farm.client.tasks(job_id)
    assert task["state"] == "running" and task["agent"] == "sim"

    _, listing = await _req(farm, "GET", "/api/tokens?kind=agent")
    row = [t for t in listing["tokens"] if t["agent_name"] == "sim"][-1]  # the registered one
    status, _ = await _req(farm, "DELETE", f"/api/tokens/{row['id']}")
    assert status == 200
    status, err = await _req(
        farm, "POST", f"/api/agent/tasks/{tid}/heartbeat", token=sim, json={"lease_id": lease}
    )
    assert status == 401 and "revoked" in err["error"]["message"]


@pytest.mark.blender
@pytest.mark.agents(0)
async def test_frames_are_stored_once_and_missing_frames_fail_the_task(
    farm: Farm, sample_blend: Path
) -> None:
    """An agent simulated over HTTP (no render needed): leases, duplicate uploads, missing frames."""
    farm.settings.task_failure_agents = 1  # the failure is final on the first agent (no retry on "other")
    token = await farm.agent_token("sim", register=True)
    model = await farm.client.upload_model(sample_blend)
    job = await farm.client.create_job(model_id=model["id"], frames="1-2", chunk_size=2)
    [task] = await farm.client.tasks(job["id"])
    tid = task["id"]

    status, spec = await _req(
        farm, "POST", f"/api/agent/tasks/{tid}/claim", token=token, json={"agent": "sim"}
    )
    assert status == 200 and spec["frames"] == [1, 2]
    status, _ = await _req(
        farm,
        "POST",
        f"/api/agent/tasks/{tid}/claim",
        token=await farm.agent_token("other", register=True),
        json={"agent": "other"},
    )
    assert status == 409  # already leased

    lease = spec["lease_id"]
    up = f"/api/agent/tasks/{tid}/frames/1?ext=.png&lease_id="
    status, _ = await _req(farm, "PUT", up + "stale", token=token, data=_png((255, 0, 0)))
    assert status == 409
    status, first = await _req(farm, "PUT", up + lease, token=token, data=_png((255, 0, 0)))
    assert status == 201
    status, second = await _req(farm, "PUT", up + lease, token=token, data=_png((0, 255, 0)))
    assert status == 200 and second["sha256"] == first["sha256"]  # the second copy was not stored
    status, _ = await _req(
        farm,
        "PUT",
        f"/api/agent/tasks/{tid}/frames/7?ext=.png&lease_id={lease}",
        token=token,
        data=_png((0, 0, 0)),
    )
    assert status == 400  # not a frame of this task
    exr = b"\x76\x2f\x31\x01" + bytes(100)
    status, err = await _req(farm, "PUT", up.replace(".png", ".exr") + lease, token=token, data=exr)
    assert status == 400 and err["error"]["field"] == "ext"
    status, err = await _req(farm, "PUT", up + lease, token=token, data=b"#!/bin/sh\nrm -rf /\n")
    assert status == 400 and "not a .png image" in err["error"]["message"]
    async with farm.ctx.db.session() as s:
        assert await s.scalar(select(func.count()).select_from(Frame)) == 1
    stored = list((farm.settings.data_dir / "storage" / "jobs" / job["id"] / "frames").iterdir())
    assert [p.name for p in stored] == ["frame_000001.png"]

    status, res = await _req(
        farm,
        "POST",
        f"/api/agent/tasks/{tid}/result",
        token=token,
        json={"lease_id": lease, "status": "completed", "log_tail": ["x"]},
    )
    assert status == 200 and res["state"] == "failed"
    assert "frames missing after render: 2" in res["message"]
    final = await farm.client.job(job["id"])
    assert final["state"] == "failed" and "2" in final["message"]
    status, _ = await _req(
        farm, "POST", f"/api/agent/tasks/{tid}/heartbeat", token=token, json={"lease_id": lease}
    )
    assert status == 409  # the lease ended with the result

    out = await farm.client.outputs(job["id"])
    assert [f["frame"] for f in out["frames"]] == [1]
    async with farm.client.http.get(farm.url + out["frames"][0]["url"]) as r:
        assert r.status == 200 and await r.read() == _png((255, 0, 0))
    async with farm.client.http.get(farm.url + out["frames"][0]["url"].replace("sig=", "sig=0")) as r:
        assert r.status == 403
    async with farm.client.http.get(farm.url + f"/api/jobs/{job['id']}/outputs.zip") as r:
        assert r.status == 401  # not a signed link: the archive needs a token
    async with farm.client.http.get(farm.url + f"/api/jobs/{job['id']}/outputs.zip", headers=farm.auth) as r:
        assert r.status == 200 and (await r.read())[:2] == b"PK"


@pytest.mark.blender
@pytest.mark.agents(0)
async def test_injection_in_scene_or_camera_names_is_refused(
    farm: Farm, sample_blend: Path, tmp_path: Path
) -> None:
    evil = f'x"); import os; os.system("touch {tmp_path}/pwned") #'
    model = await farm.client.upload_model(sample_blend)
    for field in ("scene", "camera"):
        status, err = await _req(
            farm, "POST", "/api/jobs", json={"model_id": model["id"], "frames": "1", field: evil}
        )
        assert status == 400 and err["error"]["field"] == field
        assert evil in err["error"]["message"]
    assert not (tmp_path / "pwned").exists()


@pytest.mark.blender
@pytest.mark.agents(0)
async def test_cancel_of_a_queued_job_and_of_a_finished_one(farm: Farm, sample_blend: Path) -> None:
    model = await farm.client.upload_model(sample_blend)
    job = await farm.client.create_job(model_id=model["id"], frames="1-4", chunk_size=1)
    canceled = await farm.client.cancel(job["id"])
    assert canceled["state"] == "canceled" and canceled["tasks"]["canceled"] == 4
    status, err = await _req(farm, "POST", f"/api/jobs/{job['id']}/cancel")
    assert status == 409 and "already finished" in err["error"]["message"]
    [task, *_] = await farm.client.tasks(job["id"])
    status, _ = await _req(
        farm,
        "POST",
        f"/api/agent/tasks/{task['id']}/claim",
        token=await farm.agent_token("late", register=True),
        json={"agent": "late"},
    )
    assert status == 409  # a canceled task is not handed out


@pytest.mark.blender
@pytest.mark.agents(0)
async def test_multipart_upload_and_model_metadata(farm: Farm, sample_blend: Path) -> None:
    form = aiohttp.FormData()
    form.add_field(
        "file",
        sample_blend.read_bytes(),
        filename="shot 010 ñ.blend",
        content_type="application/octet-stream",
    )
    status, model = await _req(farm, "POST", "/api/models", data=form)
    assert status == 201, model
    assert model["kind"] == "blend" and model["filename"].endswith(".blend")
    info = model["info"]
    assert info["version"] == "5.0" and info["compression"] == "none"
    [scene] = info["scenes"]
    assert scene["camera"] == "Camera" and scene["renderable"]
    assert (scene["frame_start"], scene["frame_end"]) == (1, 24)
    assert (scene["resolution_x"], scene["resolution_y"]) == (320, 240)
    assert scene["engine"] == "CYCLES" and scene["output_format"] == "PNG"
    status, again = await _req(farm, "GET", f"/api/models/{model['id']}")
    assert status == 200 and again == model
    status, listing = await _req(farm, "GET", "/api/models")
    assert [m["id"] for m in listing["models"]] == [model["id"]]


@pytest.mark.agents(0)
async def test_requests_a_web_page_could_forge_are_refused(farm: Farm) -> None:
    body = {"model_id": "x", "frames": "1"}
    status, err = await _req(farm, "POST", "/api/jobs", json=body, headers={"Origin": "http://evil.example"})
    assert status == 403 and "cross-origin" in err["error"]["message"]
    status, err = await _req(
        farm, "POST", "/api/models?filename=a.blend", data=b"BLENDER", headers={"Origin": "null"}
    )
    assert status == 403
    status, err = await _req(
        farm,
        "POST",
        "/api/jobs",
        data=b'{"model_id": "x", "frames": "1"}',
        headers={"Content-Type": "text/plain"},
    )
    assert status == 415 and "application/json" in err["error"]["message"]
    status, err = await _req(farm, "GET", "/api/jobs", headers={"Host": "evil.example"})
    assert status == 421 and "evil.example" in err["error"]["message"]
    # the farm's own origin and plain API clients (no Origin) pass
    own = farm.url
    status, err = await _req(farm, "POST", "/api/jobs", json=body, headers={"Origin": own})
    assert status == 404 and err["error"]["field"] == "model_id"


@pytest.mark.blender
@pytest.mark.agents(0)
async def test_same_upload_twice_is_one_model_and_huge_frames_are_refused(
    farm: Farm, sample_blend: Path
) -> None:
    first = await farm.client.upload_model(sample_blend)
    status, second = await _req(
        farm, "POST", "/api/models?filename=other.blend", data=sample_blend.read_bytes()
    )
    assert status == 200 and second["id"] == first["id"]
    stored = list((farm.settings.data_dir / "storage" / "models").iterdir())
    assert len(stored) == 1
    body = {"model_id": first["id"], "frames": "1", "resolution_x": 65536, "resolution_y": 65536}
    status, err = await _req(farm, "POST", "/api/jobs", json=body)
    assert (
        status == 400 and "65536x65536" in err["error"]["message"] and err["error"]["field"] == "resolution_x"
    )
    body = {"model_id": first["id"], "frames": "1", "resolution_percentage": 1000}
    status, err = await _req(farm, "POST", "/api/jobs", json=body)
    assert status == 201  # 3200x2400 is fine


@pytest.mark.agents(0)
async def test_out_of_range_numbers_are_400_not_500(farm: Farm) -> None:
    job_id, _ = await _queued_task(farm)  # a real job: the job is looked up (permission) before the frame
    for frame in ("999999999999999999999999", "-99999999999", "١"):
        path = f"/api/jobs/{job_id}/outputs/{frame}"
        status, err = await _req(farm, "GET", path)
        assert status == 400 and err["error"]["field"] == "frame", path
    token = await farm.agent_token("a1")
    status, err = await _req(
        farm,
        "POST",
        "/api/agent/tasks/x/heartbeat",
        token=token,
        json={"lease_id": "l", "current_frame": 10**30},
    )
    assert status == 400 and err["error"]["field"] == "current_frame"
    status, err = await _req(
        farm,
        "POST",
        "/api/agent/tasks/x/result",
        token=token,
        data=b'{"lease_id": "l", "status": "failed", "render_seconds": NaN}',
        headers={"Content-Type": "application/json"},
    )
    assert status == 400
    status, err = await _req(
        farm, "POST", "/api/jobs", json={"model_id": "m", "frames": "1", "chunk_size": True}
    )
    assert status == 400 and err["error"]["field"] == "chunk_size"
    status, err = await _req(farm, "GET", "/api/jobs?state=bogus")
    assert status == 400 and err["error"]["field"] == "state"


@pytest.mark.blender
@pytest.mark.agents(0)
async def test_odd_upload_names_are_stored_safely(farm: Farm, sample_blend: Path) -> None:
    for name in ("-dash.blend", "my shot (v2) ñ.BLEND"):
        data = sample_blend.read_bytes() + b"\0" * len(name)  # distinct bytes, so no reuse
        status, model = await _req(farm, "POST", "/api/models", params={"filename": name}, data=data)
        assert status in (201, 422), model  # padded file may be refused as corrupt, but never a 500
