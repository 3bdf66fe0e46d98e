"""templates/render_task.py and templates/sample_scene.py, run in real Blender (the bpy module).

Each test runs the script in a subprocess, ``sys.executable render_task.py PARAMS``, as the
local executor does; the demo scene is generated once per session by sample_scene.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from itertools import combinations
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from node_agent.logparse import Event, parse_line
from templates import template_path

pytestmark = pytest.mark.blender

SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL = SHARED / "blendfiles" / "real"
RENDER_TASK = template_path("render_task.py")
INJECTION = 'x"); import os; os.system("touch {marker}") #'
EXR_MAGIC = b"\x76\x2f\x31\x01"


def need_real(name: str) -> Path:
    path = REAL / name
    if not path.is_file():
        pytest.fail(f"shared test file {path} not found: the repo must sit beside shared/")
    return path


def blend_info(blend: Path) -> dict:
    """Scene settings of ``blend``'s active scene, read by Blender in a subprocess."""
    code = textwrap.dedent(
        """
        import json, sys, bpy
        bpy.ops.wm.open_mainfile(filepath=sys.argv[1], load_ui=False, use_scripts=False)
        s = bpy.context.scene
        r = s.render
        print("INFO " + json.dumps({
            "scenes": [x.name for x in bpy.data.scenes], "scene": s.name,
            "camera": s.camera.name if s.camera else None,
            "frame_start": s.frame_start, "frame_end": s.frame_end, "engine": r.engine,
            "samples": s.cycles.samples, "device": s.cycles.device,
            "x": r.resolution_x, "y": r.resolution_y, "pct": r.resolution_percentage,
            "media_type": r.image_settings.media_type, "file_format": r.image_settings.file_format,
        }), flush=True)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(blend)], capture_output=True, text=True, timeout=120, check=True
    )
    line = next(line for line in proc.stdout.splitlines() if line.startswith("INFO "))
    return json.loads(line[5:])


@pytest.fixture(scope="session")
def demo_blend(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo.blend"
    proc = subprocess.run(
        [sys.executable, str(template_path("sample_scene.py")), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


class Result:
    def __init__(self, proc: subprocess.CompletedProcess) -> None:
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.events: list[Event] = [e for e in map(parse_line, proc.stdout.splitlines()) if e is not None]

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events if e.kind not in ("saved", "frame")]

    def error(self) -> str:
        errors = [e.message for e in self.events if e.kind == "error"]
        assert errors, f"no error event; stdout={self.stdout[-2000:]} stderr={self.stderr[-2000:]}"
        return errors[-1]


def params_for(tmp_path: Path, blend: Path, **overrides) -> dict:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    params = {
        "blend_file": str(blend),
        "output_dir": str(out),
        "manifest_path": str(tmp_path / "manifest.json"),
        "frames": [1],
        "scene": None,
        "camera": None,
        "engine": None,
        "samples": None,
        "resolution_percentage": 25,
        "resolution_x": None,
        "resolution_y": None,
        "output_format": "PNG",
    }
    params.update(overrides)
    return params


def run_task(tmp_path: Path, params: dict, *, dashdash: bool = False, inline: bool = False) -> Result:
    path = tmp_path / "params.json"
    path.write_text(json.dumps(params))
    arg = json.dumps(params) if inline else str(path)
    argv = [sys.executable, str(RENDER_TASK), *(["--"] if dashdash else []), arg]
    return Result(subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=tmp_path))


def manifest(tmp_path: Path) -> dict[str, str]:
    data = json.loads((tmp_path / "manifest.json").read_text())
    return data["frames"]


# ----------------------------------------------------------------------------- sample scene


def test_sample_scene_settings(demo_blend):
    assert demo_blend.read_bytes()[:7] == b"BLENDER"  # saved uncompressed (no gzip/zstd magic)
    info = blend_info(demo_blend)
    assert info["camera"] == "Camera"
    assert (info["frame_start"], info["frame_end"]) == (1, 24)
    assert (info["engine"], info["samples"], info["device"]) == ("CYCLES", 16, "CPU")
    assert (info["x"], info["y"], info["pct"]) == (320, 240, 100)
    assert (info["media_type"], info["file_format"]) == ("IMAGE", "PNG")


# ----------------------------------------------------------------------------- rendering


def test_png_frames_including_a_negative_one(tmp_path, demo_blend):
    frames = [1, 2, -3]
    res = run_task(tmp_path, params_for(tmp_path, demo_blend, frames=frames))
    assert res.returncode == 0, res.stderr[-3000:]

    assert res.kinds() == [
        "device",
        "start",
        *[k for f in frames for k in ("frame_start", "frame_done")],
        "done",
    ]
    start = next(e for e in res.events if e.kind == "start")
    assert start.data["frames"] == frames
    assert (start.data["scene"], start.data["camera"]) == ("Demo", "Camera")

    files = manifest(tmp_path)
    assert set(files) == {"1", "2", "-3"}
    out = tmp_path / "out"
    assert sorted(out.iterdir()) == sorted(Path(p) for p in files.values())
    assert Path(files["-3"]).name == "frame_-000003.png"  # Blender's naming of negative frames
    assert Path(files["1"]).name == "frame_000001.png"
    done = {e.frame: e.path for e in res.events if e.kind == "frame_done"}
    assert {str(f): p for f, p in done.items()} == files

    images = {}
    for frame, path in files.items():
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG"
            assert im.size == (80, 60)  # 320x240 at 25 %
            images[frame] = im.convert("RGB")
    for a, b in combinations(images, 2):
        assert ImageChops.difference(images[a], images[b]).getbbox() is not None, (
            f"frames {a} and {b} are equal"
        )


def test_manifest_is_written_before_rendering(tmp_path, demo_blend):
    params = params_for(tmp_path, demo_blend, frames=[5, 6])
    path = tmp_path / "params.json"
    path.write_text(json.dumps(params))
    proc = subprocess.Popen(
        [sys.executable, str(RENDER_TASK), str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    seen_at_start = None
    with proc:
        for line in proc.stdout:
            event = parse_line(line)
            if event is not None and event.kind == "start" and seen_at_start is None:
                seen_at_start = {f: (p, Path(p).exists()) for f, p in manifest(tmp_path).items()}
    assert proc.returncode == 0
    assert seen_at_start is not None
    assert set(seen_at_start) == {"5", "6"}
    assert not any(exists for _, exists in seen_at_start.values())  # listed before any was rendered
    assert all(Path(p).is_file() for p, _ in seen_at_start.values())
    assert not (tmp_path / "manifest.json.tmp").exists()


@pytest.mark.parametrize(
    ("fmt", "name"),
    [("OPEN_EXR", "frame_000003.exr"), ("JPEG", "frame_000003.jpg")],
)
def test_other_formats(tmp_path, demo_blend, fmt, name):
    res = run_task(tmp_path, params_for(tmp_path, demo_blend, frames=[3], output_format=fmt))
    assert res.returncode == 0, res.stderr[-3000:]
    path = Path(manifest(tmp_path)["3"])
    assert path.name == name and path.is_file()
    data = path.read_bytes()
    if fmt == "OPEN_EXR":
        assert data[:4] == EXR_MAGIC
        assert len(data) > 1000
    else:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert (im.format, im.size) == ("JPEG", (80, 60))


def test_resolution_overrides_and_dashdash_argument(tmp_path, demo_blend):
    params = params_for(
        tmp_path,
        demo_blend,
        frames=[4],
        resolution_x=200,
        resolution_y=100,
        resolution_percentage=50,
        samples=4,
    )
    res = run_task(tmp_path, params, dashdash=True)  # the Blender binary's argument style
    assert res.returncode == 0, res.stderr[-3000:]
    with Image.open(manifest(tmp_path)["4"]) as im:
        assert im.size == (100, 50)


def test_inline_json_argument_and_named_scene_and_camera(tmp_path, demo_blend):
    params = params_for(
        tmp_path, demo_blend, frames=[7], scene="Demo", camera="Camera", resolution_percentage=10
    )
    res = run_task(tmp_path, params, inline=True)
    assert res.returncode == 0, res.stderr[-3000:]
    with Image.open(manifest(tmp_path)["7"]) as im:
        assert im.size == (32, 24)


# ----------------------------------------------------------------------------- errors


def test_injection_in_scene_and_camera_names_runs_nothing(tmp_path, demo_blend):
    marker = tmp_path / "pwned"
    name = INJECTION.format(marker=marker)
    res = run_task(tmp_path, params_for(tmp_path, demo_blend, scene=name, camera=name))
    assert res.returncode != 0
    assert res.error().startswith(f"unknown scene '{name}'")
    assert "'Demo'" in res.error()  # lists the scenes that exist
    assert not marker.exists()

    res = run_task(tmp_path, params_for(tmp_path, demo_blend, camera=name))
    assert res.returncode != 0
    assert res.error().startswith(f"unknown camera '{name}'")
    assert "'Camera'" in res.error()  # lists the cameras that exist
    assert not marker.exists()
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"engine": "NOT_AN_ENGINE"}, "unknown engine 'NOT_AN_ENGINE'"),
        ({"resolution_percentage": 0}, "resolution_percentage 0 is outside Blender's range 1..32767"),
        ({"resolution_x": 2}, "resolution_x 2 is outside Blender's range 4..65536"),
        ({"samples": 0}, "samples 0 is outside Blender's range"),
        ({"output_format": "FFMPEG"}, "output_format 'FFMPEG' is not one of"),
        ({"frames": []}, "'frames' must be a non-empty list"),
        ({"frames": [1, "2"]}, "'frames' holds a non-integer"),
        ({"frames": [2_000_000]}, "frame 2000000 is outside Blender's range"),
    ],
)
def test_bad_parameters_are_clear_errors(tmp_path, demo_blend, overrides, expected):
    res = run_task(tmp_path, params_for(tmp_path, demo_blend, **overrides))
    assert res.returncode == 1
    assert expected in res.error()
    assert res.kinds()[-1] == "error"
    assert "done" not in res.kinds()


def test_missing_blend_file_fails(tmp_path):
    res = run_task(tmp_path, params_for(tmp_path, tmp_path / "missing.blend"))
    assert res.returncode == 1
    assert res.error().startswith("blend file not found:")


def test_corrupt_blend_file_fails_with_traceback(tmp_path):
    res = run_task(tmp_path, params_for(tmp_path, need_real("corrupt_only_magic.blend")))
    assert res.returncode == 1
    assert res.error()
    assert "Traceback" in res.stderr


# ----------------------------------------------------------------------------- real files


def test_file_without_camera_is_refused(tmp_path):
    res = run_task(tmp_path, params_for(tmp_path, need_real("basic_file.blend")))
    assert res.returncode != 0
    assert res.error() == "scene 'Scene' has no camera"
    assert "has no camera" in res.stderr
    assert list((tmp_path / "out").iterdir()) == []


def test_sequencer_file_without_camera_renders_png(tmp_path):
    blend = need_real("with_sequencer.blend")
    info = blend_info(blend)
    assert info["camera"] is None and info["media_type"] == "VIDEO"  # what makes this file a test
    res = run_task(tmp_path, params_for(tmp_path, blend, frames=[1], resolution_percentage=10))
    assert res.returncode == 0, res.stderr[-3000:]
    path = Path(manifest(tmp_path)["1"])
    assert path.suffix == ".png"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (info["x"] * 10 // 100, info["y"] * 10 // 100)


@pytest.mark.parametrize("engine", ["BLENDER_WORKBENCH", "CYCLES"])
def test_engine_override_renders(tmp_path, demo_blend, engine):
    """The engine enum is dynamic: its static RNA items miss add-on engines such as Cycles."""
    res = run_task(tmp_path, params_for(tmp_path, demo_blend, engine=engine, frames=[2]))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "done" in res.kinds()
    with Image.open(manifest(tmp_path)["2"]) as im:
        assert im.size == (80, 60)


async def test_the_sample_scene_command_leaves_only_the_file(tmp_path):
    from cli.farm import make_sample_scene

    await make_sample_scene(tmp_path / "x.blend")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.blend"], (
        "Blender's .config/.cache left beside it"
    )
