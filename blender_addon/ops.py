"""The add-on's operators: log in, submit, watch, download, open, cancel.

From the panel (``invoke``) network and packing work runs in worker threads and reaches the
panel through :mod:`.state`. From a script (``bpy.ops.render_farm.submit(...)``, that is
``execute``) the same work runs inline and the operator returns when it is done, raising
``RuntimeError`` with the farm's message when it fails: what a pipeline script wants.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, StringProperty

from . import packing, worker
from .client import FarmClient, FarmError
from .props import DEVICES, FORMATS, prefs, scene_settings, server_url, session, token_store, user_folder
from .state import FARM, Submission, post, report

if TYPE_CHECKING:
    from bpy.stub_internal.rna_enums import OperatorReturnItems

TOKEN_DAYS = 90
"""Days a personal token made by logging in from Blender stays valid."""
_watchers: dict[str, threading.Event] = {}


def _direct(fn: Callable[..., Any], *args: Any) -> None:
    fn(*args)


def _thread(target: Callable[..., Any], *args: Any) -> threading.Thread:
    """Run ``target(*args)`` in a daemon worker thread; an exception it lets out is reported to
    the artist (on the main thread) instead of dying silently."""

    def guarded() -> None:
        try:
            target(*args)
        except Exception as exc:
            post(_internal_error, f"{type(exc).__name__}: {exc}")

    t = threading.Thread(target=guarded, daemon=True, name="render-farm")
    t.start()
    return t


def _internal_error(text: str) -> None:
    FARM.connection = f"Render Farm failed: {text}"
    report("ERROR", FARM.connection)


def _client(context: bpy.types.Context) -> FarmClient:
    """A client for the preferences' server with the stored token.

    Raises:
        FarmError: no server set, or (``auth``) not logged in.
    """
    server = server_url(context)
    entry = token_store().get(server)
    if not entry:
        raise FarmError("auth", f"not logged in to {server}: log in in the add-on's preferences")
    return FarmClient(server, str(entry["token"]))


def _fail(op: bpy.types.Operator, exc: FarmError | str) -> set[OperatorReturnItems]:
    text = worker.farm_message(exc) if isinstance(exc, FarmError) else exc
    if isinstance(exc, FarmError) and exc.kind == "auth":
        FARM.auth_error = text
    op.report({"ERROR"}, text)
    return {"CANCELLED"}


def thumb_dir(job_id: str) -> Path:
    """Where the thumbnails of ``job_id`` are kept."""
    return user_folder() / "thumbnails" / "".join(c for c in job_id if c.isalnum() or c in "-_")


KEEP_THUMBNAILS = 20
"""Jobs whose thumbnails stay on disk (the most recently watched)."""


def prune_thumbnails(keep: int = KEEP_THUMBNAILS) -> None:
    """Delete the thumbnail folders of all but the ``keep`` most recently used jobs."""
    root = user_folder() / "thumbnails"
    if not root.is_dir():
        return
    folders = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in folders[keep:]:
        packing.remove_quietly(old)


def watch_job(context: bpy.types.Context, job_id: str) -> None:
    """Show ``job_id`` in the panel and poll it in a worker thread (one watched job at a time)."""
    FARM.active_job = job_id
    FARM.view(job_id)
    for other, stop in list(_watchers.items()):
        if other != job_id:
            stop.set()
            del _watchers[other]
    if job_id in _watchers and not _watchers[job_id].is_set():
        return
    try:
        client = _client(context)
    except FarmError as exc:
        FARM.view(job_id).error = worker.farm_message(exc)
        return
    prune_thumbnails()
    stop = threading.Event()
    _watchers[job_id] = stop
    _thread(worker.watch, client, job_id, thumb_dir(job_id), stop, post)


def stop_watching() -> None:
    """Stop every polling thread (on unregister)."""
    for stop in _watchers.values():
        stop.set()
    _watchers.clear()


# ------------------------------------------------------------------ accounts


def _login(server: str, username: str, password: str) -> tuple[dict[str, Any], list[str]]:
    """Exchange the password for a personal token, store it, end the login session.

    Returns ``(me, project names)``. Raises FarmError.
    """
    store = token_store()
    old = store.get(server)
    c = FarmClient(server)
    try:
        session = c.login(username, password)
    except FarmError as exc:
        if exc.status in (404, 405):
            raise FarmError(
                "server",
                f"{server} answers HTTP {exc.status}, but not as a renderfarm server: is "
                "the URL right (such as http://farm:3000, without /api)?",
            ) from None
        raise
    if not isinstance(session, dict) or not isinstance(session.get("access_token"), str):
        raise FarmError("server", f"{server} does not answer like a renderfarm server (no access token)")
    c.token = session["access_token"]
    try:
        me = c.me()
        if not isinstance(me, dict) or not isinstance(me.get("username"), str):
            raise FarmError("server", f"{server} does not answer like a renderfarm server (no user)")
        created = c.create_token(f"Blender on {socket.gethostname()}"[:100], TOKEN_DAYS)
        try:
            store.put(
                server,
                {
                    "token": created["token"],
                    "token_id": created["id"],
                    "username": me["username"],
                    "expires_at": created.get("expires_at"),
                },
            )
        except OSError as exc:
            c.revoke_token(str(created["id"]))
            raise FarmError("server", f"cannot store the token in {store.path}: {exc}") from None
    finally:
        try:
            c.logout_session(session["refresh_token"])
        except FarmError:
            pass  # it expires by itself
    if old and old.get("token_id") and old.get("token") != created["token"]:
        try:
            FarmClient(server, str(old["token"])).revoke_token(str(old["token_id"]))
        except FarmError:
            pass  # already revoked or expired
    return me, [str(p["name"]) for p in me.get("projects") or []]


def _logged_in(me: dict[str, Any], projects: list[str]) -> None:
    FARM.auth_error = ""
    FARM.projects = projects
    FARM.connection = f"Logged in as {me['username']}; projects: {', '.join(projects) or 'none'}"
    report("INFO", FARM.connection)


def _login_failed(text: str) -> None:
    FARM.auth_error = text
    report("ERROR", text)


class _FromButtonInThread:
    """Mixin of the operators that talk to the farm: from a button (``invoke``) the work runs in
    a worker thread and reaches the panel through the timer; from a script (``execute``, or
    ``use_thread=True`` to ask for the thread) it runs inline and the operator returns the outcome."""

    use_thread: BoolProperty(options={"SKIP_SAVE", "HIDDEN"})

    def invoke(self, context: bpy.types.Context, event: bpy.types.Event) -> set[OperatorReturnItems]:
        """From a button: in a worker thread."""
        self.use_thread = True
        return self.execute(context)  # type: ignore[attr-defined]


class RENDERFARM_OT_login(bpy.types.Operator):
    """Log in to the farm: the password is exchanged for a personal API token (the password is
    not stored)."""

    bl_idname = "render_farm.login"
    bl_label = "Log In to the Render Farm"
    bl_options = {"INTERNAL"}

    username: StringProperty(name="User Name", options={"SKIP_SAVE"})
    password: StringProperty(name="Password", subtype="PASSWORD", options={"SKIP_SAVE", "HIDDEN"})
    use_thread: BoolProperty(options={"SKIP_SAVE", "HIDDEN"})

    def invoke(self, context: bpy.types.Context, event: bpy.types.Event) -> set[OperatorReturnItems]:
        """Ask for the user name and password in a dialog."""
        self.username = self.username or prefs(context).username
        self.use_thread = True
        assert context.window_manager is not None
        return context.window_manager.invoke_props_dialog(self)

    def draw(self, context: bpy.types.Context) -> None:
        """The dialog: user name and password."""
        if self.layout is not None:
            self.layout.prop(self, "username")
            self.layout.prop(self, "password")

    def execute(self, context: bpy.types.Context) -> set[OperatorReturnItems]:
        """Log in (in a worker thread from the dialog; inline from a script)."""
        username, password = self.username.strip(), self.password
        self.password = ""
        if not username or not password:
            return _fail(self, "give a user name and a password")
        try:
            server = server_url(context)
        except FarmError as exc:
            return _fail(self, exc)
        prefs(context).username = username
        if self.use_thread:

            def run() -> None:
                try:
                    post(_logged_in, *_login(server, username, password))
                except FarmError as exc:
                    post(_login_failed, f"Log in failed: {exc}")

            _thread(run)
            self.report({"INFO"}, f"Logging in to {server}...")
            return {"FINISHED"}
        try:
            _logged_in(*_login(server, username, password))
        except FarmError as exc:
            return _fail(self, f"Log in failed: {exc}")
        return {"FINISHED"}


class RENDERFARM_OT_logout(bpy.types.Operator):
    """Revoke the stored token and forget it."""

    bl_idname = "render_farm.logout"
    bl_label = "Log Out"
    bl_options = {"INTERNAL"}

    def execute(self, context: bpy.types.Context) -> set[OperatorReturnItems]:
        """Revoke (best effort, a few seconds at most) and remove the token."""
        try:
            server = server_url(context)
        except FarmError as exc:
            return _fail(self, exc)
        entry = token_store().remove(server)
        stop_watching()
        if entry and entry.get("token_id"):

            def run() -> None:
                try:
                    FarmClient(server, str(entry["token"]), timeout=5).revoke_token(str(entry["token_id"]))
                except FarmError:
                    pass

            _thread(run)
        FARM.connection = ""
        self.report({"INFO"}, f"Logged out of {server}")
        return {"FINISHED"}


def _connection_result(text: str, level: str, projects: list[str] | None, auth: bool) -> None:
    FARM.connection = text
    if projects is not None:
        FARM.projects = projects
    if auth:
        FARM.auth_error = text
    elif level == "INFO":
        FARM.auth_error = ""
    report(level, text)


def _test_connection(server: str, token: str | None) -> tuple[str, str, list[str] | None, bool]:
    c = FarmClient(server, token, timeout=10)
    try:
        health = c.health()
    except FarmError as exc:
        if exc.status:
            return (
                f"{server} answers HTTP {exc.status}, but not as a renderfarm server: is the URL right "
                "(such as http://farm:3000, without /api)?",
                "ERROR",
                None,
                False,
            )
        return f"Cannot reach the farm: {exc}", "ERROR", None, False
    if not isinstance(health, dict):
        return f"{server} does not answer like a renderfarm server", "ERROR", None, False
    state = "healthy" if health.get("status") == "ok" else f"{health.get('status', 'degraded')}: {health}"
    if not token:
        return f"The farm at {server} answers ({state}); you are not logged in", "WARNING", None, False
    try:
        me = c.me()
        projects = [str(p["name"]) for p in me.get("projects") or []]
        me["username"]
    except FarmError as exc:
        return worker.farm_message(exc), "ERROR", None, exc.kind == "auth"
    except (KeyError, TypeError, AttributeError):
        return f"{server} does not answer like a renderfarm server", "ERROR", None, False
    return (
        f"Connected to {server} ({state}) as {me['username']}; projects: {', '.join(projects) or 'none'}",
        "INFO",
        projects,
        False,
    )


class RENDERFARM_OT_test_connection(_FromButtonInThread, bpy.types.Operator):
    """Check that the farm answers and that the stored token works."""

    bl_idname = "render_farm.test_connection"
    bl_label = "Test Connection"
    bl_options = {"INTERNAL"}

    def execute(self, context: bpy.types.Context) -> set[OperatorReturnItems]:
        """Ask ``/healthz`` and ``/api/me``."""
        try:
            server = server_url(context)
        except FarmError as exc:
            return _fail(self, exc)
        entry = token_store().get(server)
        token = str(entry["token"]) if entry else None
        if self.use_thread:
            _thread(lambda: post(_connection_result, *_test_connection(server, token)))
            FARM.connection = f"Connecting to {server}..."
            return {"FINISHED"}
        text, level, projects, auth = _test_connection(server, token)
        if level == "ERROR":
            FARM.auth_error = text if auth else FARM.auth_error
            return _fail(self, text)
        _connection_result(text, level, projects, auth)
        return {"FINISHED"}


# ------------------------------------------------------------------ submit


def scene_frames(scene: bpy.types.Scene) -> str:
    """The scene's frame range and step as a frame spec (``1-250``, ``1-250x2``)."""
    spec = (
        f"{scene.frame_start}-{scene.frame_end}"
        if scene.frame_end != scene.frame_start
        else str(scene.frame_start)
    )
    return spec + (
        f"x{scene.frame_step}" if scene.frame_step > 1 and scene.frame_end != scene.frame_start else ""
    )


def save_copy() -> tuple[Path, Path, str, Path]:
    """Save the open scene, unsaved changes included, as a temporary copy (main thread only).

    The copy goes next to the artist's file (a hidden name), so the relative paths written in it
    resolve as in the original; the artist's file and its "unsaved" state are left as they are
    (``save_as_mainfile(copy=True)``). When that folder cannot be written, or the scene was
    never saved, the copy goes to a temporary folder with its relative paths remapped.

    Returns:
        ``(copy, project_root, main_name, cleanup)``: ``cleanup`` is what to delete once packed
        (the copy, or the temporary folder holding it).

    Raises:
        RuntimeError: Blender could not save the copy anywhere.
    """
    src = bpy.data.filepath
    main_name = Path(src).name if src else "untitled.blend"
    tag = uuid.uuid4().hex[:8]
    if src and os.access(Path(src).parent, os.W_OK):  # (False on a read-only file system, even for root)
        folder = Path(src).parent
        copy = folder / f".{Path(src).stem}.renderfarm-{tag}.blend"
        try:
            bpy.ops.wm.save_as_mainfile(
                filepath=str(copy), copy=True, check_existing=False, relative_remap=False, compress=False
            )
            return copy, folder, main_name, copy
        except RuntimeError:
            packing.remove_quietly(copy)  # a read-only folder: fall through to a temporary one
    tmp = Path(tempfile.mkdtemp(prefix="renderfarm-copy-"))
    copy = tmp / main_name
    try:
        bpy.ops.wm.save_as_mainfile(
            filepath=str(copy), copy=True, check_existing=False, relative_remap=True, compress=False
        )
    except RuntimeError:
        packing.remove_quietly(tmp)
        raise
    return copy, tmp, main_name, tmp


def _report_submission(sub: Submission) -> None:
    if sub.stage == "submitted":
        report("INFO", sub.text)
        wm_farm = session(bpy.context)
        if wm_farm is not None:
            wm_farm.last_job_id = sub.job_id
        watch_job(bpy.context, sub.job_id)
    elif sub.stage == "canceled":
        report("WARNING", sub.text)
    else:
        report("ERROR", sub.text)


class RENDERFARM_OT_submit(bpy.types.Operator):
    """Pack the scene with everything it needs, upload it and render it on the farm.

    Every keyword argument overrides the panel's setting of the same name; unset ones come
    from the scene's Render Farm panel (``scene.render_farm``)."""

    bl_idname = "render_farm.submit"
    bl_label = "Render on Farm"
    bl_options = {"REGISTER"}

    project: StringProperty(name="Project", options={"SKIP_SAVE"})
    frames: StringProperty(name="Frames", description="Frame spec; empty: the panel's", options={"SKIP_SAVE"})
    chunk_size: IntProperty(name="Chunk Size", min=1, max=10000, default=1, options={"SKIP_SAVE"})
    priority: IntProperty(name="Priority", min=-100, max=100, options={"SKIP_SAVE"})
    device: EnumProperty(name="Device", items=DEVICES, default="ANY", options={"SKIP_SAVE"})
    samples: IntProperty(name="Samples", min=0, max=1_000_000, options={"SKIP_SAVE"})
    output_format: EnumProperty(name="Format", items=FORMATS, default="PNG", options={"SKIP_SAVE"})
    allow_missing: BoolProperty(name="Allow Missing Files", options={"SKIP_SAVE"})
    wait: BoolProperty(
        name="Wait", description="Scripts: return only when the job has finished", options={"SKIP_SAVE"}
    )
    download: BoolProperty(
        name="Download",
        description="Scripts, with wait: download the frames when the job completes",
        options={"SKIP_SAVE"},
    )
    download_dir: StringProperty(name="Download To", subtype="DIR_PATH", options={"SKIP_SAVE"})
    unreachable_timeout: FloatProperty(
        name="Unreachable Timeout",
        description="Scripts, with wait: seconds the farm may stay unreachable before the wait gives up",
        default=300.0,
        min=1.0,
        options={"SKIP_SAVE"},
    )
    poll_interval: FloatProperty(
        name="Poll Interval",
        description="Seconds between checks while waiting",
        default=2.0,
        min=0.2,
        max=60.0,
        options={"SKIP_SAVE"},
    )
    asynchronous: BoolProperty(
        name="Asynchronous",
        description="Pack and upload in worker threads and return at once, as the panel's button does "
        "(the panel shows progress; wait and download are ignored)",
        options={"SKIP_SAVE"},
    )

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        """Not while another submission is packing or uploading."""
        return context.scene is not None and not (FARM.submission and FARM.submission.busy)

    def _value(self, settings: Any, name: str) -> Any:
        return getattr(self, name) if self.properties.is_property_set(name) else getattr(settings, name)

    def _params(self, context: bpy.types.Context) -> tuple[str, str, str, dict[str, Any]]:
        """``(server, token, project, job fields)``; raises FarmError or ValueError."""
        scene = context.scene
        if scene is None:
            raise ValueError("there is no scene to render")
        settings = scene_settings(context)
        server = server_url(context)
        entry = token_store().get(server)
        if not entry:
            raise FarmError("auth", f"not logged in to {server}: log in in the add-on's preferences")
        if self.properties.is_property_set("frames"):
            frames = self.frames.strip()
        else:
            frames = scene_frames(scene) if settings.use_scene_frames else settings.frames.strip()
        if not frames:
            raise ValueError("give the frames to render (1-10, 1-99x2 ...)")
        if scene.camera is None:
            raise ValueError(f"scene {scene.name!r} has no camera: add one, or set it in Scene properties")
        worker.check_frames(frames)
        project = (self._value(settings, "project") or prefs(context).default_project).strip()
        samples = self._value(settings, "samples")
        job = {
            "frames": frames,
            "chunk_size": self._value(settings, "chunk_size"),
            "priority": self._value(settings, "priority"),
            "device": str(self._value(settings, "device")).lower(),
            "samples": samples or None,
            "output_format": self._value(settings, "output_format"),
            "allow_missing": bool(self._value(settings, "allow_missing")),
            "scene": scene.name,
            "name": (Path(bpy.data.filepath).stem if bpy.data.filepath else scene.name)[:255],
        }
        return server, str(entry["token"]), project, job

    def invoke(self, context: bpy.types.Context, event: bpy.types.Event) -> set[OperatorReturnItems]:
        """From the panel: the work goes to a worker thread; the panel shows its progress."""
        self.asynchronous = True
        return self.execute(context)

    def execute(self, context: bpy.types.Context) -> set[OperatorReturnItems]:
        """Save a copy, then pack, upload and create the job (inline, or in a thread from the panel)."""
        try:
            server, token, project, job = self._params(context)
        except (FarmError, ValueError) as exc:
            return _fail(self, exc if isinstance(exc, FarmError) else str(exc))
        if self.download and not self.wait and not self.asynchronous:
            self.report({"WARNING"}, "download=True needs wait=True (frames exist only once the job ran)")
        if self.download and self.wait and not self.asynchronous:
            try:  # a folder that cannot be had is said before the job renders, not after
                check_writable(download_folder(context, "check", self.download_dir).parent)
            except ValueError as exc:
                return _fail(self, str(exc))
        sub = Submission(text="Saving a copy of the scene")
        FARM.submission = sub
        try:
            copy, root, main_name, cleanup = save_copy()
        except Exception as exc:
            sub.stage, sub.text = "failed", f"cannot save a copy of the scene: {exc}"
            return _fail(self, sub.text)
        packing.track(cleanup)
        params = worker.SubmitParams(
            server=server,
            token=token,
            project=project,
            job=job,
            blend=copy,
            project_root=root,
            main_name=main_name,
            cleanup=cleanup,
        )
        if self.asynchronous:

            def run() -> None:
                worker.submit(sub, params, post)
                post(_report_submission, sub)

            _thread(run)
            sub.stage, sub.text = "packing", "Packing"
            return {"FINISHED"}
        worker.submit(sub, params, _direct)
        if sub.stage != "submitted":
            if sub.stage == "missing":
                return _fail(self, sub.text + " (allow_missing=True submits anyway)")
            return _fail(self, sub.text)
        wm_farm = session(context)
        if wm_farm is not None:
            wm_farm.last_job_id = sub.job_id
        self.report({"INFO"}, sub.text)
        if not self.wait:
            return {"FINISHED"}
        return self._wait(context, sub.job_id)

    def _wait(self, context: bpy.types.Context, job_id: str) -> set[OperatorReturnItems]:
        """Scripts: poll until the job ends, then download its frames if asked."""
        wm_farm = session(context)
        client = _client(context)
        seen: set[int] = set()
        failing_since: float | None = None
        while True:
            try:
                if worker.poll_once(client, job_id, seen, thumb_dir(job_id), _direct):
                    break
                failing_since = None
            except FarmError as exc:
                if exc.kind == "auth" or exc.kind == "refused":
                    return _fail(self, exc)
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > self.unreachable_timeout:
                    return _fail(
                        self,
                        f"gave up waiting for job {job_id} after {self.unreachable_timeout:g} s without an "
                        f"answer ({exc}); the job itself goes on: `renderfarm status {job_id}`",
                    )
                print(f"render farm: {exc}; trying again")  # a farm restarting: keep waiting a while
            time.sleep(self.poll_interval)
        view = FARM.view(job_id)
        if wm_farm is not None:
            wm_farm.last_state = view.state
        if view.state != "completed":
            return _fail(self, f"job {job_id} {view.state}: {view.summary.get('message', '')}")
        if self.download:
            try:
                dest = download_folder(context, job_id, self.download_dir)
                worker.download(client, job_id, dest, _direct)
            except (FarmError, OSError, ValueError) as exc:
                return _fail(self, exc if isinstance(exc, FarmError) else f"download failed: {exc}")
            if wm_farm is not None:
                wm_farm.last_download_dir = str(dest)
        self.report({"INFO"}, f"job {job_id} completed")
        return {"FINISHED"}


class RENDERFARM_OT_cancel_submission(bpy.types.Operator):
    """Stop the submission that is packing or uploading (nothing is submitted)."""

    bl_idname = "render_farm.cancel_submission"
    bl_label = "Cancel Submission"
    bl_options = {"INTERNAL"}

    def execute(self, context: bpy.types.Context) -> set[OperatorReturnItems]:
        """Ask the worker to stop at its next block."""
        sub = FARM.submission
        if sub and sub.busy:
            sub.cancel.set()
            if sub.stage == "saving":  # no worker yet: nothing else will end it
                sub.stage, sub.text = "canceled", "Submission canceled; nothing was submitted"
        return {"FINISHED"}


# ------------------------------------------------------------------ results


def download_folder(context: bpy.types.Context, job_id: str, folder: str = "") -> Path:
    """``folder`` (or the panel's Download To) with the job's id appended, made absolute.

    Raises:
        ValueError: the folder is relative (``//``) to a file never saved.
    """
    raw = folder or scene_settings(context).download_dir or "//render_farm/"
    if raw.startswith("//") and not bpy.data.filepath:
        raise ValueError(
            "the file was never saved, so //render_farm/ has no place: save it, or set "
            "Download To to a folder"
        )
    safe = "".join(c for c in job_id if c.isalnum() or c in "-_")
    return Path(os.path.abspath(os.path.expanduser(bpy.path.abspath(raw)))) / safe


def check_writable(folder: Path) -> None:
    """Raise ValueError unless ``folder``, or the nearest folder above it that exists, may be written."""
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(
            f"frames cannot be downloaded into {folder}: {probe} is not a folder you may write "
            "(set Download To, or download_dir=...)"
        )


def _job_id(op: Any) -> str:
    return str(op.job_id or FARM.active_job)


class RENDERFARM_OT_show_job(bpy.types.Operator):
    """Show this job in the panel and follow its progress."""

    bl_idname = "render_farm.show_job"
    bl_label = "Show Job"
    bl_options = {"INTERNAL"}

    job_id: StringProperty(options={"SKIP_SAVE"})

    def execute(self, context: bpy.types.Context) -> set[OperatorReturnItems]:
        """Start polling it."""
        if not self.job_id:
            return {"CANCELLED"}
        watch_job(context, self.job_id)
        return {"FINISHED"}


class RENDERFARM_OT_refresh_jobs(bpy.types.Operator):
    """Fetch your recent jobs."""

    bl_idname = "render_farm.refresh_jobs"
    bl_label = "Refresh Jobs"
    bl_options = {"INTERNAL"}

    def execute(self, context: bpy.types.Context) -> set[OperatorReturnItems]:
        """In a worker thread."""
        try:
            client = _client(context)
        except FarmError as exc:
            return _fail(self, exc)
        _thread(worker.recent_jobs, client, post)
        return {"FINISHED"}


def _cancelled(job_id: str, summary: dict[str, Any] | None, error: str, kind: str) -> None:
    if summary is not None:
        FARM.view(job_id).summary = summary
        report("INFO", f"job {job_id} canceled")
    else:
        FARM.view(job_id).error = error
        if kind == "auth":
            FARM.auth_error = error
        report("ERROR", error)


def _cancel(client: FarmClient, job_id: str, notify: Callable[..., None]) -> None:
    try:
        notify(_cancelled, job_id, client.cancel(job_id), "", "")
    except FarmError as exc:
        notify(_cancelled, job_id, None, worker.farm_message(exc), exc.kind)


class RENDERFARM_OT_cancel_job(bpy.types.Operator):
    """Cancel the job on the farm (running renders stop within seconds)."""

    bl_idname = "render_farm.cancel_job"
    bl_label = "Cancel Job"

    job_id: StringProperty(options={"SKIP_SAVE"})
    use_thread: BoolProperty(options={"SKIP_SAVE", "HIDDEN"})

    def invoke(self, context: bpy.types.Context, event: bpy.types.Event) -> set[OperatorReturnItems]:
        """Confirm first."""
        self.use_thread = True
        assert context.window_manager is not None
        return context.window_manager.invoke_confirm(self, event)

    def execute(self, context: bpy.types.Context) -> set[OperatorReturnItems]:
        """Ask the farm to cancel it."""
        job_id = _job_id(self)
        if not job_id:
            return _fail(self, "no job to cancel")
        try:
            client = _client(context)
        except FarmError as exc:
            return _fail(self, exc)
        if self.use_thread:
            _thread(_cancel, client, job_id, post)
            return {"FINISHED"}
        try:
            FARM.view(job_id).summary = client.cancel(job_id)
        except FarmError as exc:
            return _fail(self, exc)
        return {"FINISHED"}


def _download_failed(job_id: str, text: str, kind: str) -> None:
    FARM.view(job_id).download_text = text
    if kind == "auth":
        FARM.auth_error = text
    report("ERROR", text)


def _downloaded(job_id: str, then_open: bool) -> None:
    view = FARM.view(job_id)
    report("INFO", f"{view.download_text} into {view.download_dir}")
    if then_open and view.downloaded:
        open_in_image_editor(view.downloaded[-1])


def _download(client: FarmClient, job_id: str, dest: Path, frames: set[int] | None, then_open: bool) -> None:
    try:
        worker.download(client, job_id, dest, post, frames)
    except FarmError as exc:
        post(_download_failed, job_id, f"Download failed: {worker.farm_message(exc)}", exc.kind)
        return
    except OSError as exc:
        post(_download_failed, job_id, f"Download failed: cannot write {dest}: {exc}", "")
        return
    post(_downloaded, job_id, then_open)


class RENDERFARM_OT_download(_FromButtonInThread, bpy.types.Operator):
    """Download the job's stored frames (into //render_farm/<job>/ unless told otherwise)."""

    bl_idname = "render_farm.download"
    bl_label = "Download Frames"

    job_id: StringProperty(options={"SKIP_SAVE"})
    directory: StringProperty(subtype="DIR_PATH", options={"SKIP_SAVE"})

    def execute(self, context: bpy.types.Context) -> set[OperatorReturnItems]:
        """Download (inline from a script)."""
        job_id = _job_id(self)
        if not job_id:
            return _fail(self, "no job to download")
        try:
            client = _client(context)
            dest = download_folder(context, job_id, self.directory)
        except FarmError as exc:
            return _fail(self, exc)
        except ValueError as exc:
            return _fail(self, str(exc))
        if self.use_thread:
            FARM.view(job_id).download_text = "Downloading..."
            _thread(_download, client, job_id, dest, None, False)
            return {"FINISHED"}
        try:
            paths = worker.download(client, job_id, dest, _direct)
        except FarmError as exc:
            return _fail(self, exc)
        except OSError as exc:
            return _fail(self, f"cannot write {dest}: {exc}")
        wm_farm = session(context)
        if wm_farm is not None:
            wm_farm.last_download_dir = str(dest)
        self.report({"INFO"}, f"downloaded {len(paths)} frames into {dest}")
        return {"FINISHED"}


def open_in_image_editor(path: str) -> bpy.types.Image:
    """Load ``path`` (reloaded if loaded before) and show it in an Image Editor: the first one
    open, else a new window's (main thread only)."""
    img = bpy.data.images.load(path, check_existing=True)
    img.reload()
    wm = bpy.context.window_manager
    if wm is None:
        return img
    for window in wm.windows:
        for area in window.screen.areas:
            if area.type == "IMAGE_EDITOR":
                area.spaces.active.image = img  # type: ignore[union-attr]
                return img
    if wm.windows and not bpy.app.background:
        before = set(wm.windows[:])
        with bpy.context.temp_override(window=wm.windows[0]):
            bpy.ops.wm.window_new()
        new = [w for w in wm.windows if w not in before]
        if new:
            area = new[0].screen.areas[0]
            area.type = "IMAGE_EDITOR"
            area.spaces.active.image = img  # type: ignore[union-attr]
    return img


class RENDERFARM_OT_open_image(_FromButtonInThread, bpy.types.Operator):
    """Open the latest finished frame in the Image Editor (downloading it first if needed)."""

    bl_idname = "render_farm.open_image"
    bl_label = "Open in Image Editor"

    job_id: StringProperty(options={"SKIP_SAVE"})
    frame: IntProperty(
        name="Frame", description="The frame; unset: the latest finished", options={"SKIP_SAVE"}
    )
    directory: StringProperty(
        name="Download To",
        description="Folder (one sub-folder per job) the frame is downloaded into; empty: the panel's",
        subtype="DIR_PATH",
        options={"SKIP_SAVE"},
    )

    def execute(self, context: bpy.types.Context) -> set[OperatorReturnItems]:
        """Open it (downloading inline from a script)."""
        job_id = _job_id(self)
        view = FARM.view(job_id) if job_id else None
        frame = (
            self.frame if self.properties.is_property_set("frame") else (view.latest_frame if view else None)
        )
        if not job_id or frame is None:
            return _fail(self, "no finished frame to open yet")
        try:
            client = _client(context)
            dest = download_folder(context, job_id, self.directory)
        except FarmError as exc:
            return _fail(self, exc)
        except ValueError as exc:
            return _fail(self, str(exc))
        if self.use_thread:
            _thread(_download, client, job_id, dest, {frame}, True)
            return {"FINISHED"}
        try:
            paths = worker.download(client, job_id, dest, _direct, {frame})
        except (FarmError, OSError) as exc:
            return _fail(self, exc if isinstance(exc, FarmError) else str(exc))
        if not paths:
            return _fail(self, f"frame {frame} of job {job_id} is not stored")
        open_in_image_editor(str(paths[-1]))
        return {"FINISHED"}


class RENDERFARM_OT_report(bpy.types.Operator):
    """Internal: turns news from worker threads into Blender reports."""

    bl_idname = "render_farm.report"
    bl_label = "Render Farm Report"
    bl_options = {"INTERNAL"}

    level: StringProperty(default="INFO", options={"SKIP_SAVE"})
    message: StringProperty(options={"SKIP_SAVE"})

    def execute(self, context: bpy.types.Context) -> set[OperatorReturnItems]:
        """Report ``message`` at ``level``."""
        self.report({self.level if self.level in ("INFO", "WARNING", "ERROR") else "INFO"}, self.message)
        return {"FINISHED"}


def blender_report(level: str, text: str) -> None:
    """:func:`.state.report` inside Blender: an operator report (Info log, status bar)."""
    if bpy.app.background:
        print(f"render farm: {level}: {text}")
        return
    try:
        bpy.ops.render_farm.report(level=level, message=text)  # type: ignore[attr-defined]
    except RuntimeError:
        print(f"render farm: {level}: {text}")


CLASSES = (
    RENDERFARM_OT_login,
    RENDERFARM_OT_logout,
    RENDERFARM_OT_test_connection,
    RENDERFARM_OT_submit,
    RENDERFARM_OT_cancel_submission,
    RENDERFARM_OT_show_job,
    RENDERFARM_OT_refresh_jobs,
    RENDERFARM_OT_cancel_job,
    RENDERFARM_OT_download,
    RENDERFARM_OT_open_image,
    RENDERFARM_OT_report,
)
