"""Tests of node_agent.executor.LocalExecutor with real subprocesses (and real Blender)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from node_agent.executor import (
    LOG_TAIL_LINES,
    BlenderNotFound,
    BlenderRun,
    LocalExecutor,
    RunOutcome,
    minimal_env,
)
from node_agent.logparse import MAX_LINE_BYTES, TRUNCATED_MARK, parse_line
from templates import template_path


def write_script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def make_run(tmp_path: Path, script: Path, *, args=(), timeout_s=60.0, stall_timeout_s=60.0, env=None):
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    return BlenderRun(
        script=script, args=list(args), cwd=cwd, timeout_s=timeout_s, stall_timeout_s=stall_timeout_s, env=env
    )


def process_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a killed process whose new parent,
    the container's PID 1, may reap it late: it no longer runs)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pid: int, within_s: float = 1.0) -> bool:
    deadline = time.monotonic() + within_s
    while process_running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


SLEEP_FOREVER = """
    import time
    print("started", flush=True)
    while True:
        time.sleep(1)
"""

# Spawns a child (its own sleep), reports both pids, ignores SIGTERM when asked to, sleeps.
SPAWNER = """
    import os, signal, subprocess, sys, time
    if "ignore-term" in sys.argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen(["sleep", "1000"])
    print(f"PIDS {os.getpid()} {child.pid}", flush=True)
    while True:
        time.sleep(1)
"""


# ----------------------------------------------------------------------------- templates, argv, env


def test_template_path():
    path = template_path("render_task.py")
    assert path.is_absolute() and path.is_file() and path.name == "render_task.py"
    assert template_path("sample_scene.py").parent == path.parent
    with pytest.raises(FileNotFoundError):
        template_path("no_such_template.py")
    for bad in ("../pyproject.toml", "sub/render_task.py", "..", ".", "", "a\\b.py"):
        with pytest.raises(ValueError):
            template_path(bad)


def test_module_argv_uses_this_python_isolated(tmp_path):
    ex = LocalExecutor()
    run = make_run(tmp_path, tmp_path / "s.py", args=["a", "b"])
    if ex.mode == "module":
        assert ex.argv(run) == [sys.executable, "-I", str(tmp_path / "s.py"), "a", "b"]
    else:
        assert ex.argv(run)[-4:] == [str(tmp_path / "s.py"), "--", "a", "b"]


def test_binary_argv(tmp_path):
    ex = LocalExecutor(blender="/bin/true")
    assert ex.mode == "binary"
    run = make_run(tmp_path, tmp_path / "s.py", args=["p.json"])
    assert ex.argv(run) == [
        "/bin/true",
        "-b",
        "--factory-startup",
        "--disable-autoexec",
        "-noaudio",
        "--python-exit-code",
        "1",
        "--python",
        str(tmp_path / "s.py"),
        "--",
        "p.json",
    ]


def test_missing_binary_raises_blender_not_found():
    with pytest.raises(BlenderNotFound, match="not found"):
        LocalExecutor(blender="/nonexistent/blender")


def test_minimal_env_drops_secrets(monkeypatch, tmp_path):
    monkeypatch.setenv("RENDERFARM_NODE_TOKEN", "t1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "t2")
    monkeypatch.setenv("SOME_OTHER", "x")
    env = minimal_env(tmp_path, {"OCIO": "/cfg.ocio", "MY_api_key": "t3", "RENDERFARM_X": "t4"})
    assert env == {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "LANG": os.environ.get("LANG") or "C.UTF-8",
        "OCIO": "/cfg.ocio",
    }


async def test_child_sees_only_the_minimal_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RENDERFARM_DB_PASSWORD", "hunter2")
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_x")
    monkeypatch.setenv("UNRELATED", "1")
    script = write_script(
        tmp_path, "env.py", "import json, os\nprint('ENV ' + json.dumps(dict(os.environ)), flush=True)\n"
    )
    lines: list[str] = []
    run = make_run(tmp_path, script, env={"EXTRA_ONE": "yes"})
    outcome = await LocalExecutor().run(run, lines.append)
    assert outcome.ok, outcome
    env = json.loads(next(line for line in lines if line.startswith("ENV "))[4:])
    assert "hunter2" not in json.dumps(env) and "ghp_x" not in json.dumps(env)
    assert "UNRELATED" not in env
    assert env["HOME"] == str(run.cwd)
    assert env["EXTRA_ONE"] == "yes"


# ----------------------------------------------------------------------------- endings


async def test_exit_code_propagates(tmp_path):
    script = write_script(tmp_path, "exit3.py", "import sys\nprint('bye')\nsys.exit(int(sys.argv[-1]))\n")
    outcome = await LocalExecutor().run(make_run(tmp_path, script, args=["3"]), lambda _line: None)
    assert (outcome.reason, outcome.exit_code, outcome.ok) == ("exited", 3, False)
    assert outcome.log_tail == ["bye"]
    outcome = await LocalExecutor().run(make_run(tmp_path, script, args=["0"]), lambda _line: None)
    assert (outcome.reason, outcome.exit_code, outcome.ok) == ("exited", 0, True)


async def test_death_by_signal_is_a_negative_exit_code(tmp_path):
    script = write_script(tmp_path, "abort.py", "import os, signal\nos.kill(os.getpid(), signal.SIGABRT)\n")
    outcome = await LocalExecutor().run(make_run(tmp_path, script), lambda _line: None)
    assert (outcome.reason, outcome.exit_code) == ("exited", -signal.SIGABRT)


async def test_hard_timeout_kills(tmp_path):
    script = write_script(tmp_path, "forever.py", SLEEP_FOREVER)
    started = time.monotonic()
    outcome = await LocalExecutor().run(
        make_run(tmp_path, script, timeout_s=1.5, stall_timeout_s=60), lambda _line: None
    )
    elapsed = time.monotonic() - started
    assert outcome.reason == "timeout"
    assert outcome.exit_code is None and not outcome.ok
    assert 1.4 <= elapsed < 5, elapsed
    assert outcome.log_tail == ["started"]


async def test_stall_timeout_kills_a_silent_process(tmp_path):
    script = write_script(tmp_path, "forever.py", SLEEP_FOREVER)
    outcome = await LocalExecutor().run(
        make_run(tmp_path, script, timeout_s=60, stall_timeout_s=1.0), lambda _line: None
    )
    assert outcome.reason == "stalled"
    assert outcome.exit_code is None
    assert 1.0 <= outcome.duration_s < 5


async def test_output_keeps_a_slow_process_alive(tmp_path):
    script = write_script(
        tmp_path,
        "ticker.py",
        "import time\nfor i in range(12):\n    print('tick', i, flush=True)\n    time.sleep(0.25)\n",
    )
    outcome = await LocalExecutor().run(
        make_run(tmp_path, script, timeout_s=60, stall_timeout_s=1.0), lambda _line: None
    )
    assert outcome.ok, outcome
    assert outcome.duration_s >= 2.5


async def test_spawn_failure_is_reported(tmp_path):
    run = BlenderRun(
        script=tmp_path / "s.py", args=[], cwd=tmp_path / "missing", timeout_s=5, stall_timeout_s=5
    )
    outcome = await LocalExecutor().run(run, lambda _line: None)
    assert outcome.reason == "spawn_failed" and outcome.exit_code is None
    assert outcome.log_tail and "cannot start" in outcome.log_tail[0]


# ----------------------------------------------------------------------------- cancel and process groups


async def run_spawner_and_cancel(tmp_path: Path, *args: str) -> tuple[RunOutcome, list[int], float]:
    script = write_script(tmp_path, "spawner.py", SPAWNER)
    cancel = asyncio.Event()
    reported = asyncio.Event()
    pids: list[int] = []

    def on_line(line: str) -> None:
        if line.startswith("PIDS "):
            pids.extend(int(p) for p in line.split()[1:])
            reported.set()

    task = asyncio.create_task(LocalExecutor().run(make_run(tmp_path, script, args=args), on_line, cancel))
    await asyncio.wait_for(reported.wait(), 15)
    assert len(pids) == 2
    assert all(process_running(pid) for pid in pids)
    canceled_at = time.monotonic()
    cancel.set()
    outcome = await task
    return outcome, pids, time.monotonic() - canceled_at


async def test_cancel_kills_the_process_and_its_children(tmp_path):
    outcome, pids, took = await run_spawner_and_cancel(tmp_path)
    assert outcome.reason == "canceled" and outcome.exit_code is None
    assert took < 5
    assert all(wait_gone(pid) for pid in pids), [p for p in pids if process_running(p)]


async def test_cancel_escalates_to_sigkill(tmp_path):
    outcome, pids, took = await run_spawner_and_cancel(tmp_path, "ignore-term")
    assert outcome.reason == "canceled"
    assert 1.5 <= took < 5, took  # the SIGTERM grace passed, then SIGKILL
    assert all(wait_gone(pid) for pid in pids)


async def test_children_left_by_an_exited_process_are_killed(tmp_path):
    # The child inherits stdout and outlives its parent: the exit must still be seen at
    # once (not as a stall), and the child must not survive the run.
    script = write_script(
        tmp_path,
        "orphan.py",
        """
        import subprocess
        child = subprocess.Popen(["sleep", "1000"])
        print("CHILD", child.pid, flush=True)
        """,
    )
    lines: list[str] = []
    run = make_run(tmp_path, script, timeout_s=30, stall_timeout_s=20)
    outcome = await LocalExecutor().run(run, lines.append)
    assert outcome.ok, outcome
    assert outcome.duration_s < 5
    pid = int(next(line for line in lines if line.startswith("CHILD")).split()[1])
    assert wait_gone(pid)


async def test_task_cancellation_stops_the_process(tmp_path):
    script = write_script(tmp_path, "spawner.py", SPAWNER)
    reported = asyncio.Event()
    pids: list[int] = []

    def on_line(line: str) -> None:
        if line.startswith("PIDS "):
            pids.extend(int(p) for p in line.split()[1:])
            reported.set()

    task = asyncio.create_task(LocalExecutor().run(make_run(tmp_path, script), on_line))
    await asyncio.wait_for(reported.wait(), 15)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert all(wait_gone(pid) for pid in pids)


# ----------------------------------------------------------------------------- output handling


async def test_invalid_utf8_and_huge_line_are_bounded(tmp_path):
    script = write_script(
        tmp_path,
        "noisy.py",
        """
        import sys
        out = sys.stdout.buffer
        out.write(b"bad \\xff\\xfe bytes\\n")
        out.write(b"x" * (5 * 1024 * 1024))
        out.write(b"\\nend\\n")
        out.flush()
        """,
    )
    seen: list[str] = []
    outcome = await LocalExecutor().run(make_run(tmp_path, script), seen.append)
    assert outcome.ok, outcome.log_tail[-3:]
    assert seen[0] == "bad \ufffd\ufffd bytes"
    assert seen[1] == "x" * MAX_LINE_BYTES + TRUNCATED_MARK
    assert seen[2:] == ["end"]
    assert outcome.log_tail == seen
    assert sum(len(line) for line in outcome.log_tail) < 2 * MAX_LINE_BYTES


async def test_log_tail_keeps_the_last_lines_and_stderr(tmp_path):
    script = write_script(
        tmp_path,
        "many.py",
        "import sys\nfor i in range(500):\n    print('line', i, flush=True)\n"
        "print('to stderr', file=sys.stderr)\n",
    )
    seen: list[str] = []
    outcome = await LocalExecutor().run(make_run(tmp_path, script), seen.append)
    assert outcome.ok
    assert len(seen) == 501
    assert len(outcome.log_tail) == LOG_TAIL_LINES
    assert outcome.log_tail[-1] == "to stderr"
    assert outcome.log_tail[0] == f"line {500 - LOG_TAIL_LINES + 1}"


async def test_failing_callback_does_not_break_the_run(tmp_path):
    script = write_script(tmp_path, "few.py", "for i in range(5):\n    print('n', i)\n")
    calls = []

    def on_line(line: str) -> None:
        calls.append(line)
        raise RuntimeError("callback bug")

    outcome = await LocalExecutor().run(make_run(tmp_path, script), on_line)
    assert outcome.ok
    assert calls == [f"n {i}" for i in range(5)]
    assert outcome.log_tail == calls


# ----------------------------------------------------------------------------- real Blender


def write_params(tmp_path: Path, blend: Path, **overrides) -> Path:
    params = {
        "blend_file": str(blend),
        "output_dir": str(tmp_path / "out"),
        "manifest_path": str(tmp_path / "manifest.json"),
        "frames": [1],
        "resolution_percentage": 10,
        "output_format": "PNG",
    }
    params.update(overrides)
    path = tmp_path / "params.json"
    path.write_text(json.dumps(params))
    return path


@pytest.mark.blender
async def test_render_task_error_gives_nonzero_exit(tmp_path):
    params = write_params(tmp_path, tmp_path / "no-such.blend")
    lines: list[str] = []
    run = make_run(tmp_path, template_path("render_task.py"), args=[str(params)], timeout_s=120)
    outcome = await LocalExecutor().run(run, lines.append)
    assert outcome.reason == "exited" and outcome.exit_code not in (0, None)
    events = [e for e in map(parse_line, lines) if e is not None]
    assert events[-1].kind == "error"
    assert "blend file not found" in events[-1].message
    assert not (tmp_path / "manifest.json").exists()


@pytest.mark.blender
async def test_render_task_through_executor(tmp_path, sample_blend):
    params = write_params(tmp_path, sample_blend, frames=[2, -1])  # conftest: sample_scene.py output
    (tmp_path / "out").mkdir()
    lines: list[str] = []
    run = make_run(
        tmp_path, template_path("render_task.py"), args=[str(params)], timeout_s=300, stall_timeout_s=120
    )
    outcome = await LocalExecutor().run(run, lines.append)
    assert outcome.ok, outcome.log_tail
    events = [e for e in map(parse_line, lines) if e is not None]
    kinds = [e.kind for e in events]
    assert kinds[:2] == ["device", "start"] and kinds[-1] == "done"
    done = [e for e in events if e.kind == "frame_done"]
    saved = [e for e in events if e.kind == "saved"]
    assert [e.frame for e in done] == [2, -1]
    assert [e.path for e in saved] == [e.path for e in done]
    assert all(Path(e.path).is_file() for e in done)
