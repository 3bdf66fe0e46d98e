"""Tests of node_agent.executor.docker.DockerExecutor against the real dockerd and the real
render image (``bash docker/build-images.sh``): renders, confinement, timeouts, out of
memory, agent death and leftovers.

Every test that needs Docker skips, saying why, when dockerd does not answer or the render
image is missing (``.ci/run`` starts dockerd and builds the images; pytest runs with ``-rs``,
so the reason is printed). No GPU is here: GPU device requests are checked only as the
arguments the executor gives Docker (the NVIDIA runtime is not exercised).
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.agent import parse_size
from node_agent.executor.base import BlenderRun
from node_agent.executor.docker import (
    CONTAINER_UID,
    DEFAULT_IMAGE,
    GUARD,
    OWNER_LABEL,
    DockerExecutor,
    ExecutorUnavailable,
    container_env,
    device_requests,
    parse_gpus,
)
from templates import template_path

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
MISSING = ["--image", "renderfarm/nonexistent:0", "--memory", "1g"]


def _docker_client():
    import docker

    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except Exception as exc:
        pytest.skip(
            f"Docker tests skipped: dockerd does not answer ({exc}); start it: ../shared/services.sh docker"
        )
    return client


@pytest.fixture(scope="module")
def docker_client():
    client = _docker_client()
    import docker.errors

    try:
        client.images.get(DEFAULT_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.skip(
            f"Docker tests skipped: image {DEFAULT_IMAGE} is missing; build it: bash docker/build-images.sh"
        )
    yield client
    client.close()


@pytest.fixture
def label(docker_client) -> dict[str, str]:
    """A label unique to the test; after it, no container of it may be left."""
    value = f"t{uuid.uuid4().hex[:12]}"
    yield {"test": value}
    left = docker_client.containers.list(all=True, filters={"label": f"renderfarm.test={value}"})
    for c in left:
        c.remove(force=True)
    assert not left, f"containers left behind: {[c.name for c in left]}"


def containers(docker_client, label: dict[str, str], running_only: bool = False) -> list:
    ((key, value),) = label.items()
    return docker_client.containers.list(all=not running_only, filters={"label": f"renderfarm.{key}={value}"})


def executor(**kw) -> DockerExecutor:
    kw.setdefault("memory_bytes", 1 << 30)
    kw.setdefault("cpus", 1.0)
    return DockerExecutor(**kw)


def folder(path: Path) -> Path:
    """A folder the container's user (uid 10001 when the agent is root) can read."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)
    return path


def script(tmp_path: Path, body: str, name: str = "script.py") -> Path:
    path = folder(tmp_path / "scripts") / name
    path.write_text(textwrap.dedent(body))
    path.chmod(0o644)
    return path


def make_run(tmp_path: Path, path: Path, label: dict[str, str], **kw) -> BlenderRun:
    kw.setdefault("timeout_s", 60.0)
    kw.setdefault("stall_timeout_s", 60.0)
    work = folder(tmp_path / "work")
    return BlenderRun(
        script=path,
        args=kw.pop("args", []),
        cwd=work,
        writable=kw.pop("writable", (work,)),
        labels=label,
        **kw,
    )


# --------------------------------------------------------------------------- render
@pytest.mark.blender
def test_renders_the_sample_scene_in_a_container(tmp_path, sample_blend, label, docker_client) -> None:
    inputs = folder(tmp_path / "in")
    blend = inputs / "scene.blend"
    blend.write_bytes(sample_blend.read_bytes())
    blend.chmod(0o644)
    work = folder(tmp_path / "work")
    out = folder(work / "out")
    params = {
        "blend_file": str(blend),
        "output_dir": str(out),
        "manifest_path": str(work / "manifest.json"),
        "frames": [1, 2],
        "resolution_percentage": 10,
        "samples": 1,
        "output_format": "PNG",
        "confine_root": str(inputs),
    }
    params_path = inputs / "params.json"
    params_path.write_text(json.dumps(params))
    params_path.chmod(0o644)
    lines: list[str] = []
    ex = executor(stage_dir=folder(tmp_path / "stage"))
    run = BlenderRun(
        script=template_path("render_task.py"),
        args=[str(params_path)],
        cwd=work,
        timeout_s=150,
        stall_timeout_s=60,
        read_only=(inputs,),
        writable=(work,),
        tmp_dir=folder(work / "tmp"),
        labels=label,
    )
    outcome = asyncio.run(ex.run(run, lines.append))
    assert outcome.ok, outcome.log_tail
    events = [json.loads(line.split(" ", 1)[1]) for line in lines if line.startswith("@@renderfarm ")]
    done = {e["frame"]: e["path"] for e in events if e["event"] == "frame_done"}
    assert sorted(done) == [1, 2]
    for path in done.values():
        data = Path(path).read_bytes()
        assert Path(path).parent == out and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((work / "manifest.json").read_text())["frames"].keys() == {"1", "2"}
    assert os.listdir(tmp_path / "stage") == [], "the staged script and guard are removed"
    assert containers(docker_client, label) == []


# --------------------------------------------------------------------------- confinement
CONFINEMENT = """
    import json, os, socket, sys
    inputs, out, port = sys.argv[1], sys.argv[2], int(sys.argv[3])

    def write(path):
        try:
            with open(path, "w") as f:
                f.write("x")
            return "written"
        except OSError as exc:
            return f"refused errno {exc.errno}"

    res = {
        "input": write(os.path.join(inputs, "evil.txt")),
        "root": write("/evil.txt"),
        "etc": write("/etc/evil"),
        "script_dir": write(os.path.join(os.path.dirname(os.path.abspath(__file__)), "evil.txt")),
        "out": write(os.path.join(out, "ok.txt")),
        "tmp": write("/tmp/ok.txt"),
        "uid": os.getuid(), "gid": os.getgid(), "euid": os.geteuid(),
        "env": dict(os.environ),
        "interfaces": sorted(os.listdir("/sys/class/net")),
        "status": dict(l.split(":", 1) for l in open("/proc/self/status")),
    }
    try:
        socket.create_connection(("127.0.0.1", port), timeout=3).close()
        res["connect"] = "connected"
    except OSError as exc:
        res["connect"] = f"failed: {exc}"
    print("RESULT " + json.dumps(res), flush=True)
"""


def test_confinement(tmp_path, label, docker_client, monkeypatch) -> None:
    secrets = {"RENDERFARM_TOKEN": "rf-secret-token-123", "AWS_SECRET_ACCESS_KEY": "aws-secret-456"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AGENT_ONLY_VARIABLE", "agent-only-789")
    inputs = folder(tmp_path / "in")
    (inputs / "scene.blend").write_text("not really")
    out = folder(tmp_path / "work" / "out")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    path = script(tmp_path, CONFINEMENT)
    run = make_run(
        tmp_path,
        path,
        label,
        args=[str(inputs), str(out), str(port)],
        read_only=(inputs,),
        writable=(out,),
        env={**secrets, "DB_PASSWORD": "pw", "RENDER_SETTING": "kept"},
    )
    lines: list[str] = []
    outcome = asyncio.run(executor().run(run, lines.append))
    assert outcome.ok, outcome.log_tail
    (result,) = [json.loads(line[7:]) for line in lines if line.startswith("RESULT ")]

    erofs = "refused errno 30"  # EROFS: read-only mount or root file system
    assert result["input"] == erofs and not (inputs / "evil.txt").exists()
    assert result["root"] == erofs and result["etc"] == erofs
    assert result["script_dir"].startswith("refused") and not (path.parent / "evil.txt").exists()
    assert result["out"] == "written" and (out / "ok.txt").read_text() == "x"
    assert result["tmp"] == "written"  # the container's private tmpfs
    expected_uid = CONTAINER_UID if os.getuid() == 0 else os.getuid()
    assert result["uid"] == result["euid"] == expected_uid != 0
    status = {k: v.strip() for k, v in result["status"].items()}
    assert status["CapEff"] == status["CapPrm"] == "0000000000000000"
    assert status["NoNewPrivs"] == "1"

    env = result["env"]
    assert env["RENDER_SETTING"] == "kept" and env["HOME"] == "/tmp"
    for name in (*secrets, "DB_PASSWORD", "AGENT_ONLY_VARIABLE"):
        assert name not in env, name
    blob = json.dumps(env)
    for value in (*secrets.values(), "agent-only-789", "pw"):
        assert value not in blob
    assert set(env) <= {
        "PATH",
        "HOME",
        "LANG",
        "HOSTNAME",
        "RENDER_SETTING",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONUNBUFFERED",
    }, env

    assert result["interfaces"] == ["lo"], "network none: loopback only"
    assert result["connect"].startswith("failed")
    with pytest.raises(BlockingIOError):
        listener.accept()  # nothing reached the host's listener
    listener.close()


def test_environment_and_labels_of_the_container() -> None:
    run = BlenderRun(
        script=Path("/s.py"),
        args=[],
        cwd=Path("/w"),
        timeout_s=1,
        stall_timeout_s=1,
        env={"OK": "1", "my_token": "x", "Api_Key": "y", "RENDERFARM_X": "z", "BAD=NAME": "v"},
        tmp_dir=Path("/w/tmp"),
    )
    assert container_env(run) == {"HOME": "/tmp", "LANG": "C.UTF-8", "OK": "1", "TMPDIR": "/w/tmp"}
    assert container_env(run, "all")["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility,graphics"


def test_container_spec(tmp_path, docker_client) -> None:
    ex = executor(pids=100, tmp_bytes=64 * MiB, labels={"agent": "node-1"})
    inputs, work = folder(tmp_path / "in"), folder(tmp_path / "work")
    run = BlenderRun(
        script=template_path("render_task.py"),
        args=["/p.json"],
        cwd=work,
        timeout_s=1,
        stall_timeout_s=1,
        read_only=(inputs,),
        writable=(work / "out",),
        tmp_dir=tmp_path / "elsewhere",
        labels={"task": "7", "Job ID": "j"},
    )
    assert (ex.info.mode, ex.info.version) == ("module", "5.0.1")  # from the image's labels
    spec = ex.container_spec(run)
    create, host = spec["create"], spec["host_config"]
    assert host["network_mode"] == "none" and create["network_disabled"] is True
    assert host["read_only"] is True and host["cap_drop"] == ["ALL"]
    assert host["security_opt"] == ["no-new-privileges"] and host["init"] is True
    assert host["mem_limit"] == host["memswap_limit"] == 1 << 30
    assert host["nano_cpus"] == 1_000_000_000 and host["pids_limit"] == 100
    assert host["tmpfs"] == {"/tmp": f"rw,nosuid,nodev,size={64 * MiB},mode=1777"}
    assert host["device_requests"] == []
    mounts = {m["Target"]: (m["Source"], m["ReadOnly"]) for m in host["mounts"]}
    assert mounts == {
        str(template_path("render_task.py")): (str(template_path("render_task.py")), True),
        str(GUARD): (str(GUARD), True),
        str(inputs): (str(inputs), True),
        str(work / "out"): (str(work / "out"), False),
        str(tmp_path / "elsewhere"): (str(tmp_path / "elsewhere"), False),
    }
    assert create["working_dir"] == "/tmp"  # the cwd is not mounted
    assert create["labels"] == {
        OWNER_LABEL: "docker",
        "renderfarm.agent": "node-1",
        "renderfarm.task": "7",
        "renderfarm.job-id": "j",
    }
    assert create["command"][:4] == ["/usr/bin/python3", "-I", str(GUARD), "--"]
    assert create["command"][4:] == [
        "/opt/bpy/bin/python",
        "-I",
        str(template_path("render_task.py")),
        "/p.json",
    ]
    assert create["user"] == (
        f"{CONTAINER_UID}:{CONTAINER_UID}" if os.getuid() == 0 else f"{os.getuid()}:{os.getgid()}"
    )
    # the SDK turns stdin_open (not detached) into StdinOnce: Docker closes stdin with the agent
    config = ex.client.api.create_container_config(**create)
    assert config["OpenStdin"] is True and config["StdinOnce"] is True
    ex.close()


# --------------------------------------------------------------------------- GPUs (no GPU here)
def test_gpu_device_requests_without_a_gpu() -> None:
    """No NVIDIA GPU on this machine: only the device requests given to Docker are checked,
    as the NVIDIA Container Toolkit reads them (``docker run --gpus`` sends the same)."""
    import docker

    assert parse_gpus(None) is None and parse_gpus("none") is None and parse_gpus("") is None
    assert parse_gpus("all") == "all" and parse_gpus("ALL") == "all"
    assert parse_gpus("0,1") == ["0", "1"] and parse_gpus(" GPU-8f3a-11 ") == ["GPU-8f3a-11"]
    for bad in ("0,,1", "0;rm", "a b"):
        with pytest.raises(ValueError):
            parse_gpus(bad)
    assert device_requests(None) == []
    api = docker.APIClient(version="1.41")  # builds the JSON only; no daemon is contacted
    (all_gpus,) = api.create_host_config(device_requests=device_requests("all"))["DeviceRequests"]
    assert all_gpus == {"Driver": "", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}
    (some,) = api.create_host_config(device_requests=device_requests(["0", "2"]))["DeviceRequests"]
    assert some["DeviceIDs"] == ["0", "2"] and some["Capabilities"] == [["gpu"]] and some["Count"] == 0
    with pytest.raises(ValueError):
        device_requests([])


def test_gpu_executor_spec(docker_client) -> None:
    """The executor's container for ``gpus="all"`` (no GPU here: not started)."""
    ex = executor(gpus="all")
    run = BlenderRun(script=GUARD, args=[], cwd=Path("/"), timeout_s=1, stall_timeout_s=1)
    spec = ex.container_spec(run)
    (request,) = spec["host_config"]["device_requests"]
    assert request["Count"] == -1 and request["Capabilities"] == [["gpu"]]
    assert spec["create"]["environment"]["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility,graphics"
    ex.close()


# --------------------------------------------------------------------------- ends of a run
def test_exit_codes(tmp_path, label, docker_client) -> None:
    ex = executor()
    code3 = script(tmp_path, "import sys; print('bye'); sys.exit(3)\n", "code3.py")
    outcome = asyncio.run(ex.run(make_run(tmp_path, code3, label), lambda _: None))
    assert (outcome.reason, outcome.exit_code, outcome.log_tail, outcome.oom_killed) == (
        "exited",
        3,
        ["bye"],
        False,
    )
    killed = script(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)\n", "kill.py")
    outcome = asyncio.run(ex.run(make_run(tmp_path, killed, label), lambda _: None))
    assert (outcome.reason, outcome.exit_code, outcome.ok) == ("exited", -9, False)
    assert containers(docker_client, label) == []


SLEEPER = """
    import sys, time
    print("started", flush=True)
    if sys.argv[1:] == ["chatty"]:
        while True:
            print("working", flush=True)
            time.sleep(0.3)
    time.sleep(600)
"""


def test_stall_timeout_and_cancel(tmp_path, label, docker_client) -> None:
    ex = executor()
    path = script(tmp_path, SLEEPER)

    async def go(run: BlenderRun, cancel_after: float | None = None):
        cancel = asyncio.Event()
        if cancel_after is not None:
            asyncio.get_running_loop().call_later(cancel_after, cancel.set)
        started = time.monotonic()
        lines: list[str] = []
        outcome = await ex.run(run, lines.append, cancel=cancel)
        return outcome, time.monotonic() - started, lines

    stalled, took, lines = asyncio.run(go(make_run(tmp_path, path, label, stall_timeout_s=3.0)))
    assert (stalled.reason, stalled.exit_code, stalled.ok) == ("stalled", None, False)
    assert lines == ["started"] and 3.0 <= took < 12
    assert containers(docker_client, label) == []

    timed, took, lines = asyncio.run(
        go(make_run(tmp_path, path, label, args=["chatty"], timeout_s=4.0, stall_timeout_s=2.0))
    )
    assert (timed.reason, timed.exit_code) == ("timeout", None)
    assert lines.count("working") >= 5 and 4.0 <= took < 12
    assert containers(docker_client, label) == []

    canceled, took, _ = asyncio.run(go(make_run(tmp_path, path, label, args=["chatty"]), cancel_after=2.0))
    assert (canceled.reason, canceled.exit_code) == ("canceled", None)
    assert took < 2.0 + 5.0, "a cancel stops the run within 5 s"
    assert containers(docker_client, label) == []


def test_cancelling_the_awaiting_task_removes_the_container(tmp_path, label, docker_client) -> None:
    ex = executor()
    path = script(tmp_path, SLEEPER)

    async def go() -> None:
        seen = asyncio.Event()
        task = asyncio.create_task(ex.run(make_run(tmp_path, path, label), lambda _: seen.set()))
        await asyncio.wait_for(seen.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert containers(docker_client, label) == []


def test_out_of_memory_is_reported(tmp_path, label, docker_client) -> None:
    ex = executor(memory_bytes=128 * MiB)
    hog = script(
        tmp_path,
        """
        blocks = []
        for i in range(64):  # up to 1 GiB, well past the 128 MiB limit
            blocks.append(bytearray(16 << 20))
            print("allocated", (i + 1) * 16, "MiB", flush=True)
        print("not killed", flush=True)
        """,
    )
    outcome = asyncio.run(ex.run(make_run(tmp_path, hog, label), lambda _: None))
    assert outcome.oom_killed is True and not outcome.ok
    assert outcome.exit_code == -9 and "not killed" not in outcome.log_tail
    assert containers(docker_client, label) == []


# --------------------------------------------------------------------------- agent death
AGENT = """
import asyncio, sys
from pathlib import Path
from node_agent.executor.base import BlenderRun
from node_agent.executor.docker import DockerExecutor

async def main():
    ex = DockerExecutor(memory_bytes=1 << 30, cpus=1.0)
    run = BlenderRun(script=Path(sys.argv[1]), args=[], cwd=Path(sys.argv[2]), timeout_s=600,
                     stall_timeout_s=600, writable=(Path(sys.argv[2]),), labels={"test": sys.argv[3]})
    def on_line(line):
        print("LINE", line, flush=True)
    await ex.run(run, on_line)

asyncio.run(main())
"""


def test_a_killed_agent_leaves_no_render_running(tmp_path, label, docker_client) -> None:
    path = script(tmp_path, SLEEPER)
    work = folder(tmp_path / "work")
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT, str(path), str(work), label["test"]],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert agent.stdout is not None
        ready, _, _ = select.select([agent.stdout], [], [], 60)
        assert ready, "the agent process did not start its render within 60 s"
        assert agent.stdout.readline().strip() == "LINE started"
        assert len(containers(docker_client, label, running_only=True)) == 1
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        killed = time.monotonic()
        while containers(docker_client, label, running_only=True):
            assert time.monotonic() - killed < 10, "the container still runs 10 s after the agent died"
            time.sleep(0.25)
        left = containers(docker_client, label)
        assert len(left) == 1 and left[0].status == "exited"  # stopped, not removed: no agent to do it
        assert b"standard input closed (the agent is gone)" in left[0].logs()  # the guard stopped it
        removed = asyncio.run(executor(labels=label).reap_orphans(label))
        assert removed == [left[0].id]
        assert containers(docker_client, label) == []
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()


def test_reap_orphans_takes_only_matching_containers(tmp_path, label, docker_client) -> None:
    mine = docker_client.containers.create(
        DEFAULT_IMAGE,
        ["true"],
        labels={OWNER_LABEL: "docker", "renderfarm.test": label["test"], "renderfarm.agent": "a"},
    )
    other_agent = docker_client.containers.create(
        DEFAULT_IMAGE,
        ["true"],
        labels={OWNER_LABEL: "docker", "renderfarm.test": label["test"], "renderfarm.agent": "b"},
    )
    not_ours = docker_client.containers.create(
        DEFAULT_IMAGE, ["true"], labels={"renderfarm.test": label["test"]}
    )
    try:
        removed = asyncio.run(executor().reap_orphans({**label, "agent": "a"}))
        assert removed == [mine.id]
        assert {c.id for c in containers(docker_client, label)} == {other_agent.id, not_ours.id}
    finally:
        for c in (mine, other_agent, not_ours):
            try:
                c.remove(force=True)
            except Exception:
                pass


# --------------------------------------------------------------------------- unavailable, CLI
def test_a_missing_image_is_named_with_how_to_build_it(docker_client) -> None:
    with pytest.raises(ExecutorUnavailable, match=r"renderfarm/nonexistent:0.*build-images\.sh"):
        DockerExecutor(image="renderfarm/nonexistent:0")


def test_an_unreachable_daemon_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ExecutorUnavailable, match="Docker does not answer"):
        DockerExecutor(base_url=f"unix://{tmp_path}/no.sock")


def test_cli_agent_executor_options(tmp_path) -> None:
    from cli.main import main

    def agent(*args: str):
        return CliRunner().invoke(
            main, ["agent", "--server", "http://127.0.0.1:9", "--token", "t", *args], catch_exceptions=False
        )

    for args, message in [
        (["--executor", "podman"], "'podman' is not one of"),
        (["--executor", "docker", "--memory", "8x"], "not a size"),
        (["--executor", "docker", "--memory", "1k"], "minimum of 6 MiB"),
        (["--executor", "docker", "--cpus", "0"], "--cpus"),
        (["--executor", "docker", "--pids", "2"], "--pids"),
        (["--executor", "docker", "--gpus", "0,,1"], "bad GPU id"),
        (["--image", "x"], "--image applies only to --executor docker"),
        (["--image", "x", "--memory", "1g"], "--image, --memory apply only to --executor docker"),
        (["--executor", "docker", "--blender", "/b"], "--blender applies only to --executor local"),
    ]:
        result = agent(*args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)


def test_cli_agent_with_a_missing_image_exits_naming_it(docker_client) -> None:
    from cli.main import main

    result = CliRunner().invoke(
        main,
        ["agent", "--server", "http://127.0.0.1:9", "--token", "t", "--executor", "docker", *MISSING],
        catch_exceptions=False,
    )
    assert result.exit_code != 0
    assert "renderfarm/nonexistent:0" in result.output and "build-images.sh" in result.output


def test_parse_size() -> None:
    assert parse_size("8g") == 8 << 30 and parse_size("512M") == 512 << 20 and parse_size("1.5GiB") == 3 << 29
    assert parse_size("1048576") == 1 << 20 and parse_size("2 kb") == 2048
    for bad in ("", "g", "-1g", "8x", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)
