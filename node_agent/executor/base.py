"""What every render executor takes and returns.

An executor runs one Blender process for one task attempt (a local subprocess, or a
container) and reports how it ended. It never decides whether the task succeeded: the
caller reads the events and the manifest for that.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 50
"""How many of the last output lines a :class:`RunOutcome` keeps."""

REASONS = ("exited", "timeout", "stalled", "canceled", "spawn_failed")
"""Possible values of :attr:`RunOutcome.reason`."""


class BlenderNotFound(RuntimeError):
    """Neither a Blender binary nor the bpy module is available to run renders."""


@dataclass(frozen=True)
class BlenderRun:
    """One Blender run.

    Attributes:
        script: the Python script Blender runs (e.g. ``template_path("render_task.py")``).
        args: arguments for the script; they follow the script for the bpy module and
            ``--`` for a Blender binary, so the script reads them the same way.
        cwd: working directory of the process (also its ``HOME``); must exist.
        timeout_s: hard limit on the whole run, in seconds.
        stall_timeout_s: the run is killed when it prints nothing for this many seconds.
        env: extra environment variables, added to the minimal environment the
            executor builds (variables that look like secrets are still dropped).
        read_only: paths the run reads (the input model's folder, the script, the
            parameters); a container executor bind-mounts each read-only at the same path.
        writable: paths the run writes (the attempt's output folder); a container
            executor bind-mounts each read-write at the same path. Nothing else is writable
            in a container but a private, size-limited ``/tmp``.
        tmp_dir: Blender's temporary folder (``TMPDIR``), where it writes its crash report
            (``<file>.crash.txt``); it must lie in ``writable`` for a container. ``None``:
            the executor's default.
        labels: what the run is for (``{"task": id, "job": id, "agent": name}``); a container
            executor labels its container with them, so that an agent restarted after a
            crash can remove what it left behind.
    """

    script: Path
    args: list[str]
    cwd: Path
    timeout_s: float
    stall_timeout_s: float
    env: dict[str, str] | None = None
    read_only: tuple[Path, ...] = ()
    writable: tuple[Path, ...] = ()
    tmp_dir: Path | None = None
    labels: dict[str, str] | None = None


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended.

    Attributes:
        exit_code: the process's exit status; None if the executor killed it (timeout,
            stall, cancel) or it never started; negative ``-N`` when signal N ended it on
            its own (e.g. -6 for SIGABRT, -9 for an OOM kill).
        reason: ``"exited"`` (ended by itself), ``"timeout"`` (``timeout_s`` passed),
            ``"stalled"`` (no output for ``stall_timeout_s``), ``"canceled"`` (the cancel
            event was set) or ``"spawn_failed"`` (the process could not be started).
        log_tail: the last :data:`LOG_TAIL_LINES` output lines (stdout and stderr
            interleaved, decoded, each at most 64 KiB); for ``spawn_failed``, the error.
        duration_s: wall-clock seconds from spawn to the end of the run (reaped).
        oom_killed: the kernel's out-of-memory killer ended it (known for a container: Docker's
            ``State.OOMKilled``; a local process killed by SIGKILL only *may* have been).
    """

    exit_code: int | None
    reason: str
    log_tail: list[str]
    duration_s: float
    oom_killed: bool = False
    oom_known: bool = False
    """Whether ``oom_killed`` is known for sure (a container's state says it) rather than
    merely False (a local process, which the kernel's OOM killer ends with SIGKILL unnoticed)."""

    @property
    def ok(self) -> bool:
        """True when the process exited by itself with status 0."""
        return self.reason == "exited" and self.exit_code == 0


class Executor(Protocol):
    """Runs Blender processes."""

    async def run(
        self,
        run: BlenderRun,
        on_line: Callable[[str], None],
        cancel: asyncio.Event | None = None,
    ) -> RunOutcome:
        """Run ``run`` to its end and return how it ended; never leaves a process behind.

        ``on_line`` is called with every output line as it arrives (exceptions it raises
        are logged and ignored). Setting ``cancel`` stops the run within 5 seconds with
        reason ``"canceled"``. Raises nothing for failures of the run itself: they are
        in the outcome.
        """
        ...


async def watch_run(
    ended: asyncio.Future[Any],
    started: float,
    timeout_s: float,
    stall_timeout_s: float,
    last_output: Callable[[], float],
    cancel: asyncio.Event | None = None,
) -> str:
    """Wait until a run ends by itself or must be stopped, and say which.

    Args:
        ended: done when the run has ended by itself (its process or container exited).
        started: when the run started, a ``time.monotonic()`` value.
        timeout_s: hard limit on the run, in seconds from ``started``.
        stall_timeout_s: the run must be stopped after this many seconds without output.
        last_output: returns the ``time.monotonic()`` value of the run's last output.
        cancel: when set, the run must be stopped.

    Returns:
        ``"exited"`` (``ended`` is done), ``"canceled"``, ``"timeout"`` or ``"stalled"``; the
        caller stops the run for the last three. Checked in that order, so a run that ended
        counts as ended even if a limit passed meanwhile.
    """
    canceled = asyncio.ensure_future(cancel.wait()) if cancel is not None else None
    try:
        while True:
            if ended.done():
                return "exited"
            if cancel is not None and cancel.is_set():
                return "canceled"
            now = time.monotonic()
            deadline_left = started + timeout_s - now
            if deadline_left <= 0:
                return "timeout"
            stall_left = last_output() + stall_timeout_s - now
            if stall_left <= 0:
                return "stalled"
            watch: list[asyncio.Future[Any]] = [ended] if canceled is None else [ended, canceled]
            await asyncio.wait(
                watch, timeout=min(deadline_left, stall_left), return_when=asyncio.FIRST_COMPLETED
            )
    finally:
        if canceled is not None:
            canceled.cancel()


class OutputSink:
    """Where a run's output lines go, for every executor.

    Each line goes to ``on_line`` (an exception it raises is logged once, then counted) and to
    :attr:`tail` (the last :data:`LOG_TAIL_LINES`); :attr:`last_output` is the
    ``time.monotonic()`` value of the last output, for the no-progress timeout (:func:`watch_run`).
    """

    def __init__(self, on_line: Callable[[str], None]) -> None:
        self.on_line = on_line
        self.tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self.last_output = time.monotonic()
        self.errors = 0

    def touch(self) -> None:
        """Output came (a line may not be complete yet)."""
        self.last_output = time.monotonic()

    def deliver(self, line: str) -> None:
        """One whole output line."""
        self.last_output = time.monotonic()
        self.tail.append(line)
        try:
            self.on_line(line)
        except Exception:
            self.errors += 1
            if self.errors == 1:
                log.exception("on_line callback failed (further failures are counted)")

    def close(self) -> None:
        """Log how often ``on_line`` failed, if more than once."""
        if self.errors > 1:
            log.warning("on_line callback failed %d times", self.errors)
