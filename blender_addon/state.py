"""What the panel shows, and the one road from worker threads back to Blender's main thread.

Blender's data may be touched only on the main thread. Worker threads (packing, uploads,
polling, downloads) therefore never touch ``bpy`` nor this state: they :func:`post` a
function, and :func:`drain` (a ``bpy.app.timers`` timer, every 0.2 s) runs the posted
functions on the main thread, which update :data:`FARM` and redraw the panel. Scripts run
in background mode, where timers do not fire, use the blocking paths of the operators instead
(or call :func:`drain` themselves).
"""

from __future__ import annotations

import queue
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DRAIN_INTERVAL_S = 0.2
"""Seconds between two runs of :func:`drain` (how soon a worker's news reaches the panel)."""

_posted: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]]] = queue.SimpleQueue()
_redraw: list[Callable[[], None]] = []


def post(fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` on Blender's main thread at the next :func:`drain` (thread-safe)."""
    _posted.put((fn, args))


def drain() -> float:
    """Run what worker threads posted, in order, then redraw; returns the timer's next interval
    (seconds). An exception in one posted function is printed and does not stop the others."""
    ran = False
    while True:
        try:
            fn, args = _posted.get_nowait()
        except queue.Empty:
            break
        ran = True
        try:
            fn(*args)
        except Exception:
            traceback.print_exc()
    if ran:
        for redraw in _redraw:
            redraw()
    return DRAIN_INTERVAL_S


_reporters: list[Callable[[str, str], None]] = []


def report(level: str, text: str) -> None:
    """Tell the artist ``text`` as a Blender report (``level``: ``INFO``, ``WARNING``, ``ERROR``);
    main thread only. Without a reporter (outside Blender) it is printed."""
    if _reporters:
        _reporters[-1](level, text)
    else:
        print(f"render farm: {level}: {text}")


def set_reporter(fn: Callable[[str, str], None] | None) -> None:
    """Use ``fn(level, text)`` for :func:`report` (None: print)."""
    _reporters.clear()
    if fn is not None:
        _reporters.append(fn)


def on_redraw(fn: Callable[[], None]) -> None:
    """Call ``fn`` after each :func:`drain` that ran something (the panel's redraw)."""
    _redraw.append(fn)


@dataclass
class Submission:
    """A submission in progress (packing, uploading, creating the job) or just ended.

    Attributes:
        stage: ``saving``, ``checking`` (the login and project), ``packing``, ``uploading``,
            ``creating``, then ``submitted``, ``missing``, ``failed`` or ``canceled``.
        progress: 0..1 within the stage.
        text: one line for the panel.
        missing: files reported missing (absolute paths) when ``stage`` is ``missing``.
        error_kind: a :class:`~.client.FarmError` kind, or ``pack``.
        job_id: the created job (``submitted``).
        threads: ids of the threads that did the work (never Blender's main thread).
    """

    stage: str = "saving"
    progress: float = 0.0
    text: str = ""
    missing: list[str] = field(default_factory=list)
    error_kind: str = ""
    job_id: str = ""
    cancel: threading.Event = field(default_factory=threading.Event)
    threads: set[int] = field(default_factory=set)

    @property
    def busy(self) -> bool:
        """True while the submission is still working."""
        return self.stage in ("saving", "checking", "packing", "uploading", "creating")


@dataclass
class JobView:
    """One job as the panel shows it.

    Attributes:
        summary: ``GET /api/jobs/{id}`` (state, progress in percent, frames_done, frame_count...).
        frame_states: frame number to ``done``, ``rendering``, ``queued``, ``failed`` or ``canceled``.
        latest_frame: the newest stored frame (by time of storing), or None.
        thumbnail: path of the latest frame's thumbnail on disk, once fetched.
        thumbnail_frame: the frame that thumbnail shows.
        download_dir: where :class:`~.ops` downloaded its frames, once done.
        downloaded: files downloaded so far.
        download_text: the download's progress or outcome, one line.
        error: the last error polling it (one line), cleared by the next good poll.
    """

    job_id: str
    summary: dict[str, Any] = field(default_factory=dict)
    frame_states: dict[int, str] = field(default_factory=dict)
    latest_frame: int | None = None
    thumbnail: str = ""
    thumbnail_frame: int | None = None
    download_dir: str = ""
    downloaded: list[str] = field(default_factory=list)
    download_text: str = ""
    error: str = ""

    @property
    def state(self) -> str:
        """The job's state (``queued``, ``running``, ``completed``, ``failed``, ``canceled``) or ``""``."""
        return str(self.summary.get("state", ""))

    @property
    def finished(self) -> bool:
        """True once the job completed, failed or was canceled."""
        return self.state in ("completed", "failed", "canceled")


@dataclass
class FarmState:
    """Everything the panel draws; changed only on the main thread."""

    submission: Submission | None = None
    jobs: dict[str, JobView] = field(default_factory=dict)
    active_job: str = ""
    recent: list[dict[str, Any]] = field(default_factory=list)
    recent_error: str = ""
    auth_error: str = ""
    connection: str = ""
    projects: list[str] = field(default_factory=list)

    def view(self, job_id: str) -> JobView:
        """The view of ``job_id``, made on first use."""
        if job_id not in self.jobs:
            self.jobs[job_id] = JobView(job_id)
        return self.jobs[job_id]


FARM = FarmState()
"""The add-on's one state (reset by ``unregister``)."""


def frame_states(tasks: list[dict[str, Any]], stored: set[int]) -> dict[int, str]:
    """Each frame's state from the job's tasks and its stored frames.

    A stored frame is ``done`` whatever its task says; the frame a running task is on is
    ``rendering``; other frames take their task's state (``queued`` for queued, dispatched,
    running or retrying tasks, else ``failed`` or ``canceled``).
    """
    states: dict[int, str] = {}
    for t in tasks:
        st = str(t.get("state", ""))
        for f in t.get("frames") or []:
            if f in stored:
                states[f] = "done"
            elif st == "running" and t.get("current_frame") == f:
                states[f] = "rendering"
            elif st in ("failed", "canceled"):
                states[f] = st
            elif st == "completed":
                states[f] = "done"
            else:
                states[f] = "queued"
    for f in stored:
        states[f] = "done"
    return dict(sorted(states.items()))


def frame_ranges(states: dict[int, str]) -> list[tuple[str, str]]:
    """``{1: done, 2: done, 3: queued}`` as ``[("done", "1-2"), ("queued", "3")]``: runs of
    consecutive frames (in frame order) that share a state."""
    out: list[tuple[str, str]] = []
    run: list[int] = []
    run_state = ""
    for f, st in sorted(states.items()):
        if run and st == run_state and f == run[-1] + 1:
            run.append(f)
            continue
        if run:
            out.append((run_state, _span(run)))
        run, run_state = [f], st
    if run:
        out.append((run_state, _span(run)))
    return out


def _span(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"
