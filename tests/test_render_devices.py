"""Device selection and warm mode of templates/render_task.py, in real Blender (the bpy module).

No GPU is here: the GPU branches are exercised through their "no such device" path (which a
farm meets when a driver is missing), and the CPU path renders for real. A GPU render itself
is not tested (no NVIDIA GPU on this machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from node_agent.logparse import parse_line
from templates import template_path

pytestmark = pytest.mark.blender
RENDER_TASK = template_path("render_task.py")


def params(blend: Path, tmp: Path, **kw: object) -> Path:
    out = {
        "blend_file": str(blend),
        "output_dir": str(tmp / "out"),
        "manifest_path": str(tmp / "manifest.json"),
        "frames": [1],
        "resolution_percentage": 10,
        "samples": 1,
        "output_format": "PNG",
        **kw,
    }
    path = tmp / "params.json"
    path.write_text(json.dumps(out))
    return path


def run(path: Path, timeout: float = 180) -> tuple[int, list[dict], str]:
    proc = subprocess.run(
        [sys.executable, "-I", str(RENDER_TASK), str(path)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    events = [ev.data for line in proc.stdout.splitlines() if (ev := parse_line(line)) and ev.data]
    return proc.returncode, events, proc.stdout + proc.stderr


def test_cpu_device_is_selected_explicitly_and_logged(sample_blend: Path, tmp_path: Path) -> None:
    code, events, out = run(params(sample_blend, tmp_path, device="CPU"))
    assert code == 0, out[-3000:]
    device = next(e for e in events if e["event"] == "device")
    assert device["device"].startswith("CPU: ") and device["fallback"] is False
    assert "renderfarm: render devices: CPU: " in out
    assert Image.open(tmp_path / "out" / "frame_000001.png").size[0] > 0


@pytest.mark.parametrize("backend", ["OPTIX", "CUDA", "HIP"])
def test_gpu_without_device_fails_fast_naming_the_reason(
    sample_blend: Path, tmp_path: Path, backend: str
) -> None:
    started = time.monotonic()
    code, events, _ = run(params(sample_blend, tmp_path, device=backend))
    assert code == 1
    error = next(e for e in events if e["event"] == "error")
    assert error["kind"] == "device"
    assert f"no {backend} device found" in error["message"]
    assert "does not allow falling back to the CPU" in error["message"]
    assert not any(e["event"] == "frame_start" for e in events), "no frame may start"
    assert time.monotonic() - started < 60


def test_metal_is_refused_by_this_blender(sample_blend: Path, tmp_path: Path) -> None:
    code, events, _ = run(params(sample_blend, tmp_path, device="METAL"))
    assert code == 1
    error = next(e for e in events if e["event"] == "error")
    assert error["kind"] == "device" and "no METAL support" in error["message"]


def test_gpu_without_device_falls_back_to_cpu_when_allowed(sample_blend: Path, tmp_path: Path) -> None:
    code, events, out = run(params(sample_blend, tmp_path, device="OPTIX", cpu_fallback=True))
    assert code == 0, out[-3000:]
    device = next(e for e in events if e["event"] == "device")
    assert device["fallback"] is True and device["device"].startswith("CPU")
    assert "no OPTIX device found" in device["reason"]
    assert (tmp_path / "out" / "frame_000001.png").is_file()


def test_bad_device_parameter_is_refused(sample_blend: Path, tmp_path: Path) -> None:
    code, events, _ = run(params(sample_blend, tmp_path, device="gpu; rm -rf /"))
    assert code == 1
    error = next(e for e in events if e["event"] == "error")
    assert "device 'gpu; rm -rf /' is not one of" in error["message"]


def _command(folder: Path, seq: int, body: dict) -> None:
    tmp = folder / f"{seq:06d}.json.tmp"
    tmp.write_text(json.dumps(body))
    os.replace(tmp, folder / f"{seq:06d}.json")


def test_warm_mode_renders_commands_without_reopening(sample_blend: Path, tmp_path: Path) -> None:
    cmds = tmp_path / "cmds"
    cmds.mkdir()
    path = params(sample_blend, tmp_path, device="CPU", command_dir=str(cmds), idle_s=60)
    proc = subprocess.Popen(
        [sys.executable, "-I", str(RENDER_TASK), str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for i, frames in enumerate(([1, 2], [3]), start=1):
            _command(
                cmds,
                i,
                {
                    "task": f"t{i}",
                    "frames": frames,
                    "output_dir": str(tmp_path / f"out{i}"),
                    "manifest_path": str(tmp_path / f"out{i}" / "manifest.json"),
                },
            )
        _command(cmds, 3, {"quit": True})
        out, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    events = [ev.data for line in out.splitlines() if (ev := parse_line(line)) and ev.data]
    kinds = [e["event"] for e in events]
    assert kinds.count("ready") == 1 and kinds.count("device") == 1  # the file was opened once
    assert kinds[-1] == "bye"
    done = [(e["task"], e["frame"]) for e in events if e["event"] == "frame_done"]
    assert done == [("t1", 1), ("t1", 2), ("t2", 3)]
    assert [e["task"] for e in events if e["event"] == "done"] == ["t1", "t2"]
    assert (tmp_path / "out1" / "frame_000002.png").is_file()
    assert (tmp_path / "out2" / "frame_000003.png").is_file()
    assert out.count("Read blend:") <= 1


def test_warm_mode_exits_when_idle_and_refuses_bad_commands(sample_blend: Path, tmp_path: Path) -> None:
    cmds = tmp_path / "cmds"
    cmds.mkdir()
    code, events, out = run(params(sample_blend, tmp_path, command_dir=str(cmds), idle_s=1))
    assert code == 0, out[-3000:]
    assert [e["event"] for e in events][-1] == "idle"

    _command(cmds, 1, {"task": "t", "frames": ["1; import os"], "output_dir": "x", "manifest_path": "y"})
    code, events, _ = run(params(sample_blend, tmp_path, command_dir=str(cmds), idle_s=5))
    assert code == 1
    assert (
        "'frames' must be a non-empty list of integers"
        in next(e for e in events if e["event"] == "error")["message"]
    )
