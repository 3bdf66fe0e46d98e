"""Message shapes exchanged between the server, the broker and node agents.

Standard library only. Every shape is a frozen dataclass with ``to_dict`` /
``from_dict``; unknown keys are ignored on input so that either side may be
upgraded first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Self

OUTPUT_FORMATS = ("PNG", "OPEN_EXR", "JPEG")
"""Image formats a job may ask for (Blender's ``ImageFormatSettings.file_format`` names)."""
OUTPUT_EXTENSIONS = {"PNG": ".png", "OPEN_EXR": ".exr", "JPEG": ".jpg"}
ENGINES = ("CYCLES", "BLENDER_EEVEE", "BLENDER_WORKBENCH")
"""Render engines a job may ask for (``RenderSettings.engine`` names in Blender 5)."""

RENDER_OVERRIDES = (
    "camera",
    "engine",
    "samples",
    "resolution_percentage",
    "resolution_x",
    "resolution_y",
    "output_format",
)
"""Job fields that override the .blend's render settings; they travel job -> TaskSpec -> RenderParams."""

FAILURE_KINDS = (
    "killed",
    "oom",
    "crashed",
    "timeout",
    "stalled",
    "python_error",
    "frames_missing",
    "device",
    "input",
    "spawn_failed",
    "error",
)
"""How an attempt failed: killed by a signal (possibly out of memory), out of memory (the
container's OOM killer), crashed (Blender's crash report is in the log), timed out (hard
limit), stalled (no progress), a Python error, frames missing, no usable render device,
the input could not be fetched, Blender could not start, or another error."""

TASK_QUEUE = "renderfarm.tasks"


def queue_for_pool(pool: str) -> str:
    """The broker queue of a capability pool: ``renderfarm.tasks`` for the default pool,
    ``renderfarm.tasks.<pool>`` for the others (pool names are ``[a-z0-9:_-]``)."""
    return TASK_QUEUE if pool in ("", "default") else f"{TASK_QUEUE}.{pool}"


"""Broker queue that holds one :class:`TaskMessage` per task to render."""

EVENT_PREFIX = "@@renderfarm "
"""Prefix of the JSON event lines the render script prints on stdout."""


class _Shape:
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class TaskMessage(_Shape):
    """What the broker carries for one task: only ids; the agent claims the rest."""

    task_id: str
    job_id: str
    priority: int = 0


@dataclass(frozen=True)
class RenderParams(_Shape):
    """Parameters of one task's render, written as JSON for the render script.

    Paths are absolute paths on the agent. ``frames`` are Blender frame numbers
    (may be negative). ``None`` means "keep what the .blend says".
    """

    blend_file: str
    output_dir: str
    manifest_path: str
    frames: list[int]
    scene: str | None = None
    camera: str | None = None
    engine: str | None = None
    samples: int | None = None
    resolution_percentage: int | None = None
    resolution_x: int | None = None
    resolution_y: int | None = None
    output_format: str | None = "PNG"
    confine_root: str | None = None
    """The model's folder: external files outside it are not read (see render_task.py)."""
    device: str = "CPU"
    """The Cycles device to render on: ``"CPU"`` or a backend of ``protocol.devices.BACKENDS``;
    the script enables it explicitly (``--factory-startup`` discards the user's preferences)."""
    cpu_fallback: bool = False
    """When the GPU backend has no usable device: render on the CPU (True) or fail (False)."""
    command_dir: str | None = None
    """Warm mode: the script keeps the file open and renders one command file after another from
    this folder (see render_task.py); ``frames``, ``output_dir`` and ``manifest_path`` are then
    those of the first command's task only when no command names its own."""


@dataclass(frozen=True)
class TaskSpec(_Shape):
    """What the server hands an agent that claimed a task (``POST .../claim``).

    ``model_url`` is a URL (relative to the server) the agent fetches the input
    from; ``model_kind`` is ``"blend"`` or ``"zip"``; for a zip, ``model_main``
    is the path of the .blend to open inside it.
    """

    task_id: str
    job_id: str
    lease_id: str
    frames: list[int]
    model_sha256: str
    model_kind: str
    model_url: str
    model_main: str | None = None
    scene: str | None = None
    camera: str | None = None
    engine: str | None = None
    samples: int | None = None
    resolution_percentage: int | None = None
    resolution_x: int | None = None
    resolution_y: int | None = None
    output_format: str = "PNG"
    timeout_s: float = 3600.0
    stall_timeout_s: float = 600.0
    heartbeat_s: float = 5.0
    device: str = "any"
    """What the job asks for (``protocol.devices.DEVICES``)."""
    cpu_fallback: bool = False
    """Whether the job allows rendering on the CPU when its GPU devices fail."""


@dataclass(frozen=True)
class TaskResult(_Shape):
    """What an agent reports when an attempt ends (``POST .../result``).

    ``status`` is ``"completed"`` or ``"failed"``; ``log_tail`` holds the last
    log lines (at most 50); ``missing_frames`` names frames the manifest
    promised and that were not stored.
    """

    lease_id: str
    status: str
    message: str = ""
    log_tail: list[str] = field(default_factory=list)
    missing_frames: list[int] = field(default_factory=list)
    render_seconds: float = 0.0
    kind: str = ""
    """Why a failed attempt failed, one of :data:`FAILURE_KINDS` (empty when completed)."""
    device: str = ""
    """The Cycles devices the render used, as the script logged them (e.g. ``"CPU"``,
    ``"OPTIX: NVIDIA H200"``); empty when it did not get that far."""
    fallback: bool = False
    """The job asked for a GPU and the attempt rendered on the CPU (the job allowed it)."""
