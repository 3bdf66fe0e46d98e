"""The Blender add-on in real Blender (bpy 5.0.1): the zip that `renderfarm addon build` makes is
installed and enabled as an extension, then drives a live farm (the in-process farm fixture with
a real local agent rendering with real Blender).

Each scenario runs tests/addon_driver.py in its own Blender process with a private
BLENDER_USER_RESOURCES, and with the venv's blender-asset-tracer hidden, so the add-on packs
with the wheel it bundles."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from cli.farm import free_port
from tests.conftest import Farm

RENDERFARM = str(Path(sys.executable).with_name("renderfarm"))
DRIVER = Path(__file__).with_name("addon_driver.py")
PASSWORD = "ada-Lovelace-1843"
pytestmark = [pytest.mark.blender, pytest.mark.slow]


@pytest.fixture(scope="module")
def addon_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's `renderfarm addon build` (Blender's builder, then Blender's validation)."""
    out = tmp_path_factory.mktemp("addon")
    res = subprocess.run(
        [RENDERFARM, "addon", "build", "-o", str(out)], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    path = Path(res.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.parent == out.resolve()
    return path


async def artist(farm: Farm, name: str = "ada") -> str:
    """An artist of project ``default``; returns the user name (password :data:`PASSWORD`)."""
    await farm.client.create_user(name, PASSWORD)
    await farm.client.set_member("default", name, "artist")
    return name


async def drive(
    tmp_path: Path, zip_path: Path, scenario: str, *, stdin_hook: Any = None, **args: Any
) -> dict[str, Any]:
    """Run one driver scenario in a Blender process; returns its RESULT (asserting it exited 0).
    The farm keeps serving on this event loop meanwhile. ``stdin_hook`` is awaited when the
    driver prints READY-REVOKE, then the driver goes on."""
    user = tmp_path / f"blender-user-{scenario}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RENDERFARM_")}
    env["BLENDER_USER_RESOURCES"] = str(user)
    env["HOME"] = str(tmp_path / "home")
    tmp = tmp_path / f"tmp-{scenario}"
    tmp.mkdir()
    env["TMPDIR"] = str(tmp)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(DRIVER),
        str(zip_path),
        scenario,
        json.dumps(args),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    lines: list[str] = []
    assert proc.stdout is not None and proc.stdin is not None
    try:
        async with asyncio.timeout(400):
            while raw := await proc.stdout.readline():
                line = raw.decode(errors="replace").rstrip("\n")
                lines.append(line)
                if line == "READY-REVOKE":
                    await stdin_hook()
                    proc.stdin.write(b"go\n")
                    await proc.stdin.drain()
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    out = "\n".join(lines)
    assert proc.returncode == 0, out[-6000:]
    results = [ln for ln in lines if ln.startswith("RESULT: ")]
    assert results, out[-6000:]
    # no temporary copy, pack or download part is left behind
    assert [p.name for p in tmp.iterdir() if p.name.startswith("renderfarm-")] == []
    return json.loads(results[-1][len("RESULT: ") :])


def test_the_built_zip_is_an_extension_with_the_bat_wheel(addon_zip: Path) -> None:
    with zipfile.ZipFile(addon_zip) as zf:
        names = set(zf.namelist())
        manifest = zf.read("blender_manifest.toml").decode()
    assert {
        "blender_manifest.toml",
        "__init__.py",
        "wheels/blender_asset_tracer-1.23-py3-none-any.whl",
    } <= names
    assert not any("__pycache__" in n for n in names)
    assert 'schema_version = "1.0.0"' in manifest and 'blender_version_min = "4.2.0"' in manifest
    assert "network = " in manifest and "files = " in manifest


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--blender", "/bin/true"], "no zip was made"),
        (["--blender", "/nonexistent/blender"], "no such program"),
        (["-o", "/etc/hostname/sub"], "cannot be made"),
    ],
)
def test_addon_build_errors_are_messages(tmp_path: Path, args: list[str], message: str) -> None:
    argv = [RENDERFARM, "addon", "build", *(["-o", str(tmp_path / "out")] if "-o" not in args else []), *args]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert message in " ".join(res.stderr.split()) and "Traceback" not in res.stderr


def test_a_wheel_with_another_hash_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "blender_asset_tracer-1.23-py3-none-any.whl"
    fake.write_bytes(b"not the wheel")
    res = subprocess.run(
        [RENDERFARM, "addon", "build", "-o", str(tmp_path / "out"), "--wheel", str(fake)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert "is not the pinned" in " ".join(res.stderr.split())
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


async def test_a_scene_linking_a_library_renders_on_the_farm_from_a_script(
    farm: Farm, tmp_path: Path, addon_zip: Path, corpus: Path
) -> None:
    """linked_cube.blend (it links basic_file.blend) with an unsaved camera: bpy.ops.render_farm.submit
    with keyword arguments, wait and download; the artist's file is left as it was."""
    name = await artist(farm)
    r = await drive(
        tmp_path,
        addon_zip,
        "linked",
        server=farm.url,
        username=name,
        password=PASSWORD,
        blend=str(corpus / "linked_cube.blend"),
        download=str(tmp_path / "frames"),
    )
    assert r["bat_from"].startswith(str(tmp_path / "blender-user-linked")), r["bat_from"]
    assert r["credentials_mode"] == "0o600"
    assert PASSWORD not in r["credentials_text"] and "rfp_" in r["credentials_text"]
    assert r["ok"], r["error"]
    assert r["state"] == "completed"
    # the unsaved camera went with the upload (without it the farm refuses the scene), and the
    # artist's own file, its folder and its unsaved state are as they were
    assert r["dirty_before"] and r["dirty_after"]
    assert r["file_untouched"]
    assert r["filepath_after"] == str(corpus / "linked_cube.blend")
    job = await farm.client.job(r["job_id"])
    assert job["owner"] == name and job["frame_count"] == 2 and job["overrides"].get("samples") == 4
    model = await farm.client._json("GET", f"/api/models/{job['model_id']}")
    deps = {Path(d["path"]).name: d for d in model["info"]["dependencies"]}
    assert "basic_file.blend" in deps and not deps["basic_file.blend"]["missing"], model["info"][
        "dependencies"
    ]
    assert model["info"]["missing"] == []
    frames = sorted(Path(r["download_dir"]).iterdir())
    assert Path(r["download_dir"]) == tmp_path / "frames" / r["job_id"]
    assert [f.suffix for f in frames] == [".png", ".png"]
    for f in frames:
        with Image.open(f) as im:
            assert im.size == (64, 48)
            low, high = im.convert("L").getextrema()
            assert high - low > 10  # the cube, not an empty frame
    assert r["frame_states"] == {"1": "done", "2": "done"}
    assert r["thumbnail_frame"] in (1, 2) and Path(r["thumbnail"]).is_file()


async def test_missing_library_is_reported_before_upload_then_allowed(
    farm: Farm, tmp_path: Path, addon_zip: Path, corpus: Path
) -> None:
    """doubly_linked.blend misses material_textures.blend: nothing is uploaded until the artist
    allows missing files; then it renders."""
    name = await artist(farm)
    before = len((await farm.client._json("GET", "/api/models"))["models"])
    r = await drive(
        tmp_path,
        addon_zip,
        "missing",
        server=farm.url,
        username=name,
        password=PASSWORD,
        blend=str(corpus / "doubly_linked.blend"),
        download=str(tmp_path / "frames"),
    )
    assert not r["first_ok"]
    assert r["first_submission"] == "missing"
    assert r["missing"] == [str(corpus / "material_textures.blend")]
    assert "material_textures.blend" in r["first_error"] and "allow_missing" in r["first_error"]
    assert r["ok"], r["error"]
    assert r["state"] == "completed"
    models = (await farm.client._json("GET", "/api/models"))["models"]
    assert len(models) == before + 1  # only the allowed submission uploaded anything
    assert len(list(Path(r["download_dir"]).glob("*.png"))) == 1


async def test_the_panel_path_works_off_the_main_thread(
    farm: Farm, tmp_path: Path, addon_zip: Path, corpus: Path
) -> None:
    """Render on Farm as the button does it (invoke): packing and network in worker threads, news
    through the timer on the main thread; then the job, its frames, thumbnail, download, Open in
    Image Editor and the recent jobs."""
    name = await artist(farm)
    r = await drive(
        tmp_path,
        addon_zip,
        "panel",
        server=farm.url,
        username=name,
        password=PASSWORD,
        blend=str(corpus / "linked_cube.blend"),
        download=str(tmp_path / "dl"),
    )
    assert r["invoke"] == ["FINISHED"]
    print(f"main thread held {r['invoke_s']:.3f} s of a {r['submit_s']:.2f} s submission")
    assert r["busy_after_invoke"], r  # the operator returned before the work was done
    assert r["stage"] == "submitted", r["text"]
    assert {"packing", "submitted"} <= set(r["stages"]), r["stages"]
    assert r["worker_threads"] >= 1 and not r["worker_on_main"]
    assert r["state"] == "completed" and r["frame_states"] == {"3": "done"}
    assert r["active_job"] == r["job_id"]
    with Image.open(r["thumbnail"]) as im:
        assert max(im.size) <= 256
    # (its icon id is 0 here: background Blender makes no icons, so the drawn preview is not checked)
    assert [Path(p).parent for p in r["downloaded"]] == [tmp_path / "dl" / r["job_id"]]
    assert r["image_size"] == [64, 48]
    assert r["recent"] and r["recent"][0] == r["job_id"]
    assert r["panels"] == ["RENDERFARM_PT_render_farm", "RENDERFARM_PT_job", "RENDERFARM_PT_recent"]
    assert r["panel_context"] == "output"
    # the panels' draw code ran in each state against Blender's RNA (properties, operators, icons)
    assert "operator:Render on Farm" in r["drawn_idle"] and "prop:project" in r["drawn_idle"]
    assert any(c.startswith("progress:") for c in r["drawn_busy"]), r["drawn_busy"]
    done = r["drawn_done"]
    assert {"operator:Download", "operator:Open in Image Editor", "operator:Cancel"} <= set(done), done
    assert "label:Latest finished frame: 3" in done, done  # (the icon itself needs a UI: see above)
    assert "label:3: done" in done, done


def test_the_addon_passes_the_type_checker() -> None:
    """mypy against fake-bpy-module's stubs of Blender 5.0 (pyproject's [tool.mypy])."""
    res = subprocess.run(
        [str(Path(sys.executable).with_name("mypy"))],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[1],
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no issues found" in res.stdout


async def test_errors_reach_the_artist(farm: Farm, tmp_path: Path, addon_zip: Path, corpus: Path) -> None:
    """Refused upload (the server's message as is), a bad frame spec, a revoked token (log in
    again), an unreachable server, a wrong password."""
    name = await artist(farm)

    async def revoke() -> None:
        async with __import__("cli.client", fromlist=["FarmClient"]).FarmClient(farm.url) as c:
            session = await c.login(name, PASSWORD)
            c.token = session["access_token"]
            for t in await c.tokens():
                if t["name"].startswith("Blender on") and not t.get("revoked_at"):
                    await c.revoke_token(t["id"])

    dead = f"http://127.0.0.1:{free_port()}"
    models_before = len((await farm.client._json("GET", "/api/models"))["models"])
    limits = dataclasses.replace(farm.ctx.settings.limits, max_upload_bytes=1000)
    object.__setattr__(farm.ctx.settings, "limits", limits)
    r = await drive(
        tmp_path,
        addon_zip,
        "errors",
        stdin_hook=revoke,
        server=farm.url,
        username=name,
        password=PASSWORD,
        blend=str(corpus / "linked_cube.blend"),
        dead_server=dead,
    )
    ok, err = r["refused"]  # checked before anything is packed
    assert not ok and "not a member of project 'no-such-project' (yours: default)" in err
    ok, err = r["bad_frames"]
    assert not ok and "frames '1-'" in err.lower()
    ok, err = r["too_large"]  # the farm's own message, as it is
    assert not ok and "upload is larger than the limit of 1000 bytes" in err and "(file)" in err
    assert len((await farm.client._json("GET", "/api/models"))["models"]) == models_before
    ok, err = r["typo"]
    assert not ok and "port is not a number" in err
    ok, err = r["revoked"]
    assert not ok and "log in again" in err
    assert "log in again" in r["auth_error"]
    ok, err = r["unreachable"]
    assert not ok and "cannot reach the farm" in err and dead in err
    ok, err = r["test_connection"]
    assert not ok and "Cannot reach the farm" in err
    ok, err = r["bad_login"]
    assert not ok and "Log in failed" in err


async def test_a_library_outside_the_project_is_packed_with_rewritten_paths(
    farm: Farm, tmp_path: Path, addon_zip: Path, corpus: Path
) -> None:
    name = await artist(farm)
    project = tmp_path / "project"
    project.mkdir()
    r = await drive(
        tmp_path,
        addon_zip,
        "outside",
        server=farm.url,
        username=name,
        password=PASSWORD,
        library=str(corpus / "basic_file.blend"),
        blend=str(project / "shot.blend"),
    )
    assert r["linked"], r
    assert r["ok"], r["error"]
    assert "1 file(s) from outside the project packed" in r["text"]
    assert r["state"] == "completed"
    assert r["leftovers"] == ["shot.blend"]  # the temporary copy is gone
    job = await farm.client.job(r["job_id"])
    model = await farm.client._json("GET", f"/api/models/{job['model_id']}")
    (dep,) = [d for d in model["info"]["dependencies"] if d["kind"] == "library"]
    assert dep["path"].startswith("//_outside_project/") and not dep["missing"], dep


async def test_a_never_saved_scene_is_submitted_from_a_temporary_copy(
    farm: Farm, tmp_path: Path, addon_zip: Path
) -> None:
    name = await artist(farm)
    r = await drive(tmp_path, addon_zip, "unsaved", server=farm.url, username=name, password=PASSWORD)
    ok, err = r["download_first"]  # said before anything is submitted
    assert not ok and "never saved" in err
    assert r["ok"], r["error"]
    assert r["state"] == "completed"
    assert r["filepath"] == "" and r["dirty"]
    jobs = (await farm.client._json("GET", "/api/jobs"))["jobs"]
    assert len(jobs) == 1
    job = await farm.client.job(r["job_id"])
    assert job["name"] == "Scene"
    # downloading next to a file that was never saved has no place to go: said so, nothing written
    assert not r["download_ok"] and "never saved" in r["download_error"]
