"""Request and response bodies (pydantic). Unknown fields are refused so typos show."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from protocol.devices import BACKENDS, DEFAULT_DEVICE, DEVICES, DeviceError, check_device
from protocol.frames import MAX_FRAME, MIN_FRAME
from protocol.messages import FAILURE_KINDS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobCreate(_Strict):
    """``POST /api/jobs``. Frames use the spec of :func:`protocol.frames.parse_frames`."""

    model_id: str = Field(min_length=1, max_length=64)
    frames: str = Field(min_length=1, max_length=1024, examples=["1-10", "1-99x2", "-5-5"])
    chunk_size: StrictInt = Field(1, ge=1, le=10_000, description="frames per task")
    priority: StrictInt = Field(0, ge=-100, le=100)
    name: str | None = Field(None, max_length=255, pattern=r"^[^\x00-\x1f]*$")
    scene: str | None = Field(
        None, min_length=1, max_length=255, description="defaults to the file's active scene"
    )
    camera: str | None = Field(None, min_length=1, max_length=255)
    engine: Literal["CYCLES", "BLENDER_EEVEE", "BLENDER_WORKBENCH"] | None = None
    samples: StrictInt | None = Field(None, ge=1, le=1_000_000)
    resolution_percentage: StrictInt | None = Field(None, ge=1, le=1000)
    resolution_x: StrictInt | None = Field(None, ge=4, le=65536)
    resolution_y: StrictInt | None = Field(None, ge=4, le=65536)
    output_format: Literal["PNG", "OPEN_EXR", "JPEG"] = "PNG"
    allow_missing: StrictBool = Field(
        False,
        description="render even though files the model refers to (libraries, images, caches) are missing",
    )
    pool: str = Field(
        "default",
        min_length=1,
        max_length=64,
        pattern=r"^[a-z0-9][a-z0-9:_-]*$",
        description="the capability pool whose agents render it (agents start with --pool)",
    )
    device: str | None = Field(
        DEFAULT_DEVICE,
        max_length=16,
        description=f"what it renders on, one of {', '.join(DEVICES)}: any (an agent's GPU if it has "
        "one, else its CPU), cpu, gpu (any GPU backend) or gpu:<backend>; its tasks go only to agents "
        "offering it; null means any",
        examples=["any", "gpu:optix"],
    )
    cpu_fallback: StrictBool = Field(
        False, description="when an agent's GPU devices fail, render on its CPU instead of failing"
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str | None) -> str:
        if value is None:
            return DEFAULT_DEVICE
        try:
            return check_device(value)
        except DeviceError as exc:
            raise ValueError(str(exc)) from None


class JobUpdate(_Strict):
    """``PATCH /api/jobs/{job_id}``: what may change while a job runs."""

    priority: StrictInt = Field(
        ge=-100, le=100, description="higher first; applies to tasks not yet dispatched"
    )


class JobSummary(BaseModel):
    """A job's status: state, task counts by state, frames stored and progress in percent."""

    id: str
    name: str
    model_id: str
    state: Literal["queued", "running", "completed", "failed", "canceled"]
    message: str
    frames: str
    frame_count: int
    frames_done: int
    progress: float
    chunk_size: int
    priority: int
    pool: str
    device: str = Field(description="what it asked to render on (any, cpu, gpu, gpu:optix...)")
    cpu_fallback: bool
    fallback_tasks: int = Field(description="tasks whose last attempt fell back to the CPU")
    blocklist: list[str] = Field(description="agents blocklisted for this job (GET .../blocklist)")
    owner: str = Field(description="user name of who submitted it")
    project_id: str | None
    scene: str | None
    overrides: dict[str, Any]
    tasks: dict[str, int]
    task_count: int
    created_at: str
    finished_at: str | None


class JobList(BaseModel):
    """``GET /api/jobs``: newest first."""

    jobs: list[JobSummary]


class TaskOut(BaseModel):
    """One task of a job."""

    id: str
    job_id: str
    index: int
    frames: list[int]
    state: str
    attempts: int
    agent: str | None
    current_frame: int | None
    message: str
    log_tail: list[str]
    render_seconds: float
    started_at: str | None
    finished_at: str | None
    route: str | None = Field(description="the route (agents' pool and GPU backends) it was sent to")
    not_before: str | None = Field(description="not dispatched before this time (retry backoff)")
    failed_agents: list[str] = Field(description="agents whose attempts failed (they do not get it again)")
    failure_kind: str = Field(description="how the last failed attempt failed (killed, oom, crashed...)")
    device_used: str = Field(description="the devices the last attempt rendered on, as the agent said")
    fallback: bool = Field(description="the last attempt rendered on the CPU instead of the asked GPU")


class TaskList(BaseModel):
    """``GET /api/jobs/{job_id}/tasks``."""

    tasks: list[TaskOut]


class TaskStatus(BaseModel):
    """``GET /api/tasks/{task_id}/status`` (served from the status cache)."""

    id: str
    job_id: str
    index: int
    state: str
    current_frame: int | None
    attempts: int
    agent: str | None
    message: str
    started_at: str | None
    finished_at: str | None


class ModelOut(BaseModel):
    """An uploaded model and its metadata (scenes, cameras, dependencies, what is missing)."""

    id: str
    filename: str
    kind: Literal["blend", "zip"]
    main: str
    sha256: str
    size_bytes: int
    created_at: str
    info: dict[str, Any]
    project_id: str | None = None


class ModelList(BaseModel):
    """``GET /api/models``."""

    models: list[ModelOut]


class OutputFrame(BaseModel):
    """A stored frame and a link to download it."""

    frame: int
    filename: str
    size_bytes: int
    sha256: str
    url: str


class OutputList(BaseModel):
    """``GET /api/jobs/{job_id}/outputs``: stored frames in frame order and a link to them all as a zip."""

    job_id: str
    state: str
    frames: list[OutputFrame]
    zip_url: str


class ClaimRequest(_Strict):
    """Agent: claim a task it received from the broker."""

    agent: str | None = Field(
        None, min_length=1, max_length=255, description="the agent's name; if given, that of its token"
    )


class HeartbeatRequest(_Strict):
    """Agent: keep the lease and report the frame being rendered."""

    lease_id: str = Field(max_length=64)
    current_frame: int | None = Field(None, ge=MIN_FRAME, le=MAX_FRAME)


class ResultRequest(_Strict):
    """Agent: the end of an attempt."""

    lease_id: str = Field(max_length=64)
    status: Literal["completed", "failed"]
    message: str = Field("", max_length=8000)
    log_tail: list[str] = Field(default_factory=list, max_length=200)
    missing_frames: list[Annotated[int, Field(ge=MIN_FRAME, le=MAX_FRAME)]] = Field(default_factory=list)
    render_seconds: float = Field(0.0, ge=0, le=1e7, allow_inf_nan=False)
    kind: str = Field(
        "", max_length=32, description=f"why a failed attempt failed: one of {', '.join(FAILURE_KINDS)}"
    )
    device: str = Field("", max_length=255, description="the devices the render used, as the script logged")
    fallback: StrictBool = Field(False, description="rendered on the CPU although the job asked for a GPU")

    @field_validator("kind")
    @classmethod
    def _kind(cls, value: str) -> str:
        if value and value not in FAILURE_KINDS:
            raise ValueError(f"kind {value!r} is not one of {', '.join(FAILURE_KINDS)}")
        return value


class BlockedAgent(BaseModel):
    """An agent blocklisted for a job: its failures there not cleared, the last one's kind and message."""

    agent: str
    failures: int
    kinds: list[str]
    last_failure_at: str
    last_message: str


class Blocklist(BaseModel):
    """``GET /api/jobs/{job_id}/blocklist``: agents that take no more of the job's tasks."""

    job_id: str
    blocklist_after: int = Field(description="failures in one job that blocklist an agent (0: never)")
    agents: list[BlockedAgent]


class BlocklistCleared(BaseModel):
    """``DELETE /api/jobs/{job_id}/blocklist/{agent}``: the agent may take the job's tasks again."""

    job_id: str
    agent: str
    cleared: int = Field(description="failure rows marked cleared")


class ErrorBody(BaseModel):
    """Every error: ``{"error": {"status", "message", "field"}}``."""

    error: dict[str, Any]


class AgentCapabilities(BaseModel):
    """What an agent advertises: CPU cores, memory in bytes, GPUs and their backends, Blender, tags."""

    model_config = ConfigDict(extra="allow")
    cpu_cores: StrictInt = Field(0, ge=0, le=100_000)
    memory_bytes: StrictInt = Field(0, ge=0)
    gpus: list[dict[str, Any]] = Field(default_factory=list, max_length=64)
    backends: list[Annotated[str, Field(max_length=32)]] = Field(
        default_factory=list,
        max_length=16,
        description=f"Cycles GPU backends it offers ({', '.join(BACKENDS)}; any case; CPU may be "
        "listed too); stored upper case in that order",
    )
    blender: str = Field("", max_length=64)
    tags: list[Annotated[str, Field(max_length=64)]] = Field(default_factory=list, max_length=64)

    @field_validator("backends")
    @classmethod
    def _backends(cls, value: list[str]) -> list[str]:
        from server.nodes.service import advertised_backends

        return advertised_backends(value)


class AgentRegister(_Strict):
    """``POST /api/agent/register``."""

    name: str | None = Field(
        None,
        min_length=1,
        max_length=255,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$",
        description="the name its agent token is bound to (the default); another name is refused",
    )
    pool: str = Field("default", min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9:_-]*$")
    capabilities: AgentCapabilities = Field(default_factory=AgentCapabilities)
    version: str = Field("", max_length=64)
    instance: str = Field("", max_length=64, pattern=r"^[A-Za-z0-9_-]*$", description="random per process")
    replace: StrictBool = Field(
        False, description="take the name over even from a live process (in-process agents of one farm)"
    )


class AgentBeat(_Strict):
    """``POST /api/agent/heartbeat``: the agent is alive, or (``stopping``) going offline."""

    name: str | None = Field(None, min_length=1, max_length=255)
    stopping: StrictBool = False


class AgentOut(BaseModel):
    """A registered node agent and whether it is online now."""

    id: str
    name: str
    pool: str
    route: str = Field(description="its pool and GPU backends (the queue it consumes)")
    backends: list[str]
    version: str
    capabilities: dict[str, Any]
    online: bool
    enabled: bool = Field(
        description="false once an admin disabled it: it takes no new task (one it renders runs to its end)"
    )
    current_task_id: str | None
    registered_at: str
    last_seen_at: str


class AgentUpdate(_Strict):
    """``PATCH /api/agents/{name}``: enable or disable an agent."""

    enabled: StrictBool = Field(
        description="false: the agent takes no new task (claims refused, nothing routed to it); "
        "a task it is rendering runs to its end. true: it takes tasks again"
    )


class AgentRegistered(BaseModel):
    """What a registering agent is told: its queue, the broker to consume from, its intervals."""

    agent: AgentOut
    route: str = Field(description="its route: the pool, and its GPU backends if any")
    queue: str = Field(
        description="the broker queue to consume (renderfarm.tasks for CPU agents of pool default)"
    )
    broker_url: str | None
    heartbeat_s: float
    lease_s: float


class AgentList(BaseModel):
    """``GET /api/agents``: online agents first."""

    agents: list[AgentOut]
