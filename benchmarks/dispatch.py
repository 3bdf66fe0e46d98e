"""Dispatch throughput: one 10,000-task job through MariaDB and RabbitMQ, agents that finish at once.

Usage::

    .venv/bin/python benchmarks/dispatch.py [--tasks 10000] [--agents 16] [--mode both]
        [--servers 1] [--window 32] [--repeat 1]

Needs MariaDB, RabbitMQ and Redis (see ``benchmarks/status_api.py``).

The server is ``renderfarm server`` in its own process (``--servers`` of them, sharing
everything; one runs the scheduler) on a fresh MariaDB database and a fresh RabbitMQ
vhost, Redis as its cache and a local ``file://`` storage folder, with
``RENDERFARM_DISPATCH_WINDOW`` = ``--window`` (default twice the agents). A model row is
written straight into its database (no Blender: nothing renders). The simulated agents
run in another process: ``--agents`` asyncio consumers, each with an agent token of its
own bound to its name (made by the farm's first admin through ``POST /api/agent-tokens``;
the benchmark logs in with the generated password), each registered through
``POST /api/agent/register`` and consuming the default pool's queue with prefetch 1,
then for each message, as a real agent does minus Blender:

* mode ``full``: ``POST .../claim``, ``PUT .../frames/<n>`` of a real 1x1 PNG per frame,
  ``POST .../result`` with ``completed``, then ack;
* mode ``claim``: ``POST .../claim`` and ``POST .../result`` with ``failed`` (a
  ``completed`` without stored frames would fail anyway), then ack: the scheduler's and
  the claim's cost without the frame upload. The servers run with :data:`NO_RETRIES`, so
  that each failed attempt fails its task for good (one claim per task, as before the
  failure policy), no agent is blocklisted and the job is not failed early.

Each job is submitted with ``POST /api/jobs`` (frames 1-N, chunk 1) once the agents wait,
with a personal token of the admin. Every agent call is authenticated (a principal cached
in the server for up to 30 s per token, after one Redis read of the access epoch) and,
except the claim, checked against the task's lease holder (one database read of the task's
agent per call, besides what the call itself does).

Figures, from the server's own timestamps in the database:

* **creation**: seconds of the ``POST /api/jobs`` round trip (job, N tasks, summary);
* **dispatches/s**: N / (last task's ``started_at`` - job ``created_at``): tasks made
  eligible by the dispatcher, published and claimed by an agent, per second over the job;
* **dispatch latency**: per task, ``started_at`` (an agent claimed it) - ``dispatched_at``
  (the dispatcher made it eligible and wrote its outbox row): relay, broker, the wait
  for a free agent and the claim; p50 and p99 (ms);
* **submit to first start**: the first ``started_at`` - job ``created_at`` (ms);
* **job wall time**: job ``finished_at`` - ``created_at`` (s).

Also printed: the agents' own round trips (p50 of claim, frame upload, result), the CPU
milliseconds per task of the server, the agents and the local MariaDB, RabbitMQ and
Redis (from ``/proc``; the shared services also serve whatever else runs meanwhile),
and how busy the machine's CPUs were. With instant agents a task waits in the queue
for a free agent, so the dispatch latency is about ``(window - agents) / rate``: a
smaller window or a faster farm shortens it.

Everything made for the run is removed afterwards (database, vhost, cache keys,
processes), also after Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.status_api import (  # noqa: E402
    DEFAULT_REDIS,
    FarmServer,
    delete_cache_keys,
    farm_server,
    insert_model,
    pct,
    services_missing,
    sigterm_as_interrupt,
    stop_process,
)


def tiny_png() -> bytes:
    """A valid 1x1 RGB PNG (69 bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00\x80\x80\x80"))
        + chunk(b"IEND", b"")
    )


NO_RETRIES = {
    "RENDERFARM_TASK_FAILURE_AGENTS": "1",
    "RENDERFARM_BLOCKLIST_AFTER": "0",
    "RENDERFARM_MAX_FAILED_TASK_SHARE": "1",
}
"""Failure-policy settings of the benchmark's servers: a failed attempt is final (mode ``claim``)."""


# ----------------------------------------------------------------------------- simulated agents


async def run_agents(urls: list[str], agents: list[tuple[str, str]], broker_url: str, mode: str) -> None:
    """The simulated agents ``[(name, agent token bound to it)]`` in this process until SIGTERM,
    agent ``i`` calling server ``urls[i % len(urls)]``; prints ``READY`` once consuming, and at
    the end one JSON line of counts (``claimed``, ``refused``, ``errors``) and round trips
    (``claim_ms_p50``...)."""
    import aiohttp

    from protocol.messages import queue_for_pool
    from server.broker.rabbitmq import RabbitBroker

    png = tiny_png()
    counts = {"claimed": 0, "refused": 0, "errors": 0}
    rtt: dict[str, list[float]] = {"claim": [], "frame": [], "result": []}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    broker = RabbitBroker(broker_url, connection_name=f"bench agents pid {os.getpid()}")
    await broker.connect()
    sessions = [
        aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(60))
        for url in urls
    ]
    names = [name for name, _ in agents]
    auth = {name: {"Authorization": f"Bearer {token}"} for name, token in agents}
    for i, name in enumerate(names):
        async with sessions[i % len(sessions)].post(
            "/api/agent/register", json={"name": name}, headers=auth[name]
        ) as r:
            r.raise_for_status()

    async def agent(i: int, name: str) -> None:
        http = sessions[i % len(sessions)]
        headers = auth[name]
        async for d in broker.consume(queue_for_pool("default"), prefetch=1):
            try:
                task_id = json.loads(d.body)["task_id"]
                t = time.perf_counter()
                async with http.post(
                    f"/api/agent/tasks/{task_id}/claim", json={"agent": name}, headers=headers
                ) as r:
                    if r.status == 409:
                        counts["refused"] += 1
                        await d.ack()
                        continue
                    r.raise_for_status()
                    spec = await r.json()
                rtt["claim"].append(time.perf_counter() - t)
                counts["claimed"] += 1
                lease = spec["lease_id"]
                if mode == "full":
                    for frame in spec["frames"]:
                        t = time.perf_counter()
                        async with http.put(
                            f"/api/agent/tasks/{task_id}/frames/{frame}",
                            params={"lease_id": lease, "ext": ".png"},
                            data=png,
                            headers={**headers, "Content-Type": "application/octet-stream"},
                        ) as r:
                            r.raise_for_status()
                        rtt["frame"].append(time.perf_counter() - t)
                    result = {"lease_id": lease, "status": "completed", "render_seconds": 0.0}
                else:
                    result = {"lease_id": lease, "status": "failed", "message": "benchmark: not rendered"}
                t = time.perf_counter()
                async with http.post(f"/api/agent/tasks/{task_id}/result", json=result, headers=headers) as r:
                    r.raise_for_status()
                rtt["result"].append(time.perf_counter() - t)
            except aiohttp.ClientError as exc:
                counts["errors"] += 1
                print(f"agent {name}: {exc}", file=sys.stderr, flush=True)
            await d.ack()

    tasks = [asyncio.create_task(agent(i, name)) for i, name in enumerate(names)]
    # consume() declares the queue and subscribes on its first step: give the channels a moment
    await asyncio.sleep(1.0)
    print("READY", flush=True)
    await stop.wait()
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t
    await broker.close()
    for http in sessions:
        await http.close()
    for k, v in rtt.items():
        if v:
            counts[f"{k}_ms_p50"] = round(pct(v, 50) * 1000, 1)
            counts[f"{k}_ms_p99"] = round(pct(v, 99) * 1000, 1)
    print(json.dumps(counts), flush=True)


# ----------------------------------------------------------------------------- CPU accounting

SERVICE_NAMES = {"mariadbd": "MariaDB", "mysqld": "MariaDB", "beam.smp": "RabbitMQ", "redis-server": "Redis"}


def cpu_seconds(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each named group of processes (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for name, group in pids.items():
        total = 0
        for pid in group:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
        out[name] = total / tick
    return out


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all CPUs (/proc/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    values = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / tick, sum(values) / tick


def service_pids(redis_port: int) -> dict[str, list[int]]:
    """The local MariaDB, RabbitMQ and Redis processes, by service (empty when not local)."""
    found: dict[str, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            comm = (d / "comm").read_text().strip()
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        name = SERVICE_NAMES.get(comm)
        if name == "Redis" and f":{redis_port}".encode() not in cmd:  # ours, not a private test server
            continue
        if name:
            found.setdefault(name, []).append(int(d.name))
    return found


# ----------------------------------------------------------------------------- one job


@dataclass
class JobRun:
    """The figures of one job (see the module docstring)."""

    mode: str
    tasks: int
    creation_s: float
    dispatches_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    first_start_ms: float
    wall_s: float
    completions_per_s: float
    state: str
    agent_counts: dict[str, float]
    cpu_ms_per_task: dict[str, float]
    """CPU milliseconds per task of the server, the agents and each local service (the shared
    services also serve whatever else runs on the machine meanwhile)."""
    machine_busy_pct: float
    """How busy the machine's CPUs were during the job, all processes, in percent."""


def start_agents(farm: FarmServer, n: int, procs: int, mode: str, tmp: Path) -> list[subprocess.Popen[str]]:
    """Start ``procs`` agent processes sharing ``n`` agents, each agent with a new name and an
    agent token bound to it; returns once all print READY.

    Raises:
        RuntimeError: a process exited before it was ready.
    """
    out: list[subprocess.Popen[str]] = []
    per = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
    run = uuid.uuid4().hex[:8]  # fresh names: the agents of an earlier job never said they stopped
    for i, k in enumerate(per):
        names = [f"bench-{run}-{i}-{j}" for j in range(k)]
        agents = [(name, farm.agent_token(name)) for name in names]
        log = open(tmp / f"agents-{mode}-{i}.log", "w")
        p = subprocess.Popen(
            [sys.executable, __file__, "_agents", ",".join(farm.urls), mode],
            env={**os.environ, "BENCH_AGENTS": json.dumps(agents), "BENCH_BROKER_URL": farm.broker_url},
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,
        )
        log.close()
        out.append(p)
    for p in out:
        assert p.stdout is not None
        line = p.stdout.readline()
        if line.strip() != "READY":
            for q in out:
                stop_process(q)
            raise RuntimeError(f"agents did not start ({line!r}); see {tmp}/agents-{mode}-*.log")
    return out


def stop_agents(procs: list[subprocess.Popen[str]]) -> dict[str, float]:
    """SIGTERM the agent processes; returns their summed counts and their round trips
    (``claim_ms_p50``... the slowest process's, in ms, as the agents timed them)."""
    total: dict[str, float] = {"claimed": 0, "refused": 0, "errors": 0}
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            text, _ = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
        for line in reversed(text.splitlines()):
            if line.startswith("{"):
                for k, v in json.loads(line).items():
                    if "_ms_" in k:  # round trips: the slowest process's
                        total[k] = max(total.get(k, 0), v)
                    else:
                        total[k] = total.get(k, 0) + v
                break
    return total


async def submit_and_wait(farm: FarmServer, model_id: str, tasks: int, timeout_s: float) -> tuple[str, float]:
    """POST the job, wait until it finishes; returns (job id, seconds of the POST).

    Raises:
        TimeoutError: not finished within ``timeout_s``.
    """
    import aiohttp

    async with aiohttp.ClientSession(farm.url, headers=farm.auth) as http:
        t = time.perf_counter()
        async with http.post(
            "/api/jobs", json={"model_id": model_id, "frames": f"1-{tasks}", "chunk_size": 1}
        ) as r:
            body = await r.json()
            creation = time.perf_counter() - t
            assert r.status == 201, body
        job_id = body["id"]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            async with http.get(f"/api/jobs/{job_id}") as r:
                job = await r.json()
            if job["state"] in ("completed", "failed", "canceled"):
                return job_id, creation
        raise TimeoutError(f"job {job_id} not finished after {timeout_s:g} s: {job['tasks']}")


async def job_figures(database_url: str, job_id: str) -> dict[str, Any]:
    """Read the job's and its tasks' timestamps from the database and compute the figures."""
    from sqlalchemy import select

    from server.persistence import Database
    from server.persistence.tables import Job, Task

    db = Database(database_url)
    try:
        async with db.session() as s:
            job = await s.get(Job, job_id)
            assert job is not None
            rows = (
                await s.execute(
                    select(Task.dispatched_at, Task.started_at, Task.state).where(Task.job_id == job_id)
                )
            ).all()
    finally:
        await db.close()
    lat = [(st - d).total_seconds() for d, st, _ in rows if d is not None and st is not None]
    starts = [st for _, st, _ in rows if st is not None]
    created = job.created_at
    last = max(starts)
    wall = (job.finished_at - created).total_seconds() if job.finished_at else float("nan")
    return {
        "state": job.state,
        "tasks": len(rows),
        "dispatches_per_s": len(starts) / (last - created).total_seconds(),
        "latency_p50_ms": pct(lat, 50) * 1000,
        "latency_p99_ms": pct(lat, 99) * 1000,
        "first_start_ms": (min(starts) - created).total_seconds() * 1000,
        "wall_s": wall,
        "completions_per_s": len(rows) / wall,
    }


def run_job(farm: FarmServer, model_id: str, mode: str, args: argparse.Namespace, tmp: Path) -> JobRun:
    """Start the agents, submit one job, wait for it, stop the agents and compute the figures."""
    from urllib.parse import urlsplit

    agents = start_agents(farm, args.agents, args.agent_procs, mode, tmp)
    groups = {
        "server": [p.pid for p in farm.procs],
        "agents": [p.pid for p in agents],
        **service_pids(urlsplit(farm.cache_url).port or 6379),
    }
    job_id = None
    try:
        cpu0, busy0 = cpu_seconds(groups), machine_busy()
        job_id, creation = asyncio.run(submit_and_wait(farm, model_id, args.tasks, args.timeout))
        cpu1, busy1 = cpu_seconds(groups), machine_busy()
    finally:
        counts = stop_agents(agents)
        if job_id is not None:
            with contextlib.suppress(Exception):
                asyncio.run(forget_cache(farm, job_id))
    f = asyncio.run(job_figures(farm.database_url, job_id))
    return JobRun(
        mode=mode,
        tasks=f["tasks"],
        creation_s=creation,
        dispatches_per_s=f["dispatches_per_s"],
        latency_p50_ms=f["latency_p50_ms"],
        latency_p99_ms=f["latency_p99_ms"],
        first_start_ms=f["first_start_ms"],
        wall_s=f["wall_s"],
        completions_per_s=f["completions_per_s"],
        state=f["state"],
        agent_counts=counts,
        cpu_ms_per_task={k: (cpu1[k] - cpu0[k]) * 1000 / f["tasks"] for k in groups},
        machine_busy_pct=100 * (busy1[0] - busy0[0]) / max(1e-9, busy1[1] - busy0[1]),
    )


async def forget_cache(farm: FarmServer, job_id: str) -> None:
    """Delete the job's and its tasks' cache entries from Redis."""
    from sqlalchemy import select

    from server.persistence import Database
    from server.persistence.tables import Task

    db = Database(farm.database_url)
    try:
        async with db.session() as s:
            ids = (await s.scalars(select(Task.id).where(Task.job_id == job_id))).all()
    finally:
        await db.close()
    await asyncio.to_thread(delete_cache_keys, farm.cache_url, [f"task:{t}" for t in ids] + [f"job:{job_id}"])


def main() -> None:
    """Run the benchmark and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=10_000, help="frames of the job, chunk 1 (default 10000)")
    ap.add_argument("--agents", type=int, default=16, help="simulated agents (default 16)")
    ap.add_argument("--agent-procs", type=int, default=1, help="processes the agents run in (default 1)")
    ap.add_argument(
        "--servers", type=int, default=1, help="server processes, agents spread over them (default 1)"
    )
    ap.add_argument("--window", type=int, default=0, help="dispatch window (default 2 x agents)")
    ap.add_argument(
        "--mode",
        choices=("full", "claim", "both"),
        default="both",
        help="full: claim, upload a PNG, completed; claim: claim and result only; both (default)",
    )
    ap.add_argument("--repeat", type=int, default=1, help="jobs per mode, one after the other (default 1)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds a job may take (default 1800)")
    ap.add_argument("--redis", default=DEFAULT_REDIS, help=f"Redis URL (default {DEFAULT_REDIS})")
    args = ap.parse_args()
    why = services_missing(args.redis)
    if why:
        sys.exit(f"cannot run: {why}")
    window = args.window or 2 * args.agents
    modes = ["claim", "full"] if args.mode == "both" else [args.mode]
    sigterm_as_interrupt()
    runs: list[JobRun] = []
    env = {"RENDERFARM_DISPATCH_WINDOW": str(window), **NO_RETRIES}
    try:
        with tempfile.TemporaryDirectory(prefix="rfbench-") as d:
            tmp = Path(d)
            with farm_server(tmp, args.redis, env, servers=args.servers) as farm:
                model_id = asyncio.run(insert_model(farm.database_url))
                for _ in range(args.repeat):
                    for mode in modes:
                        r = run_job(farm, model_id, mode, args, tmp)
                        runs.append(r)
                        print(
                            f"job {len(runs)} ({mode}): created in {r.creation_s:.2f} s, "
                            f"{r.dispatches_per_s:.0f} dispatches/s, latency p50 {r.latency_p50_ms:.0f} ms "
                            f"p99 {r.latency_p99_ms:.0f} ms, first start {r.first_start_ms:.0f} ms, "
                            f"wall {r.wall_s:.1f} s, job {r.state}, agents {r.agent_counts}",
                            flush=True,
                        )
    except KeyboardInterrupt:
        sys.exit("interrupted; the servers, agents, database and vhost were removed")
    summary(args, window, modes, runs)


def summary(args: argparse.Namespace, window: int, modes: list[str], runs: list[JobRun]) -> None:
    """Print the block to paste into a note."""
    med = statistics.median
    print()
    print(f"=== dispatch benchmark: one {args.tasks}-task job (frames 1-{args.tasks}, chunk 1) per run ===")
    print(
        f"settings: {args.servers} renderfarm server process(es) (fresh MariaDB database, fresh "
        f"RabbitMQ vhost, Redis cache, local file:// storage), dispatch window {window}; "
        f"{args.agents} simulated agents (prefetch 1, ack after the result) in {args.agent_procs} "
        f"other process(es); {os.cpu_count()} CPUs shared by everything on the machine"
    )
    print(
        "definitions: dispatches/s = tasks / (last claim - job created); dispatch latency = "
        "claim (tasks.started_at) - tasks.dispatched_at per task (relay, broker, wait for a free "
        "agent, claim); first start = first claim - job created; all from the database's timestamps"
    )
    for mode in modes:
        rs = [r for r in runs if r.mode == mode]
        what = "claim + PNG upload + completed" if mode == "full" else "claim + result (failed, no upload)"
        print(f"  mode {mode} ({what}), {len(rs)} job(s), medians:")
        print(f"    job creation (POST /api/jobs): {med(r.creation_s for r in rs):7.2f} s   (target <= 1 s)")
        print(
            f"    dispatches/s:                  {med(r.dispatches_per_s for r in rs):7.0f}     "
            "(target >= 1000)"
        )
        print(
            f"    dispatch latency p50 / p99:    {med(r.latency_p50_ms for r in rs):7.0f} / "
            f"{med(r.latency_p99_ms for r in rs):.0f} ms   (target p50 <= 50 ms)"
        )
        print(f"    submit to first start:         {med(r.first_start_ms for r in rs):7.0f} ms")
        print(
            f"    job wall time:                 {med(r.wall_s for r in rs):7.1f} s   "
            f"({med(r.completions_per_s for r in rs):.0f} tasks finished/s)"
        )
        trips = ", ".join(
            f"{k} {med(r.agent_counts.get(f'{k}_ms_p50', 0) for r in rs):.0f}"
            for k in ("claim", "frame", "result")
            if any(f"{k}_ms_p50" in r.agent_counts for r in rs)
        )
        print(f"    agents' round trips, p50 ms:   {trips}")
        cpu = ", ".join(f"{k} {med(r.cpu_ms_per_task[k] for r in rs):.1f}" for k in rs[0].cpu_ms_per_task)
        print(f"    CPU ms per task:               {cpu}")
        print(f"    machine CPU busy:              {med(r.machine_busy_pct for r in rs):7.0f} %")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_agents":
        urls, mode = sys.argv[2:4]  # the agents' names and tokens and the broker URL: in the environment
        agents = [(name, token) for name, token in json.loads(os.environ["BENCH_AGENTS"])]
        asyncio.run(run_agents(urls.split(","), agents, os.environ["BENCH_BROKER_URL"], mode))
    else:
        main()
