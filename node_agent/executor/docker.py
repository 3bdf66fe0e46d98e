"""Run Blender in a Docker container per run (docker SDK for Python).

The container of one run has no network, a read-only root file system, a private
size-limited ``/tmp``, no capabilities, ``no-new-privileges``, a non-root user, memory (no
swap), CPU and process-count limits, and an environment holding nothing of the agent's.
Only the run's paths are mounted, each at the same path as on the host: ``run.script``,
``run.read_only`` read-only, ``run.writable`` (and ``run.tmp_dir``) read-write.

Blender runs under :mod:`node_agent.executor.guard` (bind-mounted read-only), whose standard
input is attached to this process for the run's life: should the agent die, even by
SIGKILL, Docker closes that input and the guard kills the render. A container left behind
by a crashed agent carries the agent's labels; :meth:`DockerExecutor.reap_orphans` removes
it when the agent starts again.

Every call to the (synchronous) SDK runs in a thread; the output is read by a thread of its
own and handed to the event loop line by line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
from docker.types import DeviceRequest, LogConfig, Mount, Ulimit
from docker.utils.socket import frames_iter

from node_agent.executor.base import BlenderNotFound, BlenderRun, OutputSink, RunOutcome, watch_run
from node_agent.executor.local import _is_secret, blender_argv
from node_agent.logparse import LineSplitter

log = logging.getLogger(__name__)

DEFAULT_IMAGE = "renderfarm/render:local"
"""The render image ``docker/build-images.sh`` builds."""

BUILD_HINT = "build it with: bash docker/build-images.sh (from the renderfarm repository, as root)"

OWNER_LABEL = "renderfarm.executor"
"""Label (value ``"docker"``) on every container this executor makes: :meth:`reap_orphans`
removes only containers that carry it."""

LABEL_PREFIX = "renderfarm."
"""Prefix of the labels made from ``BlenderRun.labels`` (``{"task": "7"}`` -> ``renderfarm.task=7``)."""

CONTAINER_UID = 10001
"""User and group id of the renders of an agent that runs as root (the render image's ``renderfarm``)."""

MIN_USEFUL_MEMORY = 512 << 20
"""Below this container memory limit (bytes) the agent warns: bpy 5.0.1 alone takes about 270 MiB."""

DEFAULT_PIDS = 512
"""Default limit on processes and threads in a container (Blender starts one thread per core)."""

DEFAULT_TMP_BYTES = 1 << 30
"""Default size of the container's private ``/tmp`` (tmpfs, counted in its memory), in bytes."""

STOP_GRACE_S = 2
"""Seconds between SIGTERM and SIGKILL when the executor stops a container (``docker stop -t``)."""

DRAIN_S = 2.0
"""Seconds to wait for the last output once the container has stopped."""

API_TIMEOUT_S = 60
"""Timeout of one Docker API call, in seconds (the calls that wait for a container excepted)."""

GPU_DRIVER_CAPABILITIES = "compute,utility,graphics"
"""``NVIDIA_DRIVER_CAPABILITIES`` of a GPU run: CUDA (compute), OptiX (graphics), nvidia-smi (utility)."""

GUARD = Path(__file__).with_name("guard.py")
"""The guard script; see :mod:`node_agent.executor.guard`."""

_T = TypeVar("_T")


class ExecutorUnavailable(BlenderNotFound):
    """The Docker executor cannot run renders: dockerd does not answer, or the render image
    is missing or is not a renderfarm render image. The message says what to do."""


def parse_gpus(value: str | None) -> str | list[str] | None:
    """Parse a ``--gpus`` value: ``None``/``""``/``"none"`` -> ``None`` (no GPU),
    ``"all"`` -> ``"all"``, ``"0,1"`` or ``"GPU-uuid,..."`` -> ``["0", "1"]``.

    Raises:
        ValueError: an empty item (``"0,,1"``), or an item with characters other than
            letters, digits, ``-``, ``_`` and ``:``.
    """
    if value is None:
        return None
    text = value.strip()
    if text.lower() in ("", "none"):
        return None
    if text.lower() == "all":
        return "all"
    ids = [item.strip() for item in text.split(",")]
    for item in ids:
        if not re.fullmatch(r"[A-Za-z0-9_:-]+", item):
            raise ValueError(f"bad GPU id {item!r} in {value!r}: give all, none, or ids such as 0,1")
    return ids


def device_requests(gpus: str | Sequence[str] | None) -> list[DeviceRequest]:
    """Docker device requests for ``gpus`` (as :func:`parse_gpus` returns it): none for
    ``None``, every GPU for ``"all"``, else the listed device ids (indexes or UUIDs). They
    ask for the ``gpu`` capability, which the NVIDIA Container Toolkit serves.

    Raises:
        ValueError: ``gpus`` is an empty list or a string other than ``"all"``.
    """
    if gpus is None:
        return []
    if isinstance(gpus, str):
        if gpus != "all":
            raise ValueError(f"gpus must be None, 'all' or a list of device ids, not {gpus!r}")
        return [DeviceRequest(count=-1, capabilities=[["gpu"]])]
    ids = [str(g) for g in gpus]
    if not ids:
        raise ValueError("an empty list of GPU device ids: pass None for no GPU")
    return [DeviceRequest(device_ids=ids, capabilities=[["gpu"]])]


def container_env(run: BlenderRun, gpus: object = None) -> dict[str, str]:
    """The environment of ``run``'s container: ``HOME=/tmp``, ``LANG=C.UTF-8``, ``TMPDIR``
    when the run names one, ``NVIDIA_DRIVER_CAPABILITIES`` with GPUs, and ``run.env`` minus
    every name that looks like a secret (``RENDERFARM_*``, or holding ``TOKEN``, ``KEY``,
    ``SECRET`` or ``PASSWORD``). Nothing of the agent's own environment passes; the image's
    own variables (``PATH``) stay."""
    env = {"HOME": "/tmp", "LANG": "C.UTF-8"}  # noqa: S108 - the container's private tmpfs
    if gpus:
        env["NVIDIA_DRIVER_CAPABILITIES"] = GPU_DRIVER_CAPABILITIES
    for name, value in (run.env or {}).items():
        if _is_secret(name):
            log.warning("not passing environment variable %s to the container: looks like a secret", name)
            continue
        if not name or "=" in name or "\0" in name or "\0" in str(value):
            log.warning("not passing environment variable %r to the container: bad name or value", name)
            continue
        env[str(name)] = str(value)
    if run.tmp_dir is not None:
        env["TMPDIR"] = os.path.abspath(run.tmp_dir)
    return env


def container_labels(run: BlenderRun, defaults: Mapping[str, str] | None = None) -> dict[str, str]:
    """``renderfarm.<key>`` for each of ``defaults`` and ``run.labels`` (the run's win; keys
    lowercased, other characters than ``a-z0-9._-`` replaced by ``-``), plus :data:`OWNER_LABEL`."""
    merged = {**(defaults or {}), **(run.labels or {})}
    labels = {LABEL_PREFIX + _label_key(k): str(v) for k, v in merged.items()}
    labels[OWNER_LABEL] = "docker"
    return labels


def _label_key(key: str) -> str:
    return re.sub(r"[^a-z0-9._-]", "-", str(key).lower()) or "-"


def _inside(path: str, folders: Sequence[str]) -> bool:
    return any(path == f or path.startswith(f.rstrip("/") + "/") for f in folders)


@dataclass(frozen=True)
class ImageInfo:
    """How the render image runs Blender, from its labels.

    Attributes:
        mode: ``"module"`` (a Python with bpy) or ``"binary"`` (a Blender binary);
            label ``renderfarm.blender``.
        program: that Python or Blender, a path in the image; ``renderfarm.blender.program``.
        python: a ``python3`` in the image that runs the guard; ``renderfarm.python``.
        version: Blender's version (``"5.0.1"``), ``""`` when the image does not say;
            ``renderfarm.blender.version``.
    """

    mode: str
    program: str
    python: str
    version: str = ""


def image_info(image: str, labels: Mapping[str, str] | None) -> ImageInfo:
    """Read :class:`ImageInfo` from an image's labels.

    Raises:
        ExecutorUnavailable: a label is missing or ``renderfarm.blender`` is not
            ``module``/``binary``: the image is not a renderfarm render image.
    """
    labels = labels or {}
    mode = labels.get("renderfarm.blender", "")
    program = labels.get("renderfarm.blender.program", "")
    python = labels.get("renderfarm.python", "")
    if mode not in ("module", "binary") or not program.startswith("/") or not python.startswith("/"):
        raise ExecutorUnavailable(
            f"image {image} is not a renderfarm render image (labels renderfarm.blender=module|binary, "
            f"renderfarm.blender.program and renderfarm.python are needed); {BUILD_HINT}"
        )
    return ImageInfo(mode, program, python, labels.get("renderfarm.blender.version", ""))


def _default_memory_bytes() -> int:
    """Three quarters of this machine's physical memory, in bytes."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 << 30
    return max(256 << 20, total * 3 // 4)


class DockerExecutor:
    """Runs each Blender run in a fresh container of the render image.

    Args:
        image: the render image (``docker/build-images.sh`` builds ``renderfarm/render:local``).
        memory_bytes: memory limit of a container, in bytes, swap included (none is
            allowed); its ``/tmp`` counts in it. Default: 3/4 of this machine's memory.
        cpus: CPUs a container may use (fractions allowed); ``None``: all of them.
        pids: limit on processes and threads in a container.
        gpus: ``None`` (no GPU), ``"all"``, or NVIDIA device ids (``["0", "1"]``), passed as
            Docker device requests (NVIDIA Container Toolkit).
        tmp_bytes: size of the container's private ``/tmp``, in bytes.
        base_url: the Docker daemon (``unix:///var/run/docker.sock``); ``None``: from the
            environment (``DOCKER_HOST``), else the default socket.
        stage_dir: a folder on a path the Docker daemon sees the same as this process (the
            agent's work folder, mounted at the same path): the run's script and the guard
            are copied into it for each run. Needed when the agent itself runs in a
            container, whose own files the daemon cannot mount; ``None``: they are mounted
            where they are.
        labels: labels of every container, under the run's own (``{"agent": name}``, so
            that :meth:`reap_orphans` finds what a crashed process of this agent left); the
            attribute ``labels`` may be set later.

    Raises:
        ExecutorUnavailable: the Docker daemon does not answer, or ``image`` is missing or
            is not a render image (the message names the image and how to build it).
        ValueError: a limit is not positive, or ``gpus`` is malformed.
    """

    def __init__(
        self,
        image: str = DEFAULT_IMAGE,
        memory_bytes: int | None = None,
        cpus: float | None = None,
        pids: int = DEFAULT_PIDS,
        gpus: str | Sequence[str] | None = None,
        tmp_bytes: int = DEFAULT_TMP_BYTES,
        base_url: str | None = None,
        stage_dir: Path | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        if memory_bytes is None:
            memory_bytes = _default_memory_bytes()
        if memory_bytes < 6 << 20:
            raise ValueError(f"memory limit {memory_bytes} bytes is below Docker's minimum of 6 MiB")
        if cpus is not None and not cpus > 0:
            raise ValueError(f"cpus must be positive, not {cpus}")
        if pids < 16:
            raise ValueError(f"pids limit {pids} is too small for Blender (at least 16)")
        if tmp_bytes < 1 << 20:
            raise ValueError(f"tmpfs size {tmp_bytes} bytes is below 1 MiB")
        self.image = image
        self.memory_bytes = int(memory_bytes)
        self.cpus = cpus
        self.pids = int(pids)
        self.gpus = gpus if gpus is None or isinstance(gpus, str) else list(gpus)
        self._device_requests = device_requests(self.gpus)
        self.tmp_bytes = int(tmp_bytes)
        self.stage_dir = stage_dir
        self.labels: dict[str, str] = dict(labels or {})
        self._active: set[str] = set()
        where = base_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        try:
            if base_url:
                self.client = docker.DockerClient(base_url=base_url, timeout=API_TIMEOUT_S)
            else:
                self.client = docker.from_env(timeout=API_TIMEOUT_S)
            self.client.ping()
        except docker.errors.DockerException as exc:
            raise ExecutorUnavailable(
                f"Docker does not answer at {where}: {exc}; start dockerd (or give --executor local)"
            ) from None
        try:
            attrs = self.client.api.inspect_image(image)
        except docker.errors.ImageNotFound:
            raise ExecutorUnavailable(f"render image {image} not found in Docker; {BUILD_HINT}") from None
        except docker.errors.DockerException as exc:
            raise ExecutorUnavailable(f"cannot inspect render image {image}: {exc}") from None
        self._check_limits()
        self.info = image_info(image, (attrs.get("Config") or {}).get("Labels"))
        self.image_id: str = attrs["Id"]

    def _check_limits(self) -> None:
        """Refuse limits this Docker host cannot give (Docker would refuse every container).

        Raises:
            ValueError: more CPUs or memory than the Docker host has.
        """
        try:
            info = self.client.info()
        except docker.errors.DockerException:
            return
        ncpu, total = int(info.get("NCPU") or 0), int(info.get("MemTotal") or 0)
        if self.cpus is not None and ncpu and self.cpus > ncpu:
            raise ValueError(f"--cpus {self.cpus:g} is more than the {ncpu} CPUs of this Docker host")
        if total and self.memory_bytes > total:
            raise ValueError(
                f"memory limit {self.memory_bytes >> 20} MiB is more than the {total >> 20} MiB "
                "of this Docker host"
            )
        if self.memory_bytes < MIN_USEFUL_MEMORY:
            log.warning(
                "memory limit %d MiB: Blender alone needs about 300 MiB, so renders will run out of memory",
                self.memory_bytes >> 20,
            )

    # ----------------------------------------------------------------- container spec
    def user(self) -> str:
        """``uid:gid`` the renders run as: the agent's own, or :data:`CONTAINER_UID` when
        the agent is root (the writable paths are then given to that user)."""
        uid, gid = os.getuid(), os.getgid()
        if uid == 0:
            return f"{CONTAINER_UID}:{CONTAINER_UID}"
        return f"{uid}:{gid}"

    def container_spec(
        self, run: BlenderRun, script: str | None = None, guard: str | None = None
    ) -> dict[str, Any]:
        """The container for ``run``: ``{"create": kwargs of APIClient.create_container
        (host_config left out), "host_config": kwargs of APIClient.create_host_config}``.

        ``script`` and ``guard`` are the paths the container sees them at (default:
        ``run.script`` and :data:`GUARD`, each mounted read-only at its own path). Pure: it
        reads and changes nothing.
        """
        script = script or os.path.abspath(run.script)
        guard = guard or str(GUARD)
        read_only = [os.path.abspath(p) for p in run.read_only]
        writable = [os.path.abspath(p) for p in run.writable]
        if run.tmp_dir is not None:
            tmp = os.path.abspath(run.tmp_dir)
            if not _inside(tmp, writable):
                writable.append(tmp)
        mounts: dict[str, Mount] = {}
        for path in dict.fromkeys([script, guard, *read_only]):
            mounts[path] = Mount(target=path, source=path, type="bind", read_only=True)
        for path in dict.fromkeys(writable):  # a writable path wins over the same path read-only
            mounts[path] = Mount(target=path, source=path, type="bind", read_only=False)
        cwd = os.path.abspath(run.cwd)
        working_dir = cwd if _inside(cwd, list(mounts)) else "/tmp"  # noqa: S108
        command = [
            self.info.python,
            "-I",
            guard,
            "--",
            *blender_argv(self.info.mode, self.info.program, script, list(run.args)),
        ]
        host_config: dict[str, Any] = {
            "network_mode": "none",
            "read_only": True,
            "tmpfs": {"/tmp": f"rw,nosuid,nodev,size={self.tmp_bytes},mode=1777"},  # noqa: S108
            "mounts": list(mounts.values()),
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "mem_limit": self.memory_bytes,
            "memswap_limit": self.memory_bytes,
            "pids_limit": self.pids,
            "init": True,
            "ipc_mode": "private",
            "ulimits": [Ulimit(name="core", soft=0, hard=0)],
            "log_config": LogConfig(type="json-file", config={"max-size": "10m", "max-file": "1"}),
            "device_requests": list(self._device_requests),
        }
        if self.cpus is not None:
            host_config["nano_cpus"] = int(self.cpus * 1e9)
        create: dict[str, Any] = {
            "image": self.image,
            "command": command,
            "user": self.user(),
            "environment": container_env(run, self.gpus),
            "working_dir": working_dir,
            "labels": container_labels(run, self.labels),
            # stdin open and not detached: the SDK sets StdinOnce, so Docker closes the
            # container's stdin when the agent's attach connection goes (see guard.py)
            "stdin_open": True,
            "detach": False,
            "tty": False,
            "network_disabled": True,
        }
        return {"create": create, "host_config": host_config}

    # ----------------------------------------------------------------- running
    async def run(
        self,
        run: BlenderRun,
        on_line: Callable[[str], None],
        cancel: asyncio.Event | None = None,
    ) -> RunOutcome:
        """Run Blender for ``run`` in a container; see :meth:`node_agent.executor.base.Executor.run`.

        The container is created, its standard streams attached (one connection, held
        until the end), then started. stdout and stderr lines reach ``on_line`` as they
        come. On hard timeout, stall or cancel: ``docker stop`` (SIGTERM, then SIGKILL after
        :data:`STOP_GRACE_S` seconds). The container is always removed at the end, after its
        exit code and ``State.OOMKilled`` are read, also when the awaiting task is cancelled.
        An exit status ``128 + N`` (the guard's report of signal N) becomes ``-N``.
        Errors of Docker before the start give reason ``"spawn_failed"``.
        """
        loop = asyncio.get_running_loop()
        out = OutputSink(on_line)
        started = time.monotonic()
        api = self.client.api
        stage: Path | None = None
        cid: str | None = None
        sock: Any = None

        def failed(message: str) -> RunOutcome:
            log.error("%s", message)
            return RunOutcome(None, "spawn_failed", [message], time.monotonic() - started)

        try:
            try:
                stage, script, guard = await asyncio.to_thread(self._prepare, run)
                spec = self.container_spec(run, script, guard)
                name = f"renderfarm-run-{uuid.uuid4().hex[:12]}"
                created = await asyncio.to_thread(
                    api.create_container,
                    **spec["create"],
                    name=name,
                    host_config=api.create_host_config(**spec["host_config"]),
                )
                cid = created["Id"]
                self._active.add(cid)
                sock = await asyncio.to_thread(
                    api.attach_socket, cid, {"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
                )
                await asyncio.to_thread(api.start, cid)
            except (docker.errors.DockerException, OSError, ValueError) as exc:
                await self._cleanup(cid, sock, stage)
                return failed(f"cannot start a container of {self.image}: {_docker_reason(exc)}")
        except BaseException:
            await asyncio.shield(asyncio.ensure_future(self._cleanup(cid, sock, stage)))
            raise
        assert cid is not None
        log.info("container %s (%s) started for %s", cid[:12], self.image, run.labels or {})

        out.touch()  # the no-progress clock starts with the container
        reader = _in_thread(
            loop, lambda: _read_frames(sock, loop, out.deliver, out.touch), f"docker-out-{cid[:12]}"
        )
        waiter = _in_thread(loop, lambda: api.wait(cid, timeout=None), f"docker-wait-{cid[:12]}")
        reason: str | None = None
        state: dict[str, Any] = {}
        try:
            reason = await watch_run(
                waiter, started, run.timeout_s, run.stall_timeout_s, lambda: out.last_output, cancel
            )
        finally:
            finish = asyncio.ensure_future(self._finish(cid, reason, waiter, reader, sock, stage, state))
            await asyncio.shield(finish)
        out.close()
        assert reason is not None
        code = state.get("exit_code")
        exit_code = None
        if reason == "exited" and isinstance(code, int):
            exit_code = -(code - 128) if 128 < code <= 128 + 64 else code
        return RunOutcome(
            exit_code,
            reason,
            list(out.tail),
            time.monotonic() - started,
            bool(state.get("oom_killed")),
            oom_known="oom_killed" in state,
        )

    async def _finish(
        self,
        cid: str,
        reason: str | None,
        waiter: asyncio.Future[Any],
        reader: asyncio.Future[Any],
        sock: Any,
        stage: Path | None,
        state: dict[str, Any],
    ) -> None:
        """Stop the container unless it exited, read its state into ``state``, drain the
        output, remove the container and the staged files."""
        api = self.client.api
        try:
            if reason != "exited":
                log.info("stopping container %s: %s", cid[:12], reason or "run interrupted")
                with contextlib.suppress(docker.errors.DockerException):
                    await asyncio.to_thread(api.stop, cid, timeout=STOP_GRACE_S)
                try:
                    await asyncio.wait_for(asyncio.shield(waiter), STOP_GRACE_S + 5)
                except (TimeoutError, docker.errors.DockerException):
                    with contextlib.suppress(docker.errors.DockerException):
                        await asyncio.to_thread(api.kill, cid)
            with contextlib.suppress(TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(waiter), 10)
            try:
                info = await asyncio.to_thread(api.inspect_container, cid)
                st = info.get("State") or {}
                state["exit_code"] = st.get("ExitCode")
                state["oom_killed"] = bool(st.get("OOMKilled"))
            except docker.errors.DockerException as exc:
                log.warning("cannot inspect container %s: %s", cid[:12], exc)
            try:
                await asyncio.wait_for(asyncio.shield(reader), DRAIN_S)
            except TimeoutError:
                log.warning("output of container %s still open after the run", cid[:12])
            except Exception:
                log.exception("reading the output of container %s failed", cid[:12])
        finally:
            await self._cleanup(cid, sock, stage)

    async def _cleanup(self, cid: str | None, sock: Any, stage: Path | None) -> None:
        """Close the attach connection, remove the container and the staged files."""
        if sock is not None:
            _close_socket(sock)
        if cid is not None:
            try:
                await asyncio.to_thread(self.client.api.remove_container, cid, force=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.DockerException as exc:
                log.error("cannot remove container %s: %s", cid[:12], exc)
            self._active.discard(cid)
        if stage is not None:
            await asyncio.to_thread(shutil.rmtree, stage, True)

    def _prepare(self, run: BlenderRun) -> tuple[Path | None, str, str]:
        """Stage the script and the guard when ``stage_dir`` is set; give the writable paths
        (and what they hold) to :data:`CONTAINER_UID` when this process is root. Returns
        (stage folder or None, script path, guard path) as the container sees them.

        Raises:
            ValueError: a mounted path does not exist.
        """
        tmp = [run.tmp_dir] if run.tmp_dir is not None else []
        for path in [*run.writable, *tmp]:
            os.makedirs(path, exist_ok=True)
            if os.getuid() == 0:
                _chown_tree(path, CONTAINER_UID, CONTAINER_UID)
        for path in [run.script, *run.read_only]:
            if not os.path.exists(path):
                raise ValueError(f"{path} does not exist (it is to be mounted in the container)")
        if self.stage_dir is None:
            return None, os.path.abspath(run.script), str(GUARD)
        stage = Path(self.stage_dir).absolute() / uuid.uuid4().hex
        stage.mkdir(parents=True, mode=0o755)
        stage.chmod(0o755)
        script = stage / Path(run.script).name
        guard = stage / "_renderfarm_guard.py"
        shutil.copyfile(run.script, script)
        shutil.copyfile(GUARD, guard)
        script.chmod(0o644)
        guard.chmod(0o644)
        return stage, str(script), str(guard)

    # ----------------------------------------------------------------- orphans
    async def reap_orphans(self, labels: Mapping[str, str] | None = None) -> list[str]:
        """Remove the containers of this executor's kind (label :data:`OWNER_LABEL`) that
        carry every one of ``labels`` (run labels, e.g. ``{"agent": "node-1"}``, matched as
        ``renderfarm.agent=node-1``), running or not, except those of runs in progress here.
        Call it when an agent starts, to remove what a crashed process of it left.

        Returns the ids of the containers removed. Raises nothing: Docker errors are logged.
        """
        filters = [f"{OWNER_LABEL}=docker"] + [
            f"{LABEL_PREFIX}{_label_key(k)}={v}" for k, v in (labels or {}).items()
        ]
        api = self.client.api
        try:
            found = await asyncio.to_thread(api.containers, all=True, filters={"label": filters})
        except docker.errors.DockerException as exc:
            log.error("cannot list leftover containers: %s", exc)
            return []
        removed = []
        for c in found:
            cid = c["Id"]
            if cid in self._active:
                continue
            try:
                await asyncio.to_thread(api.remove_container, cid, force=True)
            except docker.errors.NotFound:
                continue
            except docker.errors.DockerException as exc:
                log.error("cannot remove leftover container %s: %s", cid[:12], exc)
                continue
            log.warning("removed container %s left by an earlier agent (%s)", cid[:12], c.get("Status"))
            removed.append(cid)
        return removed

    def close(self) -> None:
        """Close the connection pool of the Docker client."""
        self.client.close()


def _docker_reason(exc: BaseException) -> str:
    """What the Docker daemon said (``explanation`` of an APIError), without the request URL."""
    explanation = getattr(exc, "explanation", None)
    if explanation:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return f"{explanation} (Docker {status})" if status else str(explanation)
    return str(exc)


def _chown_tree(top: str | os.PathLike[str], uid: int, gid: int) -> None:
    """Give ``top`` and everything under it to ``uid:gid``; symbolic links are neither
    followed nor changed (a link a render left cannot point this at another file)."""
    os.chown(top, uid, gid, follow_symlinks=False)
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def _in_thread(loop: asyncio.AbstractEventLoop, fn: Callable[[], _T], name: str) -> asyncio.Future[_T]:
    """Run blocking ``fn`` in a daemon thread of its own; its result in a loop future."""
    future: asyncio.Future[_T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def body() -> None:
        try:
            result = fn()
        except BaseException as exc:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(settle, None, exc)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=body, name=name, daemon=True).start()
    return future


def _read_frames(
    sock: Any,
    loop: asyncio.AbstractEventLoop,
    deliver: Callable[[str], None],
    touch: Callable[[], None],
) -> None:
    """Read the attach stream (multiplexed stdout/stderr frames) until EOF, handing each
    line to ``deliver`` in the loop; ``touch`` marks output that ends no line yet."""
    splitters = {1: LineSplitter(), 2: LineSplitter()}
    try:
        for stream, data in frames_iter(sock, tty=False):
            splitter = splitters.get(stream)
            if splitter is None or not data:
                continue
            lines = splitter.feed(data)
            for line in lines:
                loop.call_soon_threadsafe(deliver, line)
            if not lines:
                loop.call_soon_threadsafe(touch)
    except (OSError, ValueError):
        pass  # the connection was closed under us: the run is over
    for splitter in splitters.values():
        for line in splitter.flush():
            loop.call_soon_threadsafe(deliver, line)


def _close_socket(sock: Any) -> None:
    """Close the attach connection (a SocketIO over the daemon's socket, or a socket)."""
    raw = getattr(sock, "_sock", None)
    for obj in (sock, raw):
        if obj is None:
            continue
        with contextlib.suppress(OSError):
            if hasattr(obj, "shutdown"):
                obj.shutdown(2)
        with contextlib.suppress(OSError):
            obj.close()
