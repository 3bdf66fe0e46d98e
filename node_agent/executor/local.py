"""Run Blender as a local subprocess: a ``blender`` binary, or this Python with bpy."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from node_agent.executor.base import BlenderNotFound, BlenderRun, OutputSink, RunOutcome, watch_run
from node_agent.logparse import LineSplitter

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 65536
"""Size of each read from the process's output pipe, in bytes."""

TERM_GRACE_S = 2.0
"""Seconds between SIGTERM and SIGKILL to the process group when stopping a run."""

DRAIN_S = 2.0
"""Seconds to wait for the last output after the process group is gone."""

_SECRET_MARKERS = ("TOKEN", "KEY", "SECRET", "PASSWORD")


def _is_secret(name: str) -> bool:
    upper = name.upper()
    return upper.startswith("RENDERFARM_") or any(marker in upper for marker in _SECRET_MARKERS)


def minimal_env(cwd: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the environment a Blender process gets.

    Only ``PATH`` (the parent's, else ``os.defpath``), ``HOME`` (= ``cwd``; Blender keeps
    its ``.cache``/``.config`` there) and ``LANG`` (the parent's, else ``C.UTF-8``), plus
    ``extra``. Nothing else of the parent's environment passes, and names that look like
    secrets (``RENDERFARM_*``, or holding ``TOKEN``, ``KEY``, ``SECRET`` or ``PASSWORD``,
    any case) are dropped even from ``extra``.
    """
    env = {
        "PATH": os.environ.get("PATH") or os.defpath,
        "HOME": str(cwd),
        "LANG": os.environ.get("LANG") or "C.UTF-8",
    }
    for name, value in (extra or {}).items():
        if _is_secret(name):
            log.warning("not passing environment variable %s to Blender: looks like a secret", name)
            continue
        env[str(name)] = str(value)
    return env


def _run_env(run: BlenderRun) -> dict[str, str]:
    """``run.env`` plus ``TMPDIR`` when the run names a temporary folder."""
    env = dict(run.env or {})
    if run.tmp_dir is not None:
        env["TMPDIR"] = str(run.tmp_dir)
    return env


_PR_SET_PDEATHSIG = 1
"""prctl(2) option: signal this process gets when its parent thread exits (Linux)."""


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes Blender get SIGKILL if the agent dies (even by SIGKILL).

    Blender runs in its own session so that a cancel can kill its whole group; without
    this hook an agent killed with SIGKILL would leave it rendering. Linux only (prctl(2)
    ``PR_SET_PDEATHSIG``); elsewhere ``None``.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    parent = os.getpid()

    def hook() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the agent died before prctl took effect
            os._exit(1)

    return hook


def _signal_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to process group ``pgid``; a group that is already gone is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _signal_all(proc: asyncio.subprocess.Process, sig: int) -> None:
    """Send ``sig`` to ``proc``'s process group (``start_new_session``: pgid = pid), and to
    ``proc`` itself should the group signal fail, so that the process can always be reaped."""
    _signal_group(proc.pid, sig)
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def blender_argv(mode: str, program: str, script: str | Path, args: list[str]) -> list[str]:
    """Return the command line that runs ``script`` with ``args`` in Blender.

    ``mode`` ``"binary"``: ``PROGRAM -b --factory-startup --disable-autoexec -noaudio
    --python-exit-code 1 --python SCRIPT -- ARGS`` (``program`` is a Blender binary); Blender
    exits 0 after a Python error unless given ``--python-exit-code`` (Blender's command-line
    docs), and everything after ``--`` is left to the script.
    ``mode`` ``"module"``: ``PROGRAM -I SCRIPT ARGS`` (``program`` is a Python with the bpy
    module); ``-I`` (isolated mode) ignores ``PYTHON*`` variables, the user site and the
    script's folder, and keeps the venv's packages.

    Raises:
        ValueError: ``mode`` is neither ``"binary"`` nor ``"module"``.
    """
    script = str(script)
    if mode == "binary":
        return [
            program,
            "-b",
            "--factory-startup",
            "--disable-autoexec",
            "-noaudio",
            "--python-exit-code",
            "1",
            "--python",
            script,
            "--",
            *args,
        ]
    if mode == "module":
        return [program, "-I", script, *args]
    raise ValueError(f"unknown Blender mode {mode!r} (binary or module)")


class LocalExecutor:
    """Runs Blender as a subprocess of the agent, in its own process group.

    Blender is, in order of preference: the ``blender`` argument (a path, or a command
    name looked up on ``PATH``); a ``blender`` on ``PATH``; this Python interpreter
    (``sys.executable``) with the bpy module (``pip install renderfarm[blender]``).

    Raises:
        BlenderNotFound: the configured binary does not exist, or there is neither a
            ``blender`` on ``PATH`` nor an importable bpy module.
    """

    def __init__(self, blender: str | None = None) -> None:
        if blender:
            found = shutil.which(blender)
            if found is None:
                raise BlenderNotFound(f"Blender binary {blender!r} not found or not executable")
            self.mode = "binary"
            self.program = found
        elif (found := shutil.which("blender")) is not None:
            self.mode = "binary"
            self.program = found
        elif importlib.util.find_spec("bpy") is not None:
            self.mode = "module"
            self.program = sys.executable
        else:
            raise BlenderNotFound(
                "no Blender available: install the bpy module (pip install 'renderfarm[blender]') "
                "or configure a Blender binary (a 'blender' on PATH or the agent's blender setting)"
            )

    def argv(self, run: BlenderRun) -> list[str]:
        """Return the command line for ``run``: :func:`blender_argv` of this Blender."""
        return blender_argv(self.mode, self.program, run.script, run.args)

    async def run(
        self,
        run: BlenderRun,
        on_line: Callable[[str], None],
        cancel: asyncio.Event | None = None,
    ) -> RunOutcome:
        """Run Blender for ``run``; see :meth:`node_agent.executor.base.Executor.run`.

        stdout and stderr share one pipe, read in chunks of :data:`READ_CHUNK_BYTES` and
        split by :class:`~node_agent.logparse.LineSplitter` (lines capped at 64 KiB).
        On hard timeout, stall or cancel: SIGTERM to the process group, up to
        :data:`TERM_GRACE_S` seconds' grace, then SIGKILL to the group. The group is
        SIGKILLed at the end of every run (children left by a process that exited), and
        the process is always reaped. If the task awaiting this coroutine is cancelled,
        the process group is stopped the same way before the cancellation propagates.

        The pipe is made here and read through ``loop.connect_read_pipe`` rather than
        ``stdout=PIPE``: in Python 3.11 ``Process.wait()`` does not return until every
        pipe of the process is closed, so a child that inherited stdout would hide the
        exit. Output still buffered when the run ends is read for up to :data:`DRAIN_S`.
        """
        loop = asyncio.get_running_loop()
        argv = self.argv(run)
        out = OutputSink(on_line)
        started = time.monotonic()
        read_fd, write_fd = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=run.cwd,
                env=minimal_env(run.cwd, _run_env(run)),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=write_fd,
                stderr=write_fd,
                start_new_session=True,
                preexec_fn=_die_with_parent_hook(),
            )
        except (OSError, ValueError) as exc:
            os.close(read_fd)
            message = f"cannot start {argv[0]}: {exc}"
            log.error("%s", message)
            return RunOutcome(None, "spawn_failed", [message], time.monotonic() - started)
        finally:
            os.close(write_fd)

        stream = asyncio.StreamReader(limit=READ_CHUNK_BYTES, loop=loop)
        pipe = os.fdopen(read_fd, "rb", buffering=0)
        try:
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(stream, loop=loop), pipe
            )
        except BaseException:
            pipe.close()
            _signal_all(proc, signal.SIGKILL)
            await proc.wait()
            raise

        out.touch()  # the no-progress clock starts with the process

        async def read_output() -> None:
            splitter = LineSplitter()
            while True:
                chunk = await stream.read(READ_CHUNK_BYTES)
                if not chunk:
                    break
                out.touch()
                for line in splitter.feed(chunk):
                    out.deliver(line)
            for line in splitter.flush():
                out.deliver(line)

        reader = asyncio.create_task(read_output())
        waiter = asyncio.create_task(proc.wait())
        reason: str | None = None
        try:
            reason = await watch_run(
                waiter, started, run.timeout_s, run.stall_timeout_s, lambda: out.last_output, cancel
            )
        finally:
            if reason != "exited":
                log.info("stopping Blender (pid %d): %s", proc.pid, reason or "run interrupted")
                await self._stop(proc, waiter)
            _signal_all(proc, signal.SIGKILL)  # whatever the process left behind
            await asyncio.shield(waiter)
            try:
                await asyncio.wait_for(asyncio.shield(reader), DRAIN_S)
            except TimeoutError:
                reader.cancel()
                log.warning("output pipe of Blender (pid %d) still open after the run", proc.pid)
            except Exception:
                log.exception("reading Blender's output failed")
            transport.close()
        out.close()
        assert reason is not None
        exit_code = proc.returncode if reason == "exited" else None
        return RunOutcome(exit_code, reason, list(out.tail), time.monotonic() - started)

    @staticmethod
    async def _stop(proc: asyncio.subprocess.Process, waiter: asyncio.Task) -> None:
        """SIGTERM the group, wait up to TERM_GRACE_S for the leader, then SIGKILL the group."""
        _signal_all(proc, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(waiter), TERM_GRACE_S)
        _signal_all(proc, signal.SIGKILL)
