"""Runs inside real Blender (the bpy module) for tests/test_addon.py: installs the built add-on
zip, enables it, then plays one scenario and prints its findings as ``RESULT: {json}``.

Usage: python addon_driver.py ZIP SCENARIO JSON_ARGS (BLENDER_USER_RESOURCES must point to a
private folder, so the install touches nothing of the user's).

The venv's own blender-asset-tracer is hidden from imports, so the add-on can only use the
wheel the extension bundles, as in a real Blender.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

USER = os.environ["BLENDER_USER_RESOURCES"]


class _OnlyBundledBAT(importlib.abc.MetaPathFinder):
    """``blender_asset_tracer`` only from the extensions' own site-packages (under USER)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "blender_asset_tracer":
            return None
        paths = [p for p in sys.path if p.startswith(USER)]
        spec = importlib.machinery.PathFinder.find_spec(name, paths)
        if spec is None:
            raise ImportError("blender_asset_tracer is not installed from the extension's wheel")
        return spec


sys.meta_path.insert(0, _OnlyBundledBAT())

import bpy  # noqa: E402

RESULT: dict[str, Any] = {}


def install(zip_path: str, server: str) -> Any:
    bpy.ops.extensions.package_install_files(filepath=zip_path, repo="user_default", enable_on_install=True)
    name = "bl_ext.user_default.render_farm"
    assert name in bpy.context.preferences.addons, list(bpy.context.preferences.addons.keys())
    bpy.context.preferences.addons[name].preferences.server_url = server
    import blender_asset_tracer

    RESULT["bat_from"] = blender_asset_tracer.__file__
    return sys.modules[name]


def sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def add_camera(res: tuple[int, int] = (64, 48)) -> None:
    """An unsaved change the render needs: the corpus files have no camera."""
    scene = bpy.context.scene
    cam = bpy.data.objects.new("FarmCam", bpy.data.cameras.new("FarmCam"))
    scene.collection.objects.link(cam)
    from mathutils import Vector

    meshes = [o.matrix_world.translation for o in scene.objects if o.type == "MESH"]
    target = sum(meshes, Vector()) / len(meshes) if meshes else Vector()
    cam.location = target + Vector((6.0, -6.0, 4.0))
    cam.rotation_euler = (target - cam.location).to_track_quat("-Z", "Y").to_euler()
    scene.camera = cam
    scene.render.resolution_x, scene.render.resolution_y = res
    scene.render.resolution_percentage = 100
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"


def submit(**kw: Any) -> tuple[bool, str]:
    try:
        bpy.ops.render_farm.submit(**kw)
        return True, ""
    except RuntimeError as exc:
        return False, str(exc)


def pump_until(addon: Any, cond: Any, timeout: float = 240.0) -> float:
    """Run the add-on's timer function (background Blender has no event loop) until ``cond()``."""
    t0 = time.monotonic()
    while not cond():
        addon.state.drain()
        assert time.monotonic() - t0 < timeout, "timed out pumping"
        time.sleep(0.05)
    addon.state.drain()
    return time.monotonic() - t0


class RecordingLayout:
    """Stands in for a UILayout (background Blender has none) while the add-on's draw code runs:
    every call is recorded and checked against Blender's own RNA: properties drawn must exist on
    their data, operators must be registered, icons must be Blender's."""

    ICONS: ClassVar[set[str]] = set(
        bpy.types.UILayout.bl_rna.functions["label"].parameters["icon"].enum_items.keys()
    )

    def __init__(self, calls: list[str]) -> None:
        object.__setattr__(self, "calls", calls)

    def __setattr__(self, name: str, value: Any) -> None:
        assert hasattr(bpy.types.UILayout, name) or name in bpy.types.UILayout.bl_rna.properties, name

    def __getattr__(self, name: str) -> Any:
        assert name in bpy.types.UILayout.bl_rna.functions, f"UILayout has no {name}()"
        calls = self.calls

        def call(*args: Any, **kw: Any) -> Any:
            icon = kw.get("icon")
            assert icon is None or icon in self.ICONS, f"no icon {icon!r}"
            if name == "prop":
                data, prop = args[0], args[1]
                assert prop in data.bl_rna.properties, f"{type(data).__name__} has no property {prop}"
            calls.append(f"{name}:{kw.get('text', args[1] if name == 'prop' else '')}")
            if name == "operator":
                group, op = args[0].split(".")
                assert hasattr(getattr(bpy.ops, group), op), args[0]
                return OperatorProperties(getattr(getattr(bpy.ops, group), op).get_rna_type())
            return RecordingLayout(calls)

        return call


class OperatorProperties:
    """What layout.operator() returns: setting a property the operator lacks fails."""

    def __init__(self, rna: Any) -> None:
        object.__setattr__(self, "rna", rna)

    def __setattr__(self, name: str, value: Any) -> None:
        assert name in self.rna.properties, f"{self.rna.identifier} has no property {name}"


def draw_panels(addon: Any) -> list[str]:
    """Run every panel's draw() with a RecordingLayout; returns what was drawn."""
    calls: list[str] = []
    for cls in addon.ui.CLASSES:
        fake = type("FakePanel", (), {"layout": RecordingLayout(calls)})()
        if not hasattr(cls, "poll") or cls.poll(bpy.context):
            cls.draw(fake, bpy.context)
    prefs = bpy.context.preferences.addons["bl_ext.user_default.render_farm"].preferences

    class PrefsWithLayout:
        layout = RecordingLayout(calls)

        def __getattr__(self, name: str) -> Any:
            return getattr(prefs, name)

    type(prefs).draw(PrefsWithLayout(), bpy.context)
    return calls


def main() -> None:
    zip_path, scenario, raw = sys.argv[1], sys.argv[2], sys.argv[3]
    args = json.loads(raw)
    addon = install(zip_path, args["server"])
    if args.get("username"):
        bpy.ops.render_farm.login(username=args["username"], password=args["password"])
        RESULT["credentials_mode"] = oct(os.stat(Path(addon.props.token_store().path)).st_mode & 0o777)
        RESULT["credentials_text"] = Path(addon.props.token_store().path).read_text()
    if scenario == "linked":
        blend = args["blend"]
        before = (sha(blend), os.stat(blend).st_mtime_ns, sorted(os.listdir(Path(blend).parent)))
        bpy.ops.wm.open_mainfile(filepath=blend)
        add_camera()
        RESULT["dirty_before"] = bpy.data.is_dirty
        ok, err = submit(
            frames="1-2",
            samples=4,
            chunk_size=1,
            device="CPU",
            wait=True,
            download=True,
            download_dir=args["download"],
            poll_interval=0.3,
        )
        RESULT.update(
            ok=ok,
            error=err,
            job_id=bpy.context.window_manager.render_farm.last_job_id,
            state=bpy.context.window_manager.render_farm.last_state,
            download_dir=bpy.context.window_manager.render_farm.last_download_dir,
            dirty_after=bpy.data.is_dirty,
            filepath_after=bpy.data.filepath,
        )
        after = (sha(blend), os.stat(blend).st_mtime_ns, sorted(os.listdir(Path(blend).parent)))
        RESULT["file_untouched"] = before == after
        view = addon.state.FARM.view(bpy.context.window_manager.render_farm.last_job_id)
        RESULT["frame_states"] = {str(k): v for k, v in view.frame_states.items()}
        RESULT["thumbnail"] = view.thumbnail
        RESULT["thumbnail_frame"] = view.thumbnail_frame
    elif scenario == "missing":
        bpy.ops.wm.open_mainfile(filepath=args["blend"])
        add_camera()
        ok, err = submit(frames="1", samples=2, wait=True, poll_interval=0.3)
        RESULT.update(
            first_ok=ok,
            first_error=err,
            first_submission=addon.state.FARM.submission.stage,
            missing=addon.state.FARM.submission.missing,
        )
        ok, err = submit(
            frames="1",
            samples=2,
            allow_missing=True,
            wait=True,
            download=True,
            download_dir=args["download"],
            poll_interval=0.3,
        )
        RESULT.update(
            ok=ok,
            error=err,
            job_id=bpy.context.window_manager.render_farm.last_job_id,
            state=bpy.context.window_manager.render_farm.last_state,
            download_dir=bpy.context.window_manager.render_farm.last_download_dir,
        )
    elif scenario == "panel":
        # The panel's way: invoke -> worker threads -> bpy.app.timers' drain on the main thread.
        bpy.ops.wm.open_mainfile(filepath=args["blend"])
        add_camera()
        RESULT["drawn_idle"] = draw_panels(addon)
        main_thread = threading.get_ident()
        settings = bpy.context.scene.render_farm
        settings.use_scene_frames = False
        settings.frames = "3"
        settings.samples = 2
        settings.download_dir = args["download"]
        t0 = time.monotonic()
        r = bpy.ops.render_farm.submit(asynchronous=True)  # what the button's invoke does
        sub = addon.state.FARM.submission
        RESULT.update(
            invoke=list(r),
            invoke_s=time.monotonic() - t0,
            stage_after_invoke=sub.stage,
            busy_after_invoke=sub.busy,
        )
        stages: list[str] = []

        def seen() -> bool:
            if not stages or stages[-1] != sub.stage:
                stages.append(sub.stage)
            return not sub.busy

        RESULT["drawn_busy"] = draw_panels(addon)
        RESULT["submit_s"] = pump_until(addon, seen) + RESULT["invoke_s"]
        RESULT.update(
            stages=stages,
            stage=sub.stage,
            text=sub.text,
            worker_on_main=main_thread in sub.threads,
            worker_threads=len(sub.threads),
        )
        job_id = sub.job_id
        RESULT["job_id"] = job_id
        view = addon.state.FARM.view(job_id)
        try:
            pump_until(addon, lambda: view.finished and view.thumbnail, timeout=60)
        except AssertionError:
            raise AssertionError(f"job view never finished: {view}") from None
        RESULT.update(
            state=view.state,
            frame_states={str(k): v for k, v in view.frame_states.items()},
            thumbnail=view.thumbnail,
            active_job=addon.state.FARM.active_job,
        )
        bpy.ops.render_farm.download(job_id=job_id, use_thread=True)  # the button's way
        pump_until(addon, lambda: view.downloaded and "Downloaded" in view.download_text)
        RESULT.update(downloaded=view.downloaded, download_text=view.download_text)
        bpy.ops.render_farm.open_image(job_id=job_id)
        img = [
            i
            for i in bpy.data.images
            if i.filepath and Path(bpy.path.abspath(i.filepath)).name == Path(view.downloaded[-1]).name
        ]
        RESULT["image_size"] = list(img[0].size) if img else None
        bpy.ops.render_farm.refresh_jobs()
        pump_until(addon, lambda: addon.state.FARM.recent or addon.state.FARM.recent_error)
        RESULT["recent"] = [j["id"] for j in addon.state.FARM.recent]
        RESULT["drawn_done"] = draw_panels(addon)
        RESULT["panels"] = [
            c
            for c in ("RENDERFARM_PT_render_farm", "RENDERFARM_PT_job", "RENDERFARM_PT_recent")
            if hasattr(bpy.types, c)
        ]
        RESULT["panel_context"] = bpy.types.RENDERFARM_PT_render_farm.bl_context
    elif scenario == "errors":
        bpy.ops.wm.open_mainfile(filepath=args["blend"])
        add_camera()
        ok, err = submit(frames="1", project="no-such-project")
        RESULT["refused"] = [ok, err]
        ok, err = submit(frames="1-")
        RESULT["bad_frames"] = [ok, err]
        ok, err = submit(frames="1")  # the farm's upload limit is 1000 bytes in this test
        RESULT["too_large"] = [ok, err]
        bpy.context.preferences.addons["bl_ext.user_default.render_farm"].preferences.server_url = args[
            "server"
        ].replace("127.0.0.1:", "127.0.0.1:39x")
        try:
            bpy.ops.render_farm.test_connection()
            RESULT["typo"] = [True, ""]
        except RuntimeError as exc:
            RESULT["typo"] = [False, str(exc)]
        bpy.context.preferences.addons["bl_ext.user_default.render_farm"].preferences.server_url = args[
            "server"
        ]
        # the token revoked on the server (by the test, through the API) -> asks to log in again
        print("READY-REVOKE", flush=True)
        sys.stdin.readline()
        ok, err = submit(frames="1")
        RESULT["revoked"] = [ok, err]
        RESULT["auth_error"] = addon.state.FARM.auth_error
        # a farm that went away after the login: the token is there, nothing answers
        store = addon.props.token_store()
        store.put(args["dead_server"], {"token": "rfp_x", "token_id": "x", "username": args["username"]})
        bpy.context.preferences.addons["bl_ext.user_default.render_farm"].preferences.server_url = args[
            "dead_server"
        ]
        ok, err = submit(frames="1")
        RESULT["unreachable"] = [ok, err]
        try:
            bpy.ops.render_farm.test_connection()
            RESULT["test_connection"] = [True, ""]
        except RuntimeError as exc:
            RESULT["test_connection"] = [False, str(exc)]
        bpy.context.preferences.addons["bl_ext.user_default.render_farm"].preferences.server_url = args[
            "server"
        ]
        try:
            bpy.ops.render_farm.login(username=args["username"], password="wrong-password-1")
            RESULT["bad_login"] = [True, ""]
        except RuntimeError as exc:
            RESULT["bad_login"] = [False, str(exc)]
    elif scenario == "outside":
        # A new scene in a temporary project that links an object from a library outside it.
        bpy.ops.wm.read_homefile(use_empty=True)
        lib = args["library"]
        with bpy.data.libraries.load(lib, link=True) as (src, dst):
            dst.objects = [n for n in src.objects][:1]
        for ob in dst.objects:
            bpy.context.scene.collection.objects.link(ob)
        add_camera()
        bpy.ops.wm.save_as_mainfile(filepath=args["blend"])
        ok, err = submit(frames="1", samples=2, wait=True, poll_interval=0.3)
        sub = addon.state.FARM.submission
        RESULT.update(
            ok=ok,
            error=err,
            text=sub.text,
            job_id=bpy.context.window_manager.render_farm.last_job_id,
            state=bpy.context.window_manager.render_farm.last_state,
            linked=[o.name for o in dst.objects],
            leftovers=sorted(os.listdir(Path(args["blend"]).parent)),
        )
    elif scenario == "unsaved":
        bpy.ops.wm.read_homefile(use_empty=True)
        mesh = bpy.data.meshes.new("Box")
        mesh.from_pydata(
            [(-1, -1, -1), (1, -1, -1), (1, 1, -1), (-1, 1, -1), (0, 0, 1)],
            [],
            [(0, 1, 2, 3), (0, 1, 4), (1, 2, 4), (2, 3, 4), (3, 0, 4)],
        )
        bpy.context.scene.collection.objects.link(bpy.data.objects.new("Box", mesh))
        add_camera()
        ok, err = submit(frames="1", samples=2, wait=True, download=True, poll_interval=0.3)
        RESULT["download_first"] = [ok, err]
        ok, err = submit(frames="1", samples=2, wait=True, poll_interval=0.3)
        RESULT.update(
            ok=ok,
            error=err,
            job_id=bpy.context.window_manager.render_farm.last_job_id,
            state=bpy.context.window_manager.render_farm.last_state,
            filepath=bpy.data.filepath,
            dirty=bpy.data.is_dirty,
        )
        try:
            bpy.ops.render_farm.download(job_id=RESULT["job_id"])
            RESULT.update(download_ok=True, download_error="")
        except RuntimeError as exc:
            RESULT.update(download_ok=False, download_error=str(exc))
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    print("RESULT: " + json.dumps(RESULT), flush=True)


if __name__ == "__main__":
    main()
