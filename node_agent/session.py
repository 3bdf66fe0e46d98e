"""A Blender process that renders the tasks of one job one after another (warm Blender).

Opening a .blend, building its scene and compiling its shaders costs seconds per task; a
session pays it once per job on this agent. The process runs ``render_task.py`` in warm
mode (``RenderParams.command_dir``): the agent writes one command file per task into the
session's command folder and the script renders it into that task's own output folder,
tagging every event with the task id. The session ends when the next task belongs to
another job, when the agent stops, when no command came for ``idle_s`` seconds (the script
exits by itself), or when a task must be abandoned (cancel, stale lease, timeout, stall):
the process is then killed, since it may be in the middle of a frame.

The executor sees one long run; per-task hard and no-progress timeouts are kept here.
Inside a container the command folder and the parameters are read-only, the tasks' output
folder and Blender's temporary folder are the only writable paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from node_agent.executor.base import BlenderRun, Executor, RunOutcome, watch_run
from node_agent.logparse import parse_line
from protocol.messages import RenderParams
from templates import template_path

log = logging.getLogger(__name__)

SESSION_LIFETIME_S = 7 * 24 * 3600.0
"""The executor's own limits for a session's process, in seconds: per-task limits apply instead."""

EXIT_WAIT_S = 10.0
"""Seconds to wait for the process to exit by itself after an error or a ``quit`` command."""


@dataclass
class TaskRun:
    """How one task's render in a session ended.

    Attributes:
        outcome: like a one-shot run's: ``reason`` ``"exited"`` with ``exit_code`` 0 when the
            task's ``done`` event came (the process goes on), else the process's own end, or
            ``"timeout"`` / ``"stalled"`` / ``"canceled"`` when the session killed it.
        died: the process ended during the task without reporting an error of the task (a
            crash, a kill, an out-of-memory): the task may be retried in a fresh process.
        warm: the process had rendered an earlier task before this one (it was reused).
    """

    outcome: RunOutcome
    died: bool
    warm: bool


class _Watch:
    """The task a session is rendering now."""

    def __init__(self, task: str, on_line: Callable[[str], None]) -> None:
        self.task = task
        self.on_line = on_line
        self.done = asyncio.Event()
        self.ok = False
        self.error = False


class BlenderSession:
    """One warm Blender process for the tasks of job ``key``.

    Args:
        executor: runs the process (local subprocess or container).
        key: what tasks it may render (the job id): :meth:`matches` compares it.
        folder: the session's own folder (made here, removed by :meth:`close`).
        params: the job's render parameters; ``frames``, ``output_dir`` and ``manifest_path``
            come from each task's command instead.
        read_only: paths the process reads (the model's folder).
        idle_s: the process exits after this many seconds without a command.
        labels: container labels (``{"job": ..., "agent": ...}``).
    """

    def __init__(
        self,
        executor: Executor,
        key: str,
        folder: Path,
        params: RenderParams,
        read_only: tuple[Path, ...] = (),
        idle_s: float = 30.0,
        labels: dict[str, str] | None = None,
    ) -> None:
        self.executor = executor
        self.key = key
        self.folder = folder
        self.commands = folder / "cmds"
        self.out_root = folder / "out"
        self.tmp = folder / "tmp"
        self.params = params
        self.read_only = read_only
        self.idle_s = idle_s
        self.labels = dict(labels or {})
        self.id = uuid.uuid4().hex[:12]
        self.device: dict = {}
        """The script's ``device`` event: ``{"device": str, "fallback": bool, "reason": str}``."""
        self.tasks_done = 0
        self._seq = 0
        self._watch: _Watch | None = None
        self._cancel = asyncio.Event()
        self._runner: asyncio.Task[RunOutcome] | None = None
        self._last_output = time.monotonic()
        self._orphan_lines: list[str] = []

    # ------------------------------------------------------------ life

    @property
    def alive(self) -> bool:
        """Whether the process is still running (it may end at any moment: idle, crash)."""
        return self._runner is not None and not self._runner.done()

    def matches(self, key: str) -> bool:
        """Whether a task of job ``key`` may be rendered by this session now."""
        return self.alive and self.key == key

    async def start(self) -> None:
        """Make the folders, write the parameters and start the process (it then opens the file)."""
        for d in (self.commands, self.out_root, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        params_path = self.folder / "params.json"
        params = dataclasses.replace(
            self.params,
            output_dir=str(self.out_root),
            manifest_path=str(self.out_root / "manifest.json"),
            command_dir=str(self.commands),
        )
        params_path.write_text(json.dumps({**params.to_dict(), "idle_s": self.idle_s}))
        run = BlenderRun(
            script=template_path("render_task.py"),
            args=[str(params_path)],
            cwd=self.folder,
            timeout_s=SESSION_LIFETIME_S,
            stall_timeout_s=SESSION_LIFETIME_S,
            read_only=(*self.read_only, params_path, self.commands),
            writable=(self.out_root, self.tmp),
            tmp_dir=self.tmp,
            labels={**self.labels, "session": self.id},
        )
        self._runner = asyncio.create_task(
            self.executor.run(run, self._on_line, cancel=self._cancel), name=f"blender-session-{self.id}"
        )

    async def close(self, grace_s: float = 5.0) -> None:
        """End the process (a ``quit`` command, then a kill after ``grace_s`` seconds); remove the folder."""
        if self._runner is not None:
            if not self._runner.done():
                with contextlib.suppress(OSError):
                    self._command({"quit": True})
                with contextlib.suppress(TimeoutError, Exception):
                    await asyncio.wait_for(asyncio.shield(self._runner), grace_s)
            await self._kill()
        await asyncio.to_thread(shutil.rmtree, self.folder, True)

    async def _kill(self) -> RunOutcome | None:
        if self._runner is None:
            return None
        self._cancel.set()
        try:
            return await asyncio.shield(self._runner)
        except Exception as exc:  # the executor itself failed
            log.error("Blender session %s: executor error: %s", self.id, exc)
            return RunOutcome(None, "spawn_failed", [f"executor error: {exc}"], 0.0)

    def crash_report(self, max_lines: int = 60) -> list[str]:
        """The last lines of a crash report the process left in its temporary folder
        (``renderfarm.crash.txt`` from the render script, ``<file>.crash.txt`` from Blender)."""
        lines: list[str] = []
        with contextlib.suppress(OSError):
            for path in sorted(self.tmp.rglob("*.crash.txt"), key=lambda p: p.stat().st_mtime):
                text = path.read_text(errors="replace").strip()
                if text:
                    lines.append(f"--- crash report {path.name} ---")
                    lines.extend(text.splitlines()[-max_lines:])
        return lines

    # ------------------------------------------------------------ tasks

    def task_dirs(self, task_id: str, lease_id: str) -> tuple[Path, Path]:
        """(output folder, manifest path) of one attempt; the script makes the folder."""
        out = self.out_root / f"{task_id}-{lease_id}"
        return out, out / "manifest.json"

    async def render(
        self,
        task_id: str,
        lease_id: str,
        frames: list[int],
        on_line: Callable[[str], None],
        timeout_s: float,
        stall_timeout_s: float,
        cancel: asyncio.Event,
    ) -> TaskRun:
        """Render ``frames`` of one task and return how it ended (see :class:`TaskRun`).

        ``on_line`` gets every output line while the task is rendered. ``timeout_s`` bounds the
        task, ``stall_timeout_s`` the time without output; either kills the process, as does
        setting ``cancel``.
        """
        if self._runner is None:
            raise RuntimeError("session not started")
        warm = self.tasks_done > 0
        out_dir, manifest = self.task_dirs(task_id, lease_id)
        watch = _Watch(task_id, on_line)
        self._watch = watch
        orphans, self._orphan_lines = self._orphan_lines, []
        for line in orphans:  # what the process said while opening the file (an error, say)
            self._on_line(line)
        started = self._last_output = time.monotonic()
        try:
            self._command(
                {
                    "task": task_id,
                    "frames": list(frames),
                    "output_dir": str(out_dir),
                    "manifest_path": str(manifest),
                }
            )
            reason = await self._wait(watch, started, timeout_s, stall_timeout_s, cancel)
        finally:
            self._watch = None
        duration = time.monotonic() - started
        if reason == "done":
            self.tasks_done += 1
            return TaskRun(RunOutcome(0, "exited", [], duration), died=False, warm=warm)
        if reason == "ended":
            outcome = await asyncio.shield(self._runner)
            return TaskRun(outcome, died=not watch.error, warm=warm)
        if reason == "error":  # the script reported the task's error and exits
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._runner), EXIT_WAIT_S)
        outcome = await self._kill()
        assert outcome is not None
        if reason in ("timeout", "stalled", "canceled"):
            outcome = dataclasses.replace(outcome, exit_code=None, reason=reason)
        return TaskRun(outcome, died=False, warm=warm)

    async def _wait(
        self, watch: _Watch, started: float, timeout_s: float, stall_s: float, cancel: asyncio.Event
    ) -> str:
        """Wait for the task's end: ``done``, ``error``, ``ended`` (process gone), ``timeout``,
        ``stalled`` or ``canceled``."""
        assert self._runner is not None
        done = asyncio.ensure_future(watch.done.wait())
        ended = asyncio.ensure_future(asyncio.wait([done, self._runner], return_when=asyncio.FIRST_COMPLETED))
        try:
            reason = await watch_run(ended, started, timeout_s, stall_s, lambda: self._last_output, cancel)
        finally:
            ended.cancel()
            done.cancel()
        if reason != "exited":
            return reason
        if watch.done.is_set():
            return "done" if watch.ok else "error"
        return "ended"

    def _command(self, body: dict) -> None:
        """Write the next command file whole (a temp file renamed into place)."""
        self._seq += 1
        path = self.commands / f"{self._seq:06d}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body))
        os.replace(tmp, path)

    def _on_line(self, line: str) -> None:
        self._last_output = time.monotonic()
        ev = parse_line(line)
        watch = self._watch
        if ev is not None and ev.kind == "device":
            self.device = {k: ev.data.get(k) for k in ("device", "fallback", "reason")}
        if watch is None:
            if len(self._orphan_lines) < 200:
                self._orphan_lines.append(line)
            return
        watch.on_line(line)
        if ev is None:
            return
        task = ev.data.get("task") if ev.data else None
        if ev.kind == "done" and task == watch.task:
            watch.ok = True
            watch.done.set()
        elif ev.kind == "error" and task in (None, watch.task):
            watch.error = True
            watch.done.set()
