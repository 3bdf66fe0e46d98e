"""The node agent: takes task messages from the broker, renders them, uploads frames, reports.

It talks to the server only over HTTP (``/api/agent/...``, Bearer agent token)
and to the broker through the interface of :mod:`server.broker.base` (any
object whose ``consume(queue, prefetch)`` yields deliveries with ``body``,
``ack()`` and ``nack(requeue)``).

One attempt of a task:

1. claim it (``409``: not wanted any more, the message is dropped);
2. fetch the input into a cache keyed by SHA-256 (verified), unpacking a zip safely;
3. run the render script in a fresh output folder, heartbeating every
   ``heartbeat_s`` seconds (a ``409`` on heartbeat means canceled or requeued:
   Blender is killed and the attempt discarded);
4. upload each frame as soon as Blender has written it and it decodes as an image;
5. report ``completed`` or ``failed`` (naming missing frames, with the last 50 log lines),
   then ack the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import shutil
import signal
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from node_agent.executor.base import Executor, RunOutcome
from node_agent.inputs import DEFAULT_MAX_BYTES, InputCache
from node_agent.logparse import parse_line
from node_agent.outputs import check_image
from node_agent.session import BlenderSession
from protocol.devices import cycles_device, normalise_backends
from protocol.frames import format_frames
from protocol.messages import (
    FAILURE_KINDS,
    OUTPUT_EXTENSIONS,
    RENDER_OVERRIDES,
    RenderParams,
    TaskMessage,
    TaskSpec,
    queue_for_pool,
)

log = logging.getLogger(__name__)
LOG_TAIL = 50


class _Delivery(Protocol):
    body: bytes

    async def ack(self) -> None: ...
    async def nack(self, requeue: bool = True) -> None: ...


class _Consumer(Protocol):
    def consume(self, queue: str, prefetch: int = 1) -> AsyncIterator[_Delivery]: ...


class ServerError(Exception):
    """The server answered with an error; ``status`` is the HTTP status (0: unreachable)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


@dataclass
class _Attempt:
    spec: TaskSpec
    out_dir: Path
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    stale: bool = False
    current_frame: int | None = None
    uploaded: set[int] = field(default_factory=set)
    pending: asyncio.Queue[tuple[int, str]] = field(default_factory=asyncio.Queue)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    log: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_TAIL))
    error_events: list[dict[str, Any]] = field(default_factory=list)
    device: dict[str, Any] = field(default_factory=dict)
    crashed: bool = False


class NodeAgent:
    """One render slot: renders one task at a time.

    Args:
        server_url: base URL of the API, e.g. ``http://127.0.0.1:3000``.
        token: this agent's token (``renderfarm token create --agent NAME``).
        broker: where task messages come from (see module docstring).
        work_dir: holds the input cache and one folder per attempt.
        executor: runs Blender (:class:`node_agent.executor.local.LocalExecutor`).
        name: the agent's name, which must be the one its token is bound to; by default the
            agent learns it from the server when it registers.
        pool: the capability pool whose queue it consumes.
        capabilities: what it advertises when it registers (see :mod:`node_agent.capabilities`).
        register: register with the server and heartbeat every ``heartbeat_s`` seconds.
        replace: take the name over from another live process (the in-process agents of one
            farm, whose data folder lock already makes them unique).
        input_cache_bytes: cap of the input cache in ``work_dir/inputs``, in bytes (models used
            least recently are removed past it; see :mod:`node_agent.inputs`).
        warm: keep one Blender process across consecutive tasks of the same job
            (:mod:`node_agent.session`); False starts a fresh process for every task.
        warm_idle_s: a warm process with no task for this many seconds exits.
    """

    def __init__(
        self,
        server_url: str,
        token: str,
        broker: _Consumer,
        work_dir: Path,
        executor: Executor,
        name: str | None = None,
        pool: str = "default",
        capabilities: dict[str, Any] | None = None,
        register: bool = True,
        replace: bool = False,
        input_cache_bytes: int = DEFAULT_MAX_BYTES,
        warm: bool = True,
        warm_idle_s: float = 30.0,
    ) -> None:
        self.server_url = server_url.rstrip("/")
        self.token = token
        self.broker = broker
        self.work_dir = Path(work_dir)
        self.executor = executor
        self.name = name or ""
        """The agent's name: the one its agent token is bound to (learnt at registration when not given)."""
        self.inputs = InputCache(self.work_dir / "inputs", max_bytes=input_cache_bytes)
        self.pool = pool
        self.capabilities = capabilities if capabilities is not None else {}
        self.register_with_server = register
        self.replace = replace
        self.instance = uuid.uuid4().hex
        self.queue = queue_for_pool(pool)
        self.registration: dict[str, Any] = {}
        self.warm = warm
        self.warm_idle_s = warm_idle_s
        self.sessions_started = 0
        """Blender processes started so far (one per job on this agent when warm, else one per task)."""
        self._session: BlenderSession | None = None
        self._http: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------ loop

    async def run(self) -> None:
        """Consume task messages until cancelled."""
        attempts = self.work_dir / "attempts"
        if attempts.exists():  # left by a previous run of this agent that was killed
            await asyncio.to_thread(shutil.rmtree, attempts, True)
        attempts.mkdir(parents=True, exist_ok=True)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
        async with aiohttp.ClientSession(
            timeout=timeout, headers={"Authorization": f"Bearer {self.token}"}
        ) as http:
            self._http = http
            beats: asyncio.Task[None] | None = None
            if self.register_with_server:
                await self.register()
                beats = asyncio.create_task(self._agent_heartbeats(), name=f"{self.name}-heartbeat")
            try:
                async for delivery in self.broker.consume(self.queue, prefetch=1):
                    await self.handle(delivery)
            finally:
                await asyncio.shield(self._close_session())
                if beats is not None:
                    beats.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await beats
                    with contextlib.suppress(Exception):
                        await asyncio.shield(self._beat(stopping=True))

    async def register(self, retry_s: float = 2.0, give_up_s: float | None = None) -> dict[str, Any]:
        """Register with the server, retrying while it is unreachable; returns what it answered.

        Raises:
            ServerError: when the server refuses (a 4xx: bad token, bad name), or is still
                unreachable after ``give_up_s`` seconds (``None``: keep trying).
        """
        started = time.monotonic()
        while True:
            try:
                self.registration = await self._call(
                    "POST",
                    "/api/agent/register",
                    json={
                        **({"name": self.name} if self.name else {}),
                        "pool": self.pool,
                        "capabilities": self.capabilities,
                        "version": _version(),
                        "instance": self.instance,
                        "replace": self.replace,
                    },
                )
                self.name = self.registration["agent"]["name"]
                self.queue = self.registration.get("queue") or self.queue
                return self.registration
            except ServerError as exc:
                if 400 <= exc.status < 500 and exc.status != 409:
                    raise
                if exc.status == 409 and give_up_s is not None and time.monotonic() - started > give_up_s:
                    raise
                if give_up_s is not None and time.monotonic() - started > give_up_s:
                    raise
                if exc.status == 409:  # a previous process of this agent may not be seen as gone yet
                    log.warning("%s; retrying until it goes offline", exc.message)
                else:
                    log.warning("cannot register with %s yet (%s); retrying", self.server_url, exc.message)
                await asyncio.sleep(retry_s)

    async def _beat(self, stopping: bool = False) -> None:
        body = {"name": self.name, "stopping": stopping}
        await self._call("POST", "/api/agent/heartbeat", retries=1, retry_for_s=2, json=body)

    async def _agent_heartbeats(self) -> None:
        period = float(self.registration.get("heartbeat_s") or 5.0)
        while True:
            await asyncio.sleep(max(period, 1.0))
            try:
                await self._beat()
            except ServerError as exc:
                if exc.status == 404:  # the server forgot us (database reset): register again
                    with contextlib.suppress(ServerError):
                        await self.register(give_up_s=0)
                else:
                    log.warning("agent heartbeat failed: %s", exc.message)

    async def handle(self, delivery: _Delivery) -> None:
        """Process one delivery; ack once the server has the result.

        A message that cannot be read, or names a task the server does not know, is
        dead-lettered (``nack(requeue=False)``: the broker keeps it in ``<queue>.dead`` for
        inspection). While the server is unreachable, or refuses this agent's token, the
        message is given back for another try.
        """
        try:
            msg = TaskMessage.from_dict(json.loads(delivery.body))
        except (ValueError, TypeError) as exc:
            log.error("dead-lettering a malformed task message: %s", exc)
            await delivery.nack(requeue=False)
            return
        try:
            await self.run_task(msg.task_id)
        except ServerError as exc:
            if exc.status in (0, 401, 403) or exc.status >= 500:
                log.warning("server unavailable for task %s (%s); message requeued", msg.task_id, exc)
                await delivery.nack(requeue=True)
                await asyncio.sleep(2)
                return
            if exc.status in (400, 404):
                log.error("dead-lettering the message of task %s: %s", msg.task_id, exc)
                await delivery.nack(requeue=False)
                return
            log.info("task %s: %s", msg.task_id, exc)
        except Exception:
            log.exception("agent error on task %s", msg.task_id)
        await delivery.ack()

    # ------------------------------------------------------------ one attempt

    async def run_task(self, task_id: str) -> None:
        """Claim, render, upload and report one task (see the module docstring)."""
        try:
            data = await self._call("POST", f"/api/agent/tasks/{task_id}/claim", json={"agent": self.name})
        except ServerError as exc:
            if exc.status == 409:
                log.info("task %s not wanted any more: %s", task_id, exc.message)
                return
            raise
        spec = TaskSpec.from_dict(data)
        attempt = _Attempt(spec=spec, out_dir=self.work_dir / "attempts" / "none")
        started = time.monotonic()
        try:
            try:
                outcome, message, kind = await self._render(attempt)
            except asyncio.CancelledError:  # the agent is stopping: hand the task back
                await asyncio.shield(self._release(spec))
                raise
            if attempt.stale:
                log.info("task %s: attempt abandoned (canceled or requeued)", task_id)
                return
            missing = [f for f in spec.frames if f not in attempt.uploaded]
            ok = outcome is not None and outcome.ok and not missing
            status = "completed" if ok else "failed"
            if not ok and missing and len(missing) < len(spec.frames) and not message:
                message = "frames missing"
            await self._call(
                "POST",
                f"/api/agent/tasks/{task_id}/result",
                json={
                    "lease_id": spec.lease_id,
                    "status": status,
                    "message": message if not ok else _warnings(attempt),
                    "log_tail": list(attempt.log),
                    "missing_frames": missing,
                    "render_seconds": round(time.monotonic() - started, 3),
                    "kind": "" if ok else (kind or ("frames_missing" if missing else "error")),
                    "device": str(attempt.device.get("device") or ""),
                    "fallback": bool(attempt.device.get("fallback")),
                },
            )
        except ServerError as exc:
            if exc.status == 409:
                log.info("task %s: lease lost while reporting: %s", task_id, exc.message)
                return
            raise
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._after_task(attempt))

    async def _after_task(self, attempt: _Attempt) -> None:
        """Remove the attempt's output folder; end the Blender process unless it stays warm."""
        await asyncio.to_thread(shutil.rmtree, attempt.out_dir, True)
        if not self.warm or (self._session is not None and not self._session.alive):
            await self._close_session()

    async def _close_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _session_for(self, spec: TaskSpec, blend: Path) -> BlenderSession:
        """The warm Blender process for ``spec``'s job, started now unless one is running."""
        if self._session is not None and self._session.matches(spec.job_id):
            return self._session
        await self._close_session()
        backends = normalise_backends(self.capabilities.get("backends") or [])
        params = RenderParams(
            blend_file=str(blend),
            output_dir="",
            manifest_path="",
            frames=list(spec.frames),
            scene=spec.scene,
            **{k: getattr(spec, k) for k in RENDER_OVERRIDES},
            confine_root=str(self.inputs.files_dir(spec)),
            device=cycles_device(spec.device, backends),
            cpu_fallback=spec.cpu_fallback,
        )
        session = BlenderSession(
            self.executor,
            spec.job_id,
            self.work_dir / "attempts" / f"session-{uuid.uuid4().hex[:12]}",
            params,
            read_only=(self.inputs.files_dir(spec),),
            idle_s=self.warm_idle_s,
            labels={"job": spec.job_id, "agent": self.name},
        )
        await session.start()
        self._session = session
        self.sessions_started += 1
        return session

    async def _render(self, attempt: _Attempt) -> tuple[RunOutcome | None, str, str]:
        """Render the attempt's frames; returns (how the last run ended, why it failed, the failure
        kind). A warm process that dies during the task is replaced once by a fresh one, which
        renders only the frames not stored yet."""
        spec = attempt.spec
        heart = asyncio.create_task(self._heartbeat(attempt))
        uploader = asyncio.create_task(self._uploader(attempt))
        try:
            try:
                blend = await self.inputs.fetch(self._http_session(), self.server_url, spec)
            except Exception as exc:
                return None, f"could not fetch the input: {exc}", "input"

            def on_line(line: str) -> None:
                attempt.log.append(line)
                if "Error in PyDriver" in line and len(attempt.warnings) < 5:
                    attempt.warnings.append(line.split("|", 1)[-1].strip())
                ev = parse_line(line)
                if ev is None:
                    return
                if ev.kind == "frame_start" and ev.frame is not None:
                    attempt.current_frame = ev.frame
                elif ev.kind == "frame_done" and ev.frame is not None and ev.path:
                    attempt.pending.put_nowait((ev.frame, ev.path))
                elif ev.kind == "error" and ev.message:
                    attempt.error_events.append(ev.data or {"message": ev.message})

            tries = 0
            while True:
                tries += 1
                session = await self._session_for(spec, blend)
                attempt.out_dir, manifest = session.task_dirs(spec.task_id, spec.lease_id)
                frames = [f for f in spec.frames if f not in attempt.uploaded]
                run = await session.render(
                    spec.task_id,
                    spec.lease_id,
                    frames,
                    on_line,
                    spec.timeout_s,
                    spec.stall_timeout_s,
                    attempt.cancel,
                )
                outcome = run.outcome
                attempt.device = dict(session.device)
                attempt.log.extend(line for line in outcome.log_tail if line not in attempt.log)
                # Frames whose marker was missed but that the manifest names and that exist.
                for frame, path in _read_manifest(manifest).items():
                    if frame in spec.frames and frame not in attempt.uploaded:
                        attempt.pending.put_nowait((frame, path))
                drained = asyncio.create_task(attempt.pending.join())
                await asyncio.wait([drained, uploader], return_when=asyncio.FIRST_COMPLETED)
                drained.cancel()  # every frame of this process is uploaded (or refused)
                if not outcome.ok:
                    crash = session.crash_report()
                    if crash:
                        attempt.crashed = True
                        attempt.log.extend(crash)
                    await self._close_session()
                if run.died and run.warm and tries == 1 and not attempt.stale:
                    note = (
                        f"renderfarm: the warm Blender process died ({_ended(outcome)}); "
                        "rendering the frames not stored yet in a fresh process"
                    )
                    log.warning("task %s: %s", spec.task_id, note)
                    attempt.log.append(note)
                    attempt.crashed = False
                    continue
                break
            attempt.pending.put_nowait((0, ""))  # end marker
            await uploader
            return outcome, _describe(outcome, attempt), _classify(outcome, attempt)
        finally:
            heart.cancel()
            uploader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await heart
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await uploader

    async def _release(self, spec: TaskSpec) -> None:
        try:
            await asyncio.wait_for(
                self._call(
                    "POST",
                    f"/api/agent/tasks/{spec.task_id}/release",
                    retries=1,
                    json={"lease_id": spec.lease_id},
                ),
                5,
            )
        except (ServerError, TimeoutError) as exc:
            log.warning("could not hand task %s back (its lease will expire): %s", spec.task_id, exc)

    async def _heartbeat(self, attempt: _Attempt) -> None:
        spec = attempt.spec
        while True:
            await asyncio.sleep(spec.heartbeat_s)
            try:
                await self._call(
                    "POST",
                    f"/api/agent/tasks/{spec.task_id}/heartbeat",
                    json={"lease_id": spec.lease_id, "current_frame": attempt.current_frame},
                )
            except ServerError as exc:
                if exc.status == 409:
                    attempt.stale = True
                    attempt.cancel.set()
                    return
                log.warning("heartbeat failed: %s", exc)

    async def _uploader(self, attempt: _Attempt) -> None:
        spec = attempt.spec
        ext = OUTPUT_EXTENSIONS.get(spec.output_format, ".png")
        while True:
            frame, path = await attempt.pending.get()
            try:
                if not path:
                    return
                await self._upload_one(attempt, ext, frame, path)
            finally:
                attempt.pending.task_done()

    async def _upload_one(self, attempt: _Attempt, ext: str, frame: int, path: str) -> None:
        """Check one rendered frame and upload it (once); a 409 marks the attempt stale."""
        spec = attempt.spec
        if frame in attempt.uploaded or attempt.stale or frame not in spec.frames:
            return
        file = Path(path)
        problem = check_image(file, attempt.out_dir, spec.output_format)
        if problem:
            attempt.errors.append(f"frame {frame}: {problem}")
            return
        try:
            await self._call(
                "PUT",
                f"/api/agent/tasks/{spec.task_id}/frames/{frame}",
                params={"lease_id": spec.lease_id, "ext": ext},
                upload=file,
            )
            attempt.uploaded.add(frame)
            await asyncio.to_thread(file.unlink, True)
        except ServerError as exc:
            if exc.status == 409:
                attempt.stale = True
                attempt.cancel.set()
                return
            attempt.errors.append(f"frame {frame}: upload failed: {exc}")

    # ------------------------------------------------------------ HTTP

    def _http_session(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise RuntimeError("agent is not running")
        return self._http

    async def _call(
        self,
        method: str,
        path: str,
        retries: int = 3,
        retry_for_s: float | None = None,
        upload: Path | None = None,
        **kw: Any,
    ) -> Any:
        """One API call, retried on connection errors and 5xx; raises :class:`ServerError`.

        Args:
            retries: attempts at least.
            retry_for_s: keep retrying for this many seconds (default: the lease, 30 s unless the
                server said otherwise), so that a server restart does not lose an upload or a
                result; the server extends leases when its scheduler starts again.
            upload: a file sent as the request body (opened again for each try).
        """
        budget = retry_for_s if retry_for_s is not None else float(self.registration.get("lease_s") or 30.0)
        deadline = time.monotonic() + budget
        delay = 0.5
        attempt = 0
        while True:
            attempt += 1
            last = attempt >= retries and time.monotonic() + delay > deadline
            try:
                async with contextlib.AsyncExitStack() as stack:
                    if upload is not None:  # a fresh file object per try: aiohttp closes it when sent
                        kw["data"] = stack.enter_context(open(upload, "rb"))
                    resp = await stack.enter_async_context(
                        self._http_session().request(method, self.server_url + path, **kw)
                    )
                    body = await resp.json(content_type=None) if resp.content_length != 0 else {}
                    if resp.status < 400:
                        return body
                    message = (body or {}).get("error", {}).get("message", resp.reason or "")
                    if resp.status < 500 or last:
                        raise ServerError(resp.status, message)
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                if last:
                    raise ServerError(0, f"server unreachable: {exc}") from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def _version() -> str:
    try:
        return importlib.metadata.version("renderfarm")
    except importlib.metadata.PackageNotFoundError:
        return ""


def _warnings(attempt: _Attempt) -> str:
    """What a completed render should tell the user: Python drivers that did not run."""
    if not attempt.warnings:
        return ""
    return (
        "warning: Python drivers did not run (auto-run scripts are off on the farm), so the frames "
        "may differ from what the artist sees: " + "; ".join(dict.fromkeys(attempt.warnings))
    )


def _read_manifest(path: Path) -> dict[int, str]:
    try:
        data = json.loads(path.read_text())
        return {int(k): str(v) for k, v in data.get("frames", {}).items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


CRASH_SIGNALS = frozenset({4, 6, 7, 8, 11})
"""SIGILL, SIGABRT, SIGBUS, SIGFPE, SIGSEGV: Blender crashed (as opposed to being killed)."""


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _ended(outcome: RunOutcome) -> str:
    """How a process ended, in a few words."""
    if outcome.oom_killed:
        return "out of memory"
    if outcome.exit_code is not None and outcome.exit_code < 0:
        return f"killed by {_signal_name(-outcome.exit_code)}"
    if outcome.reason != "exited":
        return outcome.reason
    return f"exit code {outcome.exit_code}"


def _classify(outcome: RunOutcome | None, attempt: _Attempt) -> str:
    """The failure kind (``protocol.messages.FAILURE_KINDS``) of an attempt; empty when it succeeded."""
    missing = any(f not in attempt.uploaded for f in attempt.spec.frames)
    if outcome is None:
        return "input"
    if outcome.ok and not missing and not attempt.errors:
        return ""
    if outcome.oom_killed:
        return "oom"
    if outcome.reason in ("timeout", "stalled", "spawn_failed"):
        return outcome.reason
    code = outcome.exit_code
    if code is not None and code < 0:
        if attempt.crashed or -code in CRASH_SIGNALS:
            return "crashed"
        return "killed"
    if attempt.error_events:
        kind = str(attempt.error_events[-1].get("kind") or "python_error")
        return kind if kind in FAILURE_KINDS else "python_error"
    if code not in (0, None):
        return "error"
    return "frames_missing" if missing else "error"


def _describe(outcome: RunOutcome, attempt: _Attempt) -> str:
    """One sentence saying why an attempt failed (empty when it did not)."""
    missing = [f for f in attempt.spec.frames if f not in attempt.uploaded]
    parts: list[str] = []
    if outcome.oom_killed:
        parts.append("Blender ran out of memory (the container's memory limit) and was killed")
    elif outcome.reason == "timeout":
        parts.append(f"render timed out after {attempt.spec.timeout_s:g} s")
    elif outcome.reason == "stalled":
        parts.append(f"Blender made no progress for {attempt.spec.stall_timeout_s:g} s and was killed")
    elif outcome.reason == "spawn_failed":
        parts.append("Blender could not be started: " + (outcome.log_tail[-1] if outcome.log_tail else "?"))
    elif outcome.reason == "canceled":
        parts.append("canceled")
    elif outcome.exit_code not in (0, None):
        if attempt.error_events and outcome.exit_code > 0:
            parts.append(str(attempt.error_events[-1].get("message") or "error"))
        elif outcome.exit_code < 0 and (attempt.crashed or -outcome.exit_code in CRASH_SIGNALS):
            report = " (its crash report is in the log)" if attempt.crashed else ""
            parts.append(f"Blender crashed ({_signal_name(-outcome.exit_code)}){report}")
        elif outcome.exit_code < 0:
            # a container's memory limit shows as oom_killed; only a local process's SIGKILL may
            # have come from the kernel's OOM killer without our knowing
            maybe = "" if outcome.oom_known else " (possibly out of memory)"
            parts.append(f"Blender was killed by {_signal_name(-outcome.exit_code)}{maybe}")
        else:
            parts.append(f"Blender exited with code {outcome.exit_code}")
    if attempt.errors:
        parts.append("; ".join(attempt.errors[:5]))
    if missing and (outcome.ok or (parts and outcome.reason != "spawn_failed")):
        parts.append(f"frames missing: {format_frames(missing)}")
    return "; ".join(parts)
