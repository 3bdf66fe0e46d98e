"""``renderfarm``: the command line (click + rich).

Exit status: 0 success; 1 the job failed or was canceled (the reason is printed);
2 bad usage or a request the server refused (the server's message is printed).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cli import credentials
from cli.client import ClientError, FarmClient
from node_agent.executor.base import BlenderNotFound
from protocol.devices import DEVICES
from protocol.frames import FrameSpecError, parse_frames

console = Console(stderr=True)
DEFAULT_SERVER = os.environ.get("RENDERFARM_SERVER", "http://127.0.0.1:3000")
"""The farm client commands talk to without ``--server`` (``RENDERFARM_SERVER``, read at start)."""
DEFAULT_DATA_DIR = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "renderfarm"
"""Same as ``server.config.DEFAULT_DATA_DIR`` (not imported, to keep the client light)."""


def _check_server(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise click.BadParameter(f"{value!r} is not a server URL such as http://127.0.0.1:3000")
    return value


def server_option(f: Any) -> Any:
    """The ``--server`` option shared by every client command."""
    return click.option(
        "--server",
        default=DEFAULT_SERVER,
        show_default=True,
        callback=_check_server,
        help="Farm URL (or RENDERFARM_SERVER).",
    )(f)


def _fail(message: str, code: int = 2) -> NoReturn:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    sys.exit(code)


def client_for(server: str) -> FarmClient:
    """A client of ``server`` sending the CLI's token for it (``RENDERFARM_TOKEN``, else the
    stored one from ``renderfarm login``; none when there is neither). Exits 2 when the
    credentials file cannot be read."""
    try:
        return FarmClient(server, credentials.token_for(server))
    except credentials.CredentialsError as exc:
        _fail(str(exc))


def not_logged_in(server: str) -> str:
    """The message for a 401: how to log in to ``server``."""
    url = credentials.server_key(server)
    message = (
        f"not logged in to {url} (or the token expired/was revoked): run `renderfarm login --server {url}`"
    )
    if os.environ.get(credentials.ENV_TOKEN):
        message += f" (the token sent was {credentials.ENV_TOKEN}'s)"
    return message


def refused(exc: ClientError, server: str, with_field: bool = False) -> NoReturn:
    """Exit 2 with the server's message; a 401 gets :func:`not_logged_in` instead."""
    if exc.status == 401:
        _fail(not_logged_in(server))
    _fail(f"{exc} (field: {exc.field})" if with_field and exc.field else str(exc))


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log what the server and agents do.")
def main(verbose: bool) -> None:
    """Render farm for Blender."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def backend_options(f: Any) -> Any:
    """Options choosing the backends: a config file and one URL per backend (see ``server.config``)."""
    opts = [
        click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="TOML file of settings (or RENDERFARM_CONFIG); flags and RENDERFARM_* variables win.",
        ),
        click.option(
            "--data-dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help=f"Database, storage, temp uploads and secrets (default {DEFAULT_DATA_DIR}).",
        ),
        click.option(
            "--database-url", default=None, help="e.g. mysql+aiomysql://user:pw@host/db (default SQLite)."
        ),
        click.option(
            "--broker-url", default=None, help="e.g. amqp://user:pw@host:5672/ (default memory://)."
        ),
        click.option("--cache-url", default=None, help="e.g. redis://host:6379/0 (default memory://)."),
        click.option(
            "--storage-url", default=None, help="e.g. s3://bucket?endpoint=http://minio:9000&addressing=path."
        ),
        click.option(
            "--blender", default=None, help="Blender binary (default: blender on PATH, else the bpy module)."
        ),
        click.option(
            "--task-timeout",
            "task_timeout_s",
            type=click.FloatRange(1),
            default=None,
            help="Hard limit of one render attempt, in seconds (default 3600).",
        ),
        click.option(
            "--stall-timeout",
            "stall_timeout_s",
            type=click.FloatRange(1),
            default=None,
            help="Kill a render that prints nothing for this many seconds (default 600).",
        ),
        click.option(
            "--lease",
            "lease_s",
            type=click.FloatRange(1),
            default=None,
            help="Seconds a task's lease lasts without a heartbeat (default 30).",
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _load(config_file: Path | None, **flags: Any) -> Any:
    """Settings from flags, environment and config file; exits 2 naming what is wrong."""
    from server.config import load_settings

    try:
        return load_settings(config_file, **flags)
    except ValueError as exc:
        _fail(str(exc))


def _serve(settings: Any, host: str, port: int, agents: int, what: str, warm: bool = True) -> None:
    """Run the farm (API, scheduler and ``agents`` local agents) until SIGINT/SIGTERM."""
    from cli.farm import running_farm
    from server.config import redact_url

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with running_farm(settings, host, port, agents, warm=warm) as farm:
            # What start-up made (modules, ORM mappers, routes) lives as long as the process: keep
            # the cyclic GC from rescanning it on every full collection (that cost ~45 us of each
            # status read under load, 160,000 objects; benchmarks/status_api.py).
            gc.collect()
            gc.freeze()
            backends = ", ".join(
                redact_url(u)
                for u in (
                    settings.database_url,
                    settings.broker_url,
                    settings.cache_url,
                    settings.storage_url,
                )
            )
            console.print(
                f"renderfarm {what} is up at [bold]{farm.url}[/] with {agents} local agent(s); "
                + escape(f"data in {settings.data_dir}; backends: {backends}. Ctrl-C stops it."),
                highlight=False,
            )
            if what == "farm":
                await _log_cli_in(farm)
            if agents == 0:
                console.print(
                    "agents need an agent token each: "
                    + escape(f"renderfarm token create --agent NAME --server {farm.url}")
                    + " (as an admin)",
                    highlight=False,
                )
            await stop.wait()
        console.print(f"renderfarm {what} stopped")

    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(
            f"[yellow]warning:[/] listening on {escape(host)} over plain HTTP: passwords and tokens "
            "cross the network unencrypted unless a TLS proxy sits in front",
            highlight=False,
        )
    try:
        asyncio.run(serve())
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    except (ValueError, BlenderNotFound) as exc:
        _fail(str(exc))


async def _log_cli_in(farm: Any) -> None:
    """Make sure the CLI's credentials hold a working token for ``farm.url``: keep a stored one
    that ``GET /api/me`` accepts, else store a new personal token of the first admin
    (``local_admin_token``). Prints who the CLI is logged in as; a credentials file that cannot
    be written is a warning, not a failure of the farm."""
    import socket

    from sqlalchemy import select

    from server.auth.service import local_admin_token
    from server.auth.tokens import token_hash
    from server.errors import ApiError
    from server.persistence.tables import ApiToken

    hint = _server_hint(farm.url)
    try:
        entry = credentials.stored(farm.url)
        kept = credentials.sendable(entry["token"]) if entry else None
        if kept:
            async with FarmClient(farm.url, kept) as c:
                try:
                    me = await c.me()
                except ClientError:
                    me = None
            if me is not None:
                console.print(
                    f"the CLI is logged in to {escape(farm.url)} as {escape(me['username'])} "
                    f"(token in {escape(str(credentials.credentials_path()))}){escape(hint)}",
                    highlight=False,
                )
                return
        token = await local_admin_token(farm.ctx, f"renderfarm up on {socket.gethostname()}")
        async with FarmClient(farm.url, token) as c:
            me = await c.me()
        async with farm.ctx.db.session() as s:
            token_id = await s.scalar(select(ApiToken.id).where(ApiToken.token_hash == token_hash(token)))
        path = credentials.store(farm.url, token, me["username"], token_id)
    except (credentials.CredentialsError, ClientError, ApiError) as exc:
        console.print(
            f"[yellow]warning:[/] could not log the CLI in to {escape(farm.url)}: {escape(str(exc))}",
            highlight=False,
        )
        return
    console.print(
        f"the CLI is logged in to {escape(farm.url)} as {escape(me['username'])} "
        f"(new token in {escape(str(path))}){escape(hint)}",
        highlight=False,
    )


def _server_hint(url: str) -> str:
    """For a farm at ``url`` other than the client commands' default (``RENDERFARM_SERVER``, else
    http://127.0.0.1:3000, read now): `` (use --server URL or export RENDERFARM_SERVER=URL)``;
    else ``""``."""
    default = os.environ.get("RENDERFARM_SERVER", "http://127.0.0.1:3000")
    if credentials.server_key(url) == credentials.server_key(default):
        return ""
    return f" (use --server {url} or export RENDERFARM_SERVER={url})"


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=3000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--agents", default=1, show_default=True, type=click.IntRange(0, 64), help="Local node agents.")
@click.option(
    "--warm/--no-warm",
    default=True,
    show_default=True,
    help="Local agents keep one Blender process across consecutive tasks of a job.",
)
@backend_options
def up(host: str, port: int, agents: int, warm: bool, config_file: Path | None, **flags: Any) -> None:
    """Start the whole farm in one process: API, scheduler and local node agents.

    Once up, the CLI is logged in to it as the first admin (a token stored in the CLI's
    credentials, kept while it works), so that ``renderfarm submit`` needs no login.
    """
    _serve(_load(config_file, **flags), host, port, agents, "farm", warm=warm)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=3000, show_default=True, type=click.IntRange(1, 65535))
@backend_options
def server(host: str, port: int, config_file: Path | None, **flags: Any) -> None:
    """Run the API and the scheduler alone; agents run elsewhere (renderfarm agent).

    Several servers may share one database, broker, cache and storage: each serves the
    API, and one at a time runs the scheduler.
    """
    _serve(_load(config_file, **flags), host, port, 0, "server")


@main.command()
@server_option
@click.option(
    "--token",
    envvar="RENDERFARM_AGENT_TOKEN",
    required=True,
    help="Agent token, from `renderfarm token create --agent NAME` (or RENDERFARM_AGENT_TOKEN).",
)
@click.option(
    "--broker-url",
    default=None,
    envvar="RENDERFARM_AGENT_BROKER_URL",
    help="Broker to consume from (default: the one the server names).",
)
@click.option(
    "--name",
    default=None,
    help="Agent name; must be the one the token is bound to (default: the token's).",
)
@click.option("--pool", default="default", show_default=True, help="Capability pool to take tasks from.")
@click.option("--tag", "tags", multiple=True, help="A tag to advertise (repeatable).")
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Input cache and attempt folders (default <data dir>/agent-<name>).",
)
@click.option(
    "--blender", default=None, help="Blender binary (default: blender on PATH, else the bpy module)."
)
@click.option(
    "--cache-size",
    type=click.FloatRange(min=0.001),
    default=20.0,
    show_default=True,
    help="GiB of models the agent keeps in its input cache; least recently used ones go past it.",
)
@click.option(
    "--executor",
    "executor_kind",
    type=click.Choice(["local", "docker"]),
    default="local",
    show_default=True,
    envvar="RENDERFARM_AGENT_EXECUTOR",
    help="Run Blender as a local process, or in a Docker container per task (no network, "
    "read-only input, limits; see docker/build-images.sh for the image).",
)
@click.option(
    "--image",
    default=None,
    help="Render image of --executor docker [default: renderfarm/render:local].",
)
@click.option(
    "--memory",
    default=None,
    metavar="SIZE",
    help="Memory limit of a render container, no swap (e.g. 8g, 512m) [default: 3/4 of this machine's].",
)
@click.option(
    "--cpus",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="CPUs a render container may use (e.g. 4, 1.5) [default: all].",
)
@click.option(
    "--pids",
    type=click.IntRange(min=16),
    default=None,
    help="Limit on processes and threads in a render container [default: 512].",
)
@click.option(
    "--gpus",
    default=None,
    metavar="all|none|IDS",
    help="NVIDIA GPUs of a render container: all, none, or device ids such as 0,1 [default: all the "
    "detected ones when the agent advertises a GPU backend; none: it advertises none].",
)
@click.option(
    "--warm/--no-warm",
    default=True,
    show_default=True,
    help="Keep one Blender process (or container) across consecutive tasks of a job.",
)
@click.option(
    "--backends",
    default=None,
    metavar="LIST",
    help="Cycles GPU backends to advertise instead of the detected ones, comma-separated "
    "(OPTIX, CUDA, HIP, ONEAPI, METAL), or 'none' for CPU only. NVIDIA GPUs are detected; "
    "AMD and Intel ones must be named.",
)
def agent(
    server: str,
    token: str,
    broker_url: str | None,
    name: str | None,
    pool: str,
    tags: tuple[str, ...],
    work_dir: Path | None,
    blender: str | None,
    cache_size: float,
    executor_kind: str,
    image: str | None,
    memory: str | None,
    cpus: float | None,
    pids: int | None,
    gpus: str | None,
    warm: bool,
    backends: str | None,
) -> None:
    """Run one node agent: register with SERVER, take tasks from the broker, render, report."""
    from cli.agent import ExecutorOptions, parse_size, run_agent

    docker_only = {"--image": image, "--memory": memory, "--cpus": cpus, "--pids": pids, "--gpus": gpus}
    given = [flag for flag, value in docker_only.items() if value is not None]
    if executor_kind != "docker" and given:
        verb = "applies" if len(given) == 1 else "apply"
        raise click.UsageError(f"{', '.join(given)} {verb} only to --executor docker")
    memory_bytes = None
    if memory is not None:
        try:
            memory_bytes = parse_size(memory)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--memory") from None
        if memory_bytes < 6 << 20:
            raise click.BadParameter(f"{memory!r} is below Docker's minimum of 6 MiB", param_hint="--memory")
    gpu_ids = None
    if gpus is not None:
        from node_agent.executor.docker import parse_gpus

        try:
            gpu_ids = parse_gpus(gpus)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--gpus") from None
    if executor_kind == "docker" and blender:
        raise click.UsageError("--blender applies only to --executor local (the image brings Blender)")
    options = ExecutorOptions(executor_kind, image, memory_bytes, cpus, pids, gpu_ids)
    backend_list = None
    if backends is not None:
        from protocol.devices import BACKENDS

        backend_list = [b.strip().upper() for b in backends.split(",")]
        if "" in backend_list:
            raise click.BadParameter(
                f"{backends!r} has an empty item; give e.g. OPTIX,CUDA or none", param_hint="--backends"
            )
        if "NONE" in backend_list:
            if len(backend_list) > 1:
                raise click.BadParameter("none cannot be combined with backends", param_hint="--backends")
            backend_list = []
        unknown = [b for b in backend_list if b not in BACKENDS]
        if unknown:
            raise click.BadParameter(
                f"unknown backend(s) {', '.join(unknown)}; known: {', '.join(BACKENDS)} or none",
                param_hint="--backends",
            )
    if gpus is not None and gpu_ids is None:  # --gpus none: the containers get no GPU
        if backend_list:
            raise click.UsageError(
                "--gpus none gives the containers no GPU, so they cannot render with "
                + ", ".join(backend_list)
            )
        backend_list = []  # so advertise none

    try:
        asyncio.run(
            run_agent(
                server,
                token,
                broker_url,
                name,
                pool,
                list(tags),
                work_dir,
                blender,
                console,
                input_cache_bytes=int(cache_size * (1 << 30)),
                executor=options,
                warm=warm,
                backends=backend_list,
            )
        )
    except (ValueError, BlenderNotFound) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        pass


def _render_options(f: Any) -> Any:
    opts = [
        click.option("--frames", required=True, help="Frame spec: 7, 1-10, 1-10,20-25, 1-99x2, -5-5."),
        click.option(
            "--chunk", default=1, show_default=True, type=click.IntRange(1, 10_000), help="Frames per task."
        ),
        click.option("--scene", default=None, help="Scene to render (default: the file's active scene)."),
        click.option("--camera", default=None, help="Camera object to render from."),
        click.option(
            "--engine", type=click.Choice(["CYCLES", "BLENDER_EEVEE", "BLENDER_WORKBENCH"]), default=None
        ),
        click.option("--samples", type=click.IntRange(1), default=None),
        click.option(
            "--resolution",
            "resolution_percentage",
            type=click.IntRange(1, 1000),
            default=None,
            help="Resolution percentage.",
        ),
        click.option(
            "--format",
            "output_format",
            type=click.Choice(["PNG", "OPEN_EXR", "JPEG"]),
            default="PNG",
            show_default=True,
        ),
        click.option("--priority", type=click.IntRange(-100, 100), default=0, show_default=True),
        click.option(
            "--pool", default=None, help="Capability pool whose agents render it (default: default)."
        ),
        click.option(
            "--device",
            type=click.Choice(DEVICES, case_sensitive=False),
            default=None,
            help="What to render on: any (a GPU where the agent has one, else its CPU), cpu, gpu "
            "(any GPU backend) or gpu:<backend>; only agents offering it get the tasks [default: any].",
        ),
        click.option(
            "--cpu-fallback",
            is_flag=True,
            default=None,
            help="When an agent's GPU devices fail, render on its CPU instead of failing the attempt.",
        ),
        click.option(
            "--allow-missing",
            is_flag=True,
            default=None,
            help="Render even though files the model refers to (libraries, images, caches) are missing.",
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_render_options
@click.option("--main", "main_blend", default=None, help="The .blend to open inside a .zip package.")
@click.option(
    "--project",
    default=None,
    metavar="NAME",
    help="Project (name or id) the model and job belong to (default: your only project).",
)
@server_option
@click.option("--wait", is_flag=True, help="Follow the job until it finishes.")
@click.option(
    "--download",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Download the frames here when the job completes (implies --wait).",
)
def submit(
    file: Path,
    main_blend: str | None,
    project: str | None,
    server: str,
    wait: bool,
    download: Path | None,
    **job: Any,
) -> None:
    """Upload FILE (.blend or .zip) and submit a job rendering it, in project --project."""
    try:
        parse_frames(job["frames"])
    except FrameSpecError as exc:
        _fail(f"{exc} (field: frames)")
    try:
        code = asyncio.run(
            _submit(file, main_blend, server, wait or download is not None, download, job, project=project)
        )
    except KeyboardInterrupt:
        console.print(
            "stopped waiting; a submitted job keeps running on the farm (renderfarm status JOB_ID)",
            highlight=False,
        )
        code = 130
    sys.exit(code)


async def _submit(
    file: Path,
    main_blend: str | None,
    server: str,
    wait: bool,
    download: Path | None,
    job: dict[str, Any],
    token: str | None = None,
    project: str | None = None,
) -> int:
    """Upload (to ``project``, a name or id; default the caller's only project), submit, and
    (``wait``) follow; ``token`` instead of the CLI's credentials when given.

    Exits 2 when the server refuses a request; when no project is named and the caller has
    several, the message lists them and asks for ``--project``."""
    async with FarmClient(server, token) if token else client_for(server) as c:
        try:
            size = file.stat().st_size
            with _progress() as p:
                t = p.add_task(f"upload {file.name}", total=size)
                try:
                    model = await c.upload_model(
                        file, main_blend, progress=lambda n: p.update(t, completed=n), project=project
                    )
                except ClientError as exc:
                    if exc.status == 400 and exc.field == "project" and not project:
                        _fail(await _choose_project_message(c, exc))
                    raise
            job["chunk_size"] = job.pop("chunk")
            created = await c.create_job(model_id=model["id"], **job)
        except ClientError as exc:
            refused(exc, server, with_field=True)
        console.print(
            f"job [bold]{created['id']}[/]: {created['frame_count']} frame(s) in "
            f"{created['task_count']} task(s)",
            highlight=False,
        )
        print(created["id"])
        if not wait:
            return 0
        return await _follow(c, created["id"], download)


async def _choose_project_message(c: FarmClient, exc: ClientError) -> str:
    """The message for an upload the server refused for naming no project (400, field
    ``project``): the server's list of the caller's projects, else the ones ``GET /api/me`` names."""
    m = re.search(r"one of: ([^)]*)\)", str(exc))
    names = [n.strip() for n in m.group(1).split(",") if n.strip()] if m else []
    if not names:
        try:
            names = [p["name"] for p in (await c.me())["projects"]]
        except ClientError:
            names = []
    if len(names) > 1:
        return f"you belong to several projects ({', '.join(names)}): choose one with --project NAME"
    return f"{exc}: choose a project with --project NAME"


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


async def _follow(c: FarmClient, job_id: str, download: Path | None) -> int:
    try:
        with _progress() as p:
            t = p.add_task("render", total=None)
            said = {"message": ""}

            def update(j: dict[str, Any]) -> None:
                p.update(
                    t,
                    total=j["frame_count"],
                    completed=j["frames_done"],
                    description=f"render [{j['state']}]",
                )
                message = j.get("message") or ""
                if message != said["message"] and j["state"] not in ("completed", "failed", "canceled"):
                    said["message"] = message
                    if message:  # e.g. why it waits: no agent offers its device
                        p.console.print(escape(f"job {job_id}: {message}"), highlight=False)

            final = await c.wait(job_id, update)
        if final["state"] != "completed":
            _fail(f"job {job_id} {final['state']}: {final['message']}", code=1)
        console.print(f"job {job_id} completed: {final['frames_done']} frame(s)", highlight=False)
        if download is not None:
            paths = await c.download(job_id, download)
            console.print(f"{len(paths)} frame(s) in {download.resolve()}", highlight=False)
        return 0
    except ClientError as exc:
        refused(exc, c.server)


@main.command()
@click.argument("job_id")
@server_option
@click.option("--wait", is_flag=True, help="Follow the job until it finishes.")
def status(job_id: str, server: str, wait: bool) -> None:
    """Show a job's state, progress and tasks."""

    async def run() -> int:
        async with client_for(server) as c:
            try:
                if wait:
                    return await _follow(c, job_id, None)
                j = await c.job(job_id)
                tasks = await c.tasks(job_id)
            except ClientError as exc:
                refused(exc, server)
            console.print(
                f"job {j['id']} [bold]{j['state']}[/] {j['progress']}% "
                f"({j['frames_done']}/{j['frame_count']} frames) {escape(j['message'])}",
                highlight=False,
            )
            extra = []
            if j.get("device", "any") != "any":
                extra.append(
                    f"device {j['device']}" + (" (CPU fallback allowed)" if j.get("cpu_fallback") else "")
                )
            if j.get("fallback_tasks"):
                extra.append(f"{j['fallback_tasks']} task(s) fell back to the CPU")
            if j.get("blocklist"):
                extra.append(f"blocklisted agents: {', '.join(j['blocklist'])}")
            if extra:
                console.print("  " + escape("; ".join(extra)), highlight=False)
            for t in tasks:
                used = (
                    f" [{t['device_used']}{', fallback' if t.get('fallback') else ''}]"
                    if t.get("device_used")
                    else ""
                )
                console.print(
                    f"  task {t['index']:>4} {t['state']:<10} frames {t['frames']} "
                    f"{escape(t['agent'] or '')}{escape(used)} {escape(t['message'])}",
                    highlight=False,
                )
            return 1 if j["state"] in ("failed", "canceled") else 0

    sys.exit(asyncio.run(run()))


@main.command()
@click.argument("job_id")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@server_option
@click.option("--overwrite", is_flag=True, help="Replace files in DEST that differ from the job's frames.")
def download(job_id: str, dest: Path, server: str, overwrite: bool) -> None:
    """Download a job's stored frames into DEST (exit 1 when the job has not completed)."""

    async def run() -> int:
        async with client_for(server) as c:
            try:
                job = await c.job(job_id)
                paths = await c.download(job_id, dest, overwrite=overwrite)
            except ClientError as exc:
                refused(exc, server)
        console.print(f"{len(paths)} frame(s) in {dest.resolve()}", highlight=False)
        if job["state"] != "completed":
            console.print(
                f"[yellow]warning:[/] job {job_id} is {job['state']}: {len(paths)} of "
                f"{job['frame_count']} frame(s) downloaded",
                highlight=False,
            )
            return 1
        return 0

    sys.exit(asyncio.run(run()))


@main.command()
@click.argument("job_id")
@server_option
def cancel(job_id: str, server: str) -> None:
    """Cancel a job."""

    async def run() -> None:
        async with client_for(server) as c:
            try:
                j = await c.cancel(job_id)
            except ClientError as exc:
                refused(exc, server)
        console.print(f"job {j['id']} {j['state']}", highlight=False)

    asyncio.run(run())


@main.command(context_settings={"ignore_unknown_options": True})  # so that -5 is a priority
@click.argument("job_id")
@click.argument("priority", type=click.IntRange(-100, 100))
@server_option
def priority(job_id: str, priority: int, server: str) -> None:
    """Change a job's PRIORITY (-100..100, higher first); its tasks not yet dispatched follow."""

    async def run() -> None:
        async with client_for(server) as c:
            try:
                j = await c.set_priority(job_id, priority)
            except ClientError as exc:
                refused(exc, server)
        console.print(f"job {j['id']} priority {j['priority']} ({j['state']})", highlight=False)

    asyncio.run(run())


@main.command("sample-scene")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--blender", default=None, help="Blender binary (default: blender on PATH, else the bpy module)."
)
def sample_scene(out: Path, blender: str | None) -> None:
    """Write the bundled animated demo scene (24 frames) to OUT."""
    from cli.farm import make_sample_scene

    try:
        path = asyncio.run(make_sample_scene(out, blender))
    except (RuntimeError, OSError) as exc:
        _fail(str(exc))
    console.print(f"sample scene written to {path}", highlight=False)


@main.command()
@click.option(
    "--dir",
    "workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("renderfarm-demo"),
    show_default=True,
    help="Where the demo keeps everything.",
)
@click.option("--frames", default="1-4", show_default=True)
@click.option("--chunk", default=2, show_default=True, type=click.IntRange(1))
@click.option("--agents", default=1, show_default=True, type=click.IntRange(1, 64))
@click.option(
    "--blender", default=None, help="Blender binary (default: blender on PATH, else the bpy module)."
)
def demo(workdir: Path, frames: str, chunk: int, agents: int, blender: str | None) -> None:
    """Start the embedded farm, render the bundled sample scene, download the frames, stop."""
    from cli.farm import free_port, make_sample_scene, running_farm
    from server.auth.service import local_admin_token

    async def run() -> int:
        console.print("generating the sample scene ...")
        scene = await make_sample_scene(workdir / "sample_scene.blend", blender)
        for old in (workdir / "frames").glob("frame_*"):  # the demo owns this folder: no stale frames
            old.unlink()
        from server.config import Settings

        settings = Settings(data_dir=workdir / "farm", blender=blender)  # always the embedded backends
        async with running_farm(settings, port=free_port(), agents=agents) as farm:
            console.print(
                f"farm up at {farm.url}; submitting frames {frames} in chunks of {chunk}", highlight=False
            )
            token = await local_admin_token(farm.ctx, "renderfarm demo")  # not the user's credentials
            return await _submit(
                scene,
                None,
                farm.url,
                True,
                workdir / "frames",
                {"frames": frames, "chunk": chunk, "output_format": "PNG"},
                token=token,
            )

    try:
        code = asyncio.run(run())
    except (RuntimeError, OSError, ValueError) as exc:  # BlenderNotFound is a RuntimeError
        _fail(str(exc))
    if code == 0:
        click.echo(f"frames: {(workdir / 'frames').resolve()}")
    sys.exit(code)


from cli.db_cmd import db as _db_group  # noqa: E402  (renderfarm db upgrade|current)

main.add_command(_db_group)

import cli.accounts  # noqa: E402  (registers login, logout, whoami, user, project, token, audit)
import cli.addon_cmd  # noqa: E402  (registers addon build)
import cli.nodes_cmd  # noqa: E402, F401  (registers agents, blocklist)
