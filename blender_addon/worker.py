"""The add-on's network and packing work, run in worker threads (or, for scripts, inline).

Nothing here imports ``bpy``. Each function reports through ``notify(fn, *args)``: in a
worker thread that is :func:`.state.post` (``fn`` runs later on Blender's main thread);
inline it calls ``fn`` at once.
"""

from __future__ import annotations

import re
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import packing
from .client import FarmClient, FarmError
from .frames import FrameSpecError, parse_frames
from .state import FARM, JobView, Submission, frame_states

Notify = Callable[..., None]
POLL_INTERVAL_S = 2.0
"""Seconds between two polls of a job the panel shows."""
THUMBNAIL_PX = 256
"""Longest side of the panel's thumbnail, in pixels."""
MAX_THUMBNAIL_BYTES = 8 << 20
"""Largest thumbnail accepted from the farm, in bytes."""
MAX_FULL_FRAME_PREVIEW_BYTES = 64 << 20
"""A frame the server cannot thumbnail (OpenEXR) is fetched whole for the preview only up to this size."""
SUBMITTING_ROLES = ("manager", "artist")
"""Project roles that may upload models and create jobs (``model:create`` and ``job:create`` in the
server's ``server/auth/permissions.py``), checked before packing so that a refusal costs no upload."""
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-][A-Za-z0-9 ._#+-]{0,200}$")


@dataclass
class SubmitParams:
    """What a submission sends (see ``POST /api/jobs``) and where its pack comes from.

    Attributes:
        server, token: the farm and the personal API token.
        project: the project's name or id ('' for the caller's only project).
        job: the job's fields (frames, chunk_size, priority, device, samples, output_format,
            allow_missing, scene, name); ``model_id`` is added after the upload.
        blend: the saved copy of the scene, inside ``project_root``.
        project_root: the folder whose files keep their relative place in the pack.
        main_name: the artist's file name, given to the main .blend inside the pack.
        cleanup: what to delete once packed (the temporary copy, or the folder holding it).
    """

    server: str
    token: str
    project: str
    job: dict[str, Any]
    blend: Path
    project_root: Path
    main_name: str
    cleanup: Path | None = None


def submit(sub: Submission, p: SubmitParams, notify: Notify) -> None:
    """Pack, upload and create the job; every outcome reaches ``sub`` through ``notify``.

    Never raises: a failure ends the submission in stage ``missing``, ``failed`` or ``canceled``.
    """
    sub.threads.add(threading.get_ident())
    work = Path(tempfile.mkdtemp(prefix="renderfarm-submit-"))
    packing.track(work)
    last = [0.0]

    def stage(name: str, progress: float, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - last[0] >= 0.1:
            last[0] = now
            notify(_set_stage, sub, name, progress, text)

    def pack_progress(what: str, done: int, total: int) -> None:
        if what == "trace":
            stage("packing", 0.0, f"Tracing dependencies: {done} found")
        else:
            stage(
                "packing",
                done / total if total else 0.0,
                f"{'Copying' if what == 'copy' else 'Zipping'} {_mib(done)} of {_mib(total)}",
            )

    try:
        client = FarmClient(p.server, p.token)
        stage("checking", 0.0, "Checking your login and project", force=True)
        project = preflight(client, p.project)
        stage("packing", 0.0, "Tracing dependencies", force=True)
        try:
            packed = packing.pack_scene(
                p.blend,
                p.project_root,
                work,
                main_name=p.main_name,
                allow_missing=bool(p.job.get("allow_missing")),
                progress=pack_progress,
                cancelled=sub.cancel.is_set,
            )
        finally:
            if p.cleanup is not None:
                packing.remove_quietly(p.cleanup)
        stage("uploading", 0.0, f"Uploading {_mib(packed.size_bytes)}", force=True)
        model = client.upload_model(
            packed.zip_path,
            filename=packed.zip_path.name,
            main=packed.main,
            project=project or None,
            progress=lambda d, t: stage(
                "uploading", d / t if t else 1.0, f"Uploading {_mib(d)} of {_mib(t)}"
            ),
            cancelled=sub.cancel.is_set,
        )
        if sub.cancel.is_set():
            raise packing.Canceled("the submission was canceled")
        stage("creating", 1.0, "Creating the job", force=True)
        job = client.create_job({**p.job, "model_id": model["id"]})
        notify(_submitted, sub, job, packed.missing, packed.outside)
    except packing.MissingFiles as exc:
        notify(_failed, sub, "missing", "pack", str(exc), exc.missing)
    except packing.Canceled:
        notify(_failed, sub, "canceled", "", "Submission canceled; nothing was submitted", [])
    except packing.PackError as exc:
        notify(_failed, sub, "failed", "pack", str(exc), [])
    except FarmError as exc:
        if exc.kind == "canceled":
            notify(_failed, sub, "canceled", "", "Submission canceled; nothing was submitted", [])
        else:
            notify(_failed, sub, "failed", exc.kind, farm_message(exc), [])
    except Exception as exc:  # a worker thread must always report back
        notify(_failed, sub, "failed", "bug", f"the submission failed: {type(exc).__name__}: {exc}", [])
    finally:
        packing.remove_quietly(work)
        packing.untrack(work)
        if p.cleanup is not None:
            packing.remove_quietly(p.cleanup)
            packing.untrack(p.cleanup)


def check_frames(spec: str) -> list[int]:
    """The frames of ``spec`` (the farm's own parser, ``protocol/frames.py``, bundled).

    Raises:
        FarmError: (``invalid``, field ``frames``) the spec is not valid.
    """
    try:
        return parse_frames(spec)
    except FrameSpecError as exc:
        raise FarmError("invalid", f"frames {spec!r}: {exc}", 400, "frames") from None


def preflight(client: FarmClient, project: str) -> str:
    """Check the token and the project before anything is packed or uploaded; returns the
    project to upload to ('' lets the farm choose, for an admin).

    Raises:
        FarmError: ``auth`` (the token is refused), or ``refused`` naming the problem: not a
            member of ``project``, a role that may not submit, or several projects and none chosen.
    """
    me = client.me()
    if not isinstance(me, dict) or not isinstance(me.get("projects", []), list):
        raise FarmError("server", f"{client.server} did not answer like a renderfarm server")
    projects = [p for p in me.get("projects") or [] if isinstance(p, dict)]
    admin = bool(me.get("is_admin"))
    names = ", ".join(str(p.get("name")) for p in projects) or "none"
    if project:
        match = [p for p in projects if project in (p.get("name"), p.get("id"))]
        if not match:
            if admin:
                return project
            raise FarmError(
                "refused", f"you are not a member of project {project!r} (yours: {names})", 404, "project"
            )
        if not admin and match[0].get("role") not in SUBMITTING_ROLES:
            raise FarmError(
                "refused",
                f"your role in project {project!r} is {match[0].get('role')}: it may "
                "not submit jobs (ask a manager to make you an artist)",
                403,
                "project",
            )
        return str(match[0].get("name"))
    allowed = [p for p in projects if admin or p.get("role") in SUBMITTING_ROLES]
    if len(allowed) == 1:
        return str(allowed[0].get("name"))
    if not allowed and not admin:
        raise FarmError(
            "refused", f"none of your projects lets you submit jobs (yours: {names})", 403, "project"
        )
    if len(allowed) > 1:
        raise FarmError(
            "refused",
            "choose a Project in the Render Farm panel (or project=... from a script): "
            f"you are in several ({', '.join(str(p.get('name')) for p in allowed)})",
            400,
            "project",
        )
    return ""


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def farm_message(exc: FarmError) -> str:
    """``exc`` worded for the artist: what to do about a refused login, the farm's refusal with its
    field, or the message as it is."""
    if exc.kind == "invalid":
        return str(exc)[:1].upper() + str(exc)[1:]
    if exc.kind == "auth" and str(exc).startswith("not logged in"):
        return str(exc)[:1].upper() + str(exc)[1:]
    if exc.kind == "auth":
        return f"Your farm login expired or was revoked ({exc}): log in again in the add-on's preferences"
    if exc.kind == "refused" and exc.field:
        return f"The farm refused it ({exc.field}): {exc}"
    if exc.kind == "refused":
        return f"The farm refused it: {exc}"
    return str(exc)


def _set_stage(sub: Submission, name: str, progress: float, text: str) -> None:
    if sub.busy:  # a late progress report never overwrites the outcome
        sub.stage, sub.progress, sub.text = name, progress, text


def _submitted(sub: Submission, job: dict[str, Any], missing: list[str], outside: list[str]) -> None:
    sub.stage, sub.progress, sub.job_id = "submitted", 1.0, str(job["id"])
    extra = f"; {len(missing)} missing file(s) allowed" if missing else ""
    extra += f"; {len(outside)} file(s) from outside the project packed" if outside else ""
    sub.text = f"Submitted job {job['id']} ({job.get('frame_count', '?')} frames){extra}"
    sub.missing = missing
    FARM.auth_error = ""
    view = FARM.view(sub.job_id)
    view.summary = job
    FARM.active_job = sub.job_id


def _failed(sub: Submission, stage: str, kind: str, text: str, missing: list[str]) -> None:
    sub.stage, sub.error_kind, sub.text, sub.missing = stage, kind, text, missing
    if kind == "auth":
        FARM.auth_error = text


# ------------------------------------------------------------------ watching a job


def poll_once(client: FarmClient, view_id: str, seen: set[int], thumb_dir: Path, notify: Notify) -> bool:
    """Fetch a job's summary, tasks and stored frames, and the latest new frame's thumbnail.

    Args:
        seen: frames already known to be stored (updated in place).
        thumb_dir: where thumbnails are written (``<frame>.png``).

    Returns:
        True once the job has finished (nothing more will change).

    Raises:
        FarmError: the farm could not be asked.
    """
    summary = client.job(view_id)
    tasks = client.tasks(view_id)
    if int(summary.get("frames_done") or 0) == len(seen) and seen:  # no new frame: its list is as known
        outputs, stored = [], set(seen)
    else:
        outputs = client.outputs(view_id)
        stored = {int(o["frame"]) for o in outputs}
    new = sorted(stored - seen)
    seen |= stored
    thumb = None
    if new:
        latest = new[-1]
        out = next(o for o in outputs if int(o["frame"]) == latest)
        thumb = _thumbnail(client, view_id, out, thumb_dir)
    notify(_job_update, view_id, summary, frame_states(tasks, stored), new[-1] if new else None, thumb)
    return str(summary.get("state")) in ("completed", "failed", "canceled")


def _thumbnail(
    client: FarmClient, job_id: str, out: dict[str, Any], thumb_dir: Path
) -> tuple[int, str] | None:
    """The frame's thumbnail as ``(frame, path)``: the server's PNG thumbnail, or the whole frame
    (up to :data:`MAX_FULL_FRAME_PREVIEW_BYTES`) when the server cannot make one (OpenEXR)."""
    frame = int(out["frame"])
    thumb_dir.mkdir(parents=True, exist_ok=True)
    dest = thumb_dir / f"{frame}.png"
    try:
        client.download(
            f"/api/jobs/{urllib.parse.quote(job_id, safe='')}/outputs/{frame}/thumbnail?size={THUMBNAIL_PX}",
            dest,
            max_bytes=MAX_THUMBNAIL_BYTES,
            deadline_s=60,
        )
    except FarmError as exc:
        size = int(out.get("size_bytes") or 0)
        if exc.status not in (404, 415) or size > MAX_FULL_FRAME_PREVIEW_BYTES:
            return None
        dest = thumb_dir / f"{frame}{Path(safe_filename(str(out.get('filename')), frame)).suffix}"
        try:
            client.download(
                str(out["url"]),
                dest,
                sha256=out.get("sha256"),
                total=size,
                max_bytes=min(size, MAX_FULL_FRAME_PREVIEW_BYTES),
            )
        except FarmError:
            return None
    for older in thumb_dir.iterdir():  # one thumbnail per job is all the panel shows
        if older != dest:
            packing.remove_quietly(older)
    return frame, str(dest)


def _job_update(
    job_id: str,
    summary: dict[str, Any],
    states: dict[int, str],
    latest: int | None,
    thumb: tuple[int, str] | None,
) -> None:
    view = FARM.view(job_id)
    view.summary, view.frame_states, view.error = summary, states, ""
    if latest is not None:
        view.latest_frame = latest
    if thumb:
        view.thumbnail_frame, view.thumbnail = thumb
    FARM.auth_error = ""


def _job_error(job_id: str, kind: str, text: str) -> None:
    FARM.view(job_id).error = text
    if kind == "auth":
        FARM.auth_error = text


def watch(
    client: FarmClient,
    job_id: str,
    thumb_dir: Path,
    stop: threading.Event,
    notify: Notify,
    interval: float = POLL_INTERVAL_S,
) -> None:
    """Poll ``job_id`` every ``interval`` seconds until it finishes, ``stop`` is set or the
    token is refused; errors (an unreachable farm) are shown and polling goes on."""
    seen: set[int] = set()
    while not stop.is_set():
        try:
            if poll_once(client, job_id, seen, thumb_dir, notify):
                return
        except FarmError as exc:
            notify(_job_error, job_id, exc.kind, farm_message(exc))
            if exc.kind == "auth" or exc.status == 404:
                return
        except Exception as exc:
            notify(_job_error, job_id, "bug", f"{type(exc).__name__}: {exc}")
        stop.wait(interval)


# ------------------------------------------------------------------ downloads


def safe_filename(name: str, frame: int) -> str:
    """The server's file name for a frame if it is a plain name (no folder, no ``..``, no
    control characters), else ``frame_<n>`` with its extension: a download never writes
    outside its folder, whatever the server says."""
    base = name.rsplit("/", 1)[-1].rsplit("\\", 1)[-1]
    if _SAFE_NAME.match(base) and base not in (".", "..") and not base.startswith(".."):
        return base
    ext = Path(base).suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", Path(base).suffix or "") else ""
    return f"frame_{frame:06d}{ext}"


def download(
    client: FarmClient, job_id: str, dest: Path, notify: Notify, frames: set[int] | None = None
) -> list[Path]:
    """Download the job's stored frames (or only ``frames``) into ``dest``.

    A file already there with the same SHA-256 is kept; others are written through a
    ``.part`` file and renamed into place, so no half-written frame is ever left.

    Returns:
        The frames' paths, in frame order.

    Raises:
        FarmError: the farm could not be asked, or refused.
        OSError: ``dest`` cannot be written.
    """
    import hashlib

    outputs = [o for o in client.outputs(job_id) if frames is None or int(o["frame"]) in frames]
    if outputs:
        dest.mkdir(parents=True, exist_ok=True)
    total = sum(int(o.get("size_bytes") or 0) for o in outputs)
    done = 0
    paths: list[Path] = []
    for i, o in enumerate(outputs):
        name = safe_filename(str(o.get("filename") or ""), int(o["frame"]))
        n = 1
        while dest / name in paths:  # two frames the farm named alike: neither overwrites the other
            stem = Path(name).stem.rsplit("~", 1)[0]
            name = f"{stem}~{n}{Path(name).suffix}"
            n += 1
        path = dest / name
        same = False
        if path.is_file() and o.get("sha256"):
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
            same = h.hexdigest() == o["sha256"]
        if not same:
            client.download(str(o["url"]), path, sha256=o.get("sha256"), total=int(o.get("size_bytes") or 0))
        done += int(o.get("size_bytes") or 0)
        paths.append(path)
        notify(
            _download_progress,
            job_id,
            str(dest),
            [str(p) for p in paths],
            f"Downloaded {i + 1} of {len(outputs)} frames ({_mib(done)} of {_mib(total)})",
        )
    if not outputs:
        notify(_download_progress, job_id, str(dest), [], "No frames are stored yet")
    return paths


def _download_progress(job_id: str, folder: str, paths: list[str], text: str) -> None:
    view: JobView = FARM.view(job_id)
    view.download_dir, view.downloaded, view.download_text = folder, paths, text


def recent_jobs(client: FarmClient, notify: Notify, limit: int = 8) -> None:
    """Fetch the caller's ``limit`` newest jobs into the panel's list (errors shown there)."""
    try:
        jobs = client.jobs(limit=limit, mine=True)
    except FarmError as exc:
        notify(_recent, [], farm_message(exc), exc.kind)
        return
    notify(_recent, jobs, "", "")


def _recent(jobs: list[dict[str, Any]], error: str, kind: str) -> None:
    FARM.recent, FARM.recent_error = jobs, error
    if kind == "auth":
        FARM.auth_error = error
    elif not error:
        FARM.auth_error = ""
