"""Status reads: ``GET /api/tasks/{id}/status`` of a production farm against a bare Redis GET handler.

Usage::

    .venv/bin/python benchmarks/status_api.py [--rounds 5] [--duration 8] [--connections 200]

Needs MariaDB, RabbitMQ and Redis (``RENDERFARM_TEST_MYSQL_URL``, default
``mysql://root@127.0.0.1:3306``; RabbitMQ's ``rabbitmqctl`` on PATH with guest/guest on
127.0.0.1:5672; Redis on ``--redis``, default ``redis://127.0.0.1:6379/0``).

Two servers run on this machine, each in its own process:

* **farm**: ``renderfarm server`` on a fresh MariaDB database and a fresh RabbitMQ vhost,
  with Redis as its status cache and a local ``file://`` storage folder. One finished job
  of ``--tasks`` tasks is written straight into its database (a model row, a job row and
  the task rows, through the ORM; no Blender involved), then each task's status is read
  once so that the cache holds it.
* **bare**: a ten-line aiohttp app whose only route does ``GET task:<id>`` on the same
  Redis and returns the bytes (what the farm's route does once permission and error
  handling are done): the floor any Python server could reach.

Every request carries ``Authorization: Bearer <token>``, a valid personal token of the
farm's first admin (the benchmark logs in with the generated password and makes one),
to both servers alike; the bare one ignores it. The farm, per request, since accounts
and per-project roles: hashes the token (sha256) and finds the principal it resolved
before in an in-process cache (the token's database rows are read again only after 30 s
or a change of access; the access epoch that says so is read from Redis at most once a
second), finds the task's project in an in-process map (read from MariaDB once per task:
a task never changes project), checks the role, then does the Redis ``GET task:<id>``.
GETs are not audited. So after warm-up the farm does one Redis round trip per status read,
as the bare server does, plus its Python work: the ratio measures that work.

The load generator is ``wrk`` (Debian: ``apt-get install wrk``; it must be installed by
the user), each request picking a random task among the job's; without ``wrk`` an aiohttp
client in a separate process stands in (it competes with the server for the CPUs, so
its figures are lower; the output says which one ran). Rounds alternate farm, bare so
that drift of the shared machine hits both alike; the summary gives medians and the
median of per-round ratios farm/bare (target >= 0.8 for requests per second).

Everything made for the run is removed afterwards (database, vhost, the cache keys,
processes), also after Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RENDERFARM = str(Path(sys.executable).with_name("renderfarm"))
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


# ----------------------------------------------------------------------------- shared helpers


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sigterm_as_interrupt() -> None:
    """Make SIGTERM raise KeyboardInterrupt, so that ``finally`` blocks clean up as on Ctrl-C."""

    def handler(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 15.0) -> None:
    """SIGTERM ``proc`` (the process this script started), then SIGKILL it after ``timeout`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def wait_http(url: str, proc: subprocess.Popen[Any], log: Path | None, timeout: float = 60.0) -> None:
    """Poll ``url`` until it answers 200.

    Raises:
        RuntimeError: the process exited or the URL did not answer within ``timeout`` seconds
            (with the last lines of ``log``).
    """
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{url} did not come up (exit code {proc.poll()}):\n{tail}")


@dataclass
class FarmServer:
    """``renderfarm server`` processes on production backends, made by :func:`farm_server`.

    Attributes:
        urls: each process's ``http://127.0.0.1:<port>``.
        database_url: their MariaDB database (``mysql+aiomysql://...``).
        broker_url: their RabbitMQ vhost (``amqp://...``).
        cache_url: their Redis.
        storage_url: their local storage folder (``file://...``), shared.
        token: a personal token of the farm's first admin (for the benchmark's user calls).
        data_dir: the first server's data folder (holds the generated admin password).
        procs: the processes.
        logs: the files their output goes to.
    """

    urls: list[str]
    database_url: str
    broker_url: str
    cache_url: str
    storage_url: str
    token: str = field(repr=False)
    data_dir: Path
    procs: list[subprocess.Popen[bytes]]
    logs: list[Path]

    @property
    def url(self) -> str:
        """The first server's URL (jobs are submitted there)."""
        return self.urls[0]

    @property
    def auth(self) -> dict[str, str]:
        """The ``Authorization`` header of the admin's token."""
        return {"Authorization": f"Bearer {self.token}"}

    def agent_token(self, agent_name: str) -> str:
        """A new agent token bound to ``agent_name`` (``POST /api/agent-tokens`` as the admin).

        Raises:
            urllib.error.HTTPError: the server refused it (e.g. a bad agent name).
        """
        from tests.production import agent_token

        return agent_token(self.url, self.token, agent_name)


def services_missing(redis_url: str) -> str | None:
    """Why the production services cannot be used, or None when MariaDB, RabbitMQ and Redis answer."""
    from urllib.parse import urlsplit

    from tests.mariadb import unreachable_reason

    why = unreachable_reason()
    if why:
        return why
    if shutil.which("rabbitmqctl") is None:
        return "rabbitmqctl is not on PATH (needed to make a fresh RabbitMQ vhost)"
    r = urlsplit(redis_url)
    for name, host, port in (("RabbitMQ", "127.0.0.1", 5672), ("Redis", r.hostname, r.port or 6379)):
        with socket.socket() as s:
            s.settimeout(2)
            if s.connect_ex((host or "127.0.0.1", port)) != 0:
                return f"{name} is not answering on {host}:{port}"
    return None


@contextlib.contextmanager
def farm_server(
    tmp: Path, redis_url: str, env: dict[str, str] | None = None, servers: int = 1
) -> Iterator[FarmServer]:
    """Run ``servers`` ``renderfarm server`` processes on a fresh MariaDB database, a fresh
    RabbitMQ vhost, Redis and one local storage folder under ``tmp`` (one of them runs the
    scheduler), sharing one JWT key; log in as the first admin and make a personal token;
    stop them and drop the database and the vhost afterwards.

    Args:
        env: more environment variables for the servers (``RENDERFARM_DISPATCH_WINDOW``...).

    Raises:
        RuntimeError: a server did not come up (with its log's tail).
    """
    from tests.mariadb import fresh_database
    from tests.production import admin_token, fresh_vhost

    with fresh_database("rfbench") as db_url, fresh_vhost() as amqp_url:
        storage = (tmp / "storage").resolve()
        storage.mkdir(parents=True, exist_ok=True)
        penv = dict(os.environ)
        penv.update(
            {
                "RENDERFARM_DATABASE_URL": db_url,
                "RENDERFARM_BROKER_URL": amqp_url,
                "RENDERFARM_CACHE_URL": redis_url,
                "RENDERFARM_STORAGE_URL": storage.as_uri(),
                "RENDERFARM_JWT_KEYS": "bench:" + secrets.token_urlsafe(32),  # the same on every server
                "RENDERFARM_SIGNING_KEY": secrets.token_urlsafe(24),
            }
        )
        penv.update(env or {})
        procs: list[subprocess.Popen[bytes]] = []
        try:
            urls, logs = [], []
            for i in range(servers):
                port = free_port()
                log = tmp / f"server-{i}.log"
                argv = [RENDERFARM, "server", "--host", "127.0.0.1", "--port", str(port)]
                argv += ["--data-dir", str(tmp / f"farm-{i}")]
                with open(log, "wb") as out:
                    procs.append(
                        subprocess.Popen(
                            argv,
                            env=penv,
                            stdout=out,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,  # Ctrl-C reaches this script, which stops them
                        )
                    )
                urls.append(f"http://127.0.0.1:{port}")
                logs.append(log)
                wait_http(f"{urls[-1]}/healthz", procs[-1], log)  # one at a time: migrations
            data_dir = tmp / "farm-0"  # the first server made the first admin
            token = admin_token(urls[0], data_dir, "benchmark")
            yield FarmServer(
                urls, db_url, amqp_url, redis_url, storage.as_uri(), token, data_dir, procs, logs
            )
        finally:
            for proc in procs:
                stop_process(proc)


async def insert_model(database_url: str) -> str:
    """Write a model row straight into the farm's database (no file behind it), in project
    ``default`` (made with the first admin); returns its id.

    Its metadata names no scene, so jobs on it render "the file's own settings"; nothing
    reads the file in these benchmarks (simulated agents never download it).
    """
    from sqlalchemy import select

    from server.persistence import Database
    from server.persistence.tables import Model, Project, new_id

    db = Database(database_url)
    try:
        async with db.session() as s:
            project_id = await s.scalar(select(Project.id).where(Project.name == "default"))
            model = Model(
                project_id=project_id,
                id=new_id(),
                filename="bench.blend",
                kind="blend",
                main="bench.blend",
                sha256="0" * 64,
                size_bytes=0,
                storage_key="models/bench.blend",
                info={},
            )
            s.add(model)
            await s.commit()
            return model.id
    finally:
        await db.close()


def delete_cache_keys(redis_url: str, keys: list[str]) -> None:
    """Delete ``keys`` from Redis (what the farm cached for this run)."""
    import redis

    r = redis.Redis.from_url(redis_url)
    try:
        for i in range(0, len(keys), 1000):
            r.delete(*keys[i : i + 1000])
    finally:
        r.close()


def pct(values: list[float], p: float) -> float:
    """The ``p``-th percentile (0-100) of ``values``, nearest rank."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))
    return s[k]


# ----------------------------------------------------------------------------- the bare server

BARE_SERVER = """
import sys
from aiohttp import web
import redis.asyncio as aioredis

port, url = int(sys.argv[1]), sys.argv[2]
# the same pool as the farm's RedisCache: 128 connections, callers wait for a free one
r = aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(url, max_connections=128, timeout=None))

async def status(request):
    raw = await r.get("task:" + request.match_info["task_id"])
    if raw is None:
        return web.json_response({"error": "not found"}, status=404)
    return web.Response(body=raw, content_type="application/json")

async def health(request):
    return web.Response(text="ok")

app = web.Application()
app.router.add_get("/api/tasks/{task_id}/status", status)
app.router.add_get("/healthz", health)
web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)
"""


@contextlib.contextmanager
def bare_server(tmp: Path, redis_url: str) -> Iterator[str]:
    """The bare aiohttp + Redis GET server in its own process; yields its URL."""
    script = tmp / "bare_server.py"
    script.write_text(BARE_SERVER)
    port = free_port()
    log = tmp / "bare.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(port), redis_url],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz", proc, log)
        yield url
    finally:
        stop_process(proc)


# ----------------------------------------------------------------------------- load generators


@dataclass
class Load:
    """One load run's figures: requests per second, latency percentiles (ms), errors."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


WRK_SCRIPT = """
wrk.headers["Authorization"] = "Bearer %s"
local ids = {%s}
local n = #ids
local threads = 0
setup = function(thread)
  threads = threads + 1
  thread:set("seed", threads)
end
init = function(args)
  math.randomseed(os.time() * 100 + (seed or 0))
end
request = function()
  return wrk.format("GET", "/api/tasks/" .. ids[math.random(n)] .. "/status")
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %%d %%d %%d %%d %%d\\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def run_wrk(url: str, lua: Path, connections: int, threads: int, duration: float) -> Load:
    """Run wrk against ``url`` with the script ``lua``.

    Raises:
        RuntimeError: wrk failed or printed no result line.
    """
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{duration:g}s",
            "--timeout",
            "10s",
            "-s",
            str(lua),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=duration + 60,
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-2000:]} {out.stderr[-2000:]}")
    reqs, dur_us, errors, p50, p99 = (int(x) for x in line.split()[1:])
    return Load(reqs / (dur_us / 1e6), p50 / 1000, p99 / 1000, reqs, errors)


async def _py_load(url: str, ids: list[str], connections: int, duration: float, token: str) -> dict[str, Any]:
    import random

    import aiohttp

    lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + duration
    conn = aiohttp.TCPConnector(limit=connections)
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(connector=conn, headers=headers) as http:

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < stop:
                t = time.perf_counter()
                try:
                    async with http.get(f"{url}/api/tasks/{random.choice(ids)}/status") as r:
                        await r.read()
                        if r.status != 200:
                            errors += 1
                except aiohttp.ClientError:
                    errors += 1
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        took = time.perf_counter() - t0
    return {
        "rps": len(lat) / took,
        "p50_ms": pct(lat, 50) * 1000,
        "p99_ms": pct(lat, 99) * 1000,
        "requests": len(lat),
        "errors": errors,
    }


def run_python_load(url: str, ids_file: Path, connections: int, duration: float, token: str) -> Load:
    """The aiohttp-client load generator, in a separate process, sending ``token`` on every request.

    Raises:
        RuntimeError: it failed.
    """
    out = subprocess.run(
        [sys.executable, __file__, "_load", url, str(ids_file), str(connections), str(duration)],
        capture_output=True,
        text=True,
        timeout=duration + 120,
        env={**os.environ, "BENCH_TOKEN": token},  # not on the command line, where ps shows it
    )
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr[-2000:]}")
    return Load(**json.loads(out.stdout.strip().splitlines()[-1]))


# ----------------------------------------------------------------------------- the farm side


async def prepare_job(farm: FarmServer, tasks: int) -> tuple[str, list[str]]:
    """Write a finished job of ``tasks`` one-frame tasks into the farm's database and read each
    task's status once through the API (which caches it). Returns (job id, task ids)."""
    import aiohttp
    from sqlalchemy import insert

    from server.persistence import Database
    from server.persistence.tables import Job, Model, Task, new_id, utcnow

    model_id = await insert_model(farm.database_url)
    db = Database(farm.database_url)
    job_id = new_id()
    ids = [new_id() for _ in range(tasks)]
    now = utcnow()
    try:
        async with db.session() as s:
            model = await s.get(Model, model_id)
            assert model is not None
            s.add(
                Job(
                    id=job_id,
                    model_id=model_id,
                    project_id=model.project_id,
                    name="status benchmark",
                    state="completed",
                    frames_spec=f"1-{tasks}",
                    frame_count=tasks,
                    chunk_size=1,
                    overrides={"output_format": "PNG"},
                    finished_at=now,
                )
            )
            await s.flush()
            await s.execute(
                insert(Task),
                [
                    {
                        "id": tid,
                        "job_id": job_id,
                        "index": i,
                        "frames": [i + 1],
                        "state": "completed",
                        "attempts": 1,
                        "agent": "bench-agent",
                        "started_at": now,
                        "finished_at": now,
                        "render_seconds": 1.0,
                    }
                    for i, tid in enumerate(ids)
                ],
            )
            await s.commit()
    finally:
        await db.close()
    sem = asyncio.Semaphore(16)
    async with aiohttp.ClientSession(headers=farm.auth) as http:

        async def warm(tid: str) -> None:
            async with sem, http.get(f"{farm.url}/api/tasks/{tid}/status") as r:
                body = await r.json()
                assert r.status == 200 and body["id"] == tid, (r.status, body)

        await asyncio.gather(*(warm(t) for t in ids))
    return job_id, ids


def check_same_bytes(farm_url: str, bare_url: str, task_id: str, token: str) -> int:
    """Both servers answer the same bytes for ``task_id`` (the bare one reads what the farm
    cached), both asked with the token the load sends; the farm refuses the request without it.

    Returns:
        The body's size in bytes.

    Raises:
        AssertionError: they differ, or the farm answered without a token.
    """
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{farm_url}/api/tasks/{task_id}/status").close()
        raise AssertionError("the farm answered a status read without a token")
    except urllib.error.HTTPError as exc:
        assert exc.code == 401, exc.code
    headers = {"Authorization": f"Bearer {token}"}
    with urllib.request.urlopen(
        urllib.request.Request(f"{farm_url}/api/tasks/{task_id}/status", headers=headers)
    ) as a:
        fa = a.read()
    with urllib.request.urlopen(
        urllib.request.Request(f"{bare_url}/api/tasks/{task_id}/status", headers=headers)
    ) as b:
        fb = b.read()
    assert fa == fb, (fa, fb)
    return len(fa)


def main() -> None:
    """Run the benchmark and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="farm/bare pairs of runs (default 5)")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per run (default 8)")
    ap.add_argument("--connections", type=int, default=200, help="concurrent connections (default 200)")
    ap.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    ap.add_argument("--tasks", type=int, default=1000, help="tasks in the job, ids requested at random")
    ap.add_argument("--redis", default=DEFAULT_REDIS, help=f"Redis URL (default {DEFAULT_REDIS})")
    ap.add_argument(
        "--python-load",
        action="store_true",
        help="use the aiohttp-client load generator even when wrk is installed",
    )
    args = ap.parse_args()
    why = services_missing(args.redis)
    if why:
        sys.exit(f"cannot run: {why}")
    use_wrk = shutil.which("wrk") is not None and not args.python_load
    if not use_wrk and not args.python_load:
        print(
            "wrk is not installed (Debian: apt-get install wrk); using the aiohttp-client "
            "load generator, which competes with the servers for the CPUs",
            flush=True,
        )
    sigterm_as_interrupt()
    farm_runs: list[Load] = []
    bare_runs: list[Load] = []
    keys: list[str] = []
    redis_url = args.redis
    with tempfile.TemporaryDirectory(prefix="rfbench-") as d:
        tmp = Path(d)
        try:
            with farm_server(tmp, redis_url) as farm, bare_server(tmp, redis_url) as bare:
                job_id, ids = asyncio.run(prepare_job(farm, args.tasks))
                keys = [f"task:{t}" for t in ids] + [f"job:{job_id}"]
                size = check_same_bytes(farm.url, bare, ids[0], farm.token)
                lua = tmp / "status.lua"
                lua.write_text(WRK_SCRIPT % (farm.token, ", ".join(f'"{t}"' for t in ids)))
                ids_file = tmp / "ids.json"
                ids_file.write_text(json.dumps(ids))

                def load(url: str, duration: float) -> Load:
                    if use_wrk:
                        return run_wrk(url, lua, args.connections, args.threads, duration)
                    return run_python_load(url, ids_file, args.connections, duration, farm.token)

                load(farm.url, 2)  # warm-up: connections, code paths
                load(bare, 2)
                for i in range(args.rounds):
                    farm_runs.append(load(farm.url, args.duration))
                    bare_runs.append(load(bare, args.duration))
                    f, b = farm_runs[-1], bare_runs[-1]
                    print(
                        f"round {i + 1}: farm {f.rps:8.0f} req/s p99 {f.p99_ms:6.1f} ms ({f.errors} errors)  "
                        f"bare {b.rps:8.0f} req/s p99 {b.p99_ms:6.1f} ms ({b.errors} errors)  "
                        f"ratio {f.rps / b.rps:.3f}",
                        flush=True,
                    )
        except KeyboardInterrupt:
            sys.exit("interrupted; the servers, database, vhost and cache keys were removed")
        finally:
            if keys:
                with contextlib.suppress(Exception):
                    delete_cache_keys(redis_url, keys)
    ratios = [f.rps / b.rps for f, b in zip(farm_runs, bare_runs, strict=True)]
    p99_ratios = [f.p99_ms / b.p99_ms for f, b in zip(farm_runs, bare_runs, strict=True)]
    med = statistics.median
    errors = sum(r.errors for r in farm_runs + bare_runs)
    generator = f"wrk, {args.threads} threads" if use_wrk else "aiohttp client (separate process)"
    print()
    print("=== status API benchmark: GET /api/tasks/{id}/status ===")
    print(
        f"load generator: {generator}, "
        f"{args.connections} connections, {args.rounds} rounds x {args.duration:g} s per server, "
        f"alternating farm/bare; {args.tasks} task ids at random; body {size} bytes; "
        f"{os.cpu_count()} CPUs shared by servers, Redis and the load generator"
    )
    print(
        "farm: renderfarm server (MariaDB, RabbitMQ vhost, Redis cache) in its own process, every "
        "request authenticated (personal token) and checked against its task's project; "
        "bare: aiohttp handler doing one Redis GET, in its own process (same requests, token ignored)"
    )
    print(
        f"  farm: {med(f.rps for f in farm_runs):8.0f} req/s   p50 {med(f.p50_ms for f in farm_runs):6.1f} ms"
        f"   p99 {med(f.p99_ms for f in farm_runs):6.1f} ms   (medians)"
    )
    print(
        f"  bare: {med(b.rps for b in bare_runs):8.0f} req/s   p50 {med(b.p50_ms for b in bare_runs):6.1f} ms"
        f"   p99 {med(b.p99_ms for b in bare_runs):6.1f} ms   (medians)"
    )
    print(
        f"  ratio farm/bare req/s: {med(ratios):.3f} (median of per-round ratios; target >= 0.8; "
        f"per round: {', '.join(f'{r:.2f}' for r in ratios)})"
    )
    print(f"  ratio farm/bare p99:   {med(p99_ratios):.3f}")
    print(f"  errors (non-2xx, timeouts, socket errors): {errors}")


def _load_main(argv: list[str]) -> None:
    url, ids_file, connections, duration = argv
    ids = json.loads(Path(ids_file).read_text())
    token = os.environ["BENCH_TOKEN"]
    print(json.dumps(asyncio.run(_py_load(url, ids, int(connections), float(duration), token))))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_load":
        _load_main(sys.argv[2:])
    else:
        main()
