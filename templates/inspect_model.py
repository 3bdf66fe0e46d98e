"""Inspect an uploaded .blend: the model manager's Blender script.

Invocation (either works; the arguments are everything after ``--`` if present, else
``argv[1:]``)::

    python inspect_model.py BLEND OUT_JSON                     # the bpy module
    blender -b --factory-startup --disable-autoexec --python-exit-code 1 \\
        --python inspect_model.py -- BLEND OUT_JSON             # a Blender binary

It turns auto-run scripts off, opens ``BLEND`` without its UI and without running
its scripts (``wm.open_mainfile(load_ui=False, use_scripts=False)``), and writes
``OUT_JSON`` atomically (a temp file in the same folder, then ``os.replace``)::

    {"blender_version": [2, 79, 2],          # bpy.data.version: the file's, not ours
     "active_scene": "Scene",
     "scenes": [{"name", "camera", "cameras", "frame_start", "frame_end", "frame_step",
                 "fps", "resolution_x", "resolution_y", "resolution_percentage",
                 "engine", "samples", "output_path", "output_format", "media_type",
                 "use_sequencer", "sequencer_strips", "renderable", "problem"}],
     "libraries": [{"name", "filepath", "missing"}],
     "images_missing": ["//textures/a.png"]}

``renderable`` follows Blender's own check before a render (``RE_is_rendering_allowed``
and ``RE_seq_render_active`` in ``render/intern/pipeline.cc``): a scene renders when it
has a camera, or when ``render.use_sequencer`` is on and a top-level strip that is not
sound and not muted exists; a scene strip then needs a camera of its own.

Everything read from the file is data: names and paths are copied into the JSON,
never evaluated. Imports only bpy and the standard library. On failure it prints one
line ``inspect_model: error: <reason>`` to stderr and exits with status 1.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import tempfile

import bpy

ERROR_PREFIX = "inspect_model: error: "


def _arguments() -> list[str]:
    argv = sys.argv
    return argv[argv.index("--") + 1 :] if "--" in argv else argv[1:]


def _strips(editor, top_level: bool) -> list:
    if editor is None:
        return []
    # Blender 4.4+ renamed sequences/sequences_all to strips/strips_all.
    name = "strips" if top_level else "strips_all"
    old = "sequences" if top_level else "sequences_all"
    found = getattr(editor, name, None)
    if found is None:
        found = getattr(editor, old, ())
    return list(found)


def _sequencer_problem(scene) -> tuple[bool, str | None]:
    """(renders from the sequencer, problem) per RE_seq_render_active/check_valid_camera."""
    if not scene.render.use_sequencer:
        return False, None
    active = [s for s in _strips(scene.sequence_editor, True) if s.type != "SOUND" and not s.mute]
    if not active:
        return False, None
    for strip in active:
        if strip.type == "SCENE" and strip.scene is not None:
            if strip.scene_camera is None and strip.scene.camera is None:
                return True, f"scene strip {strip.name!r} has no camera"
    return True, None


def _samples(scene) -> int | None:
    engine = scene.render.engine
    if engine == "CYCLES" and hasattr(scene, "cycles"):
        return int(scene.cycles.samples)
    if engine.startswith("BLENDER_EEVEE"):
        return int(scene.eevee.taa_render_samples)
    return None


def _scene_info(scene) -> dict:
    render = scene.render
    settings = render.image_settings
    sequencer, seq_problem = _sequencer_problem(scene)
    camera = scene.camera.name if scene.camera is not None else None
    renderable = (camera is not None or sequencer) and seq_problem is None
    if renderable:
        problem = None
    elif seq_problem is not None:
        problem = seq_problem
    else:
        problem = "no camera"
    return {
        "name": scene.name,
        "camera": camera,
        "cameras": sorted(o.name for o in scene.objects if o.type == "CAMERA"),
        "frame_start": scene.frame_start,
        "frame_end": scene.frame_end,
        "frame_step": scene.frame_step,
        "fps": round(render.fps / render.fps_base, 6) if render.fps_base else float(render.fps),
        "resolution_x": render.resolution_x,
        "resolution_y": render.resolution_y,
        "resolution_percentage": render.resolution_percentage,
        "engine": render.engine,
        "samples": _samples(scene),
        "output_path": render.filepath,
        "output_format": settings.file_format,
        "media_type": getattr(settings, "media_type", None),
        "use_sequencer": bool(render.use_sequencer),
        "sequencer_strips": len(_strips(scene.sequence_editor, False)),
        "renderable": renderable,
        "problem": problem,
    }


def _image_missing(image) -> bool:
    if image.packed_file is not None or image.source not in {"FILE", "SEQUENCE", "MOVIE", "TILED"}:
        return False
    if not image.filepath:
        return False
    path = bpy.path.abspath(image.filepath, library=image.library)
    if image.source == "TILED" or "<UDIM>" in path or "<UVTILE>" in path:
        folder, name = os.path.split(path)
        pattern = glob.escape(name).replace("<UDIM>", "*").replace("<UVTILE>", "*")
        return not glob.glob(os.path.join(glob.escape(folder), pattern))
    return not os.path.exists(path)


def inspect(blend: str) -> dict:
    """Open ``blend`` safely and describe it (see the module docstring for the shape)."""
    bpy.context.preferences.filepaths.use_scripts_auto_execute = False
    bpy.ops.wm.open_mainfile(filepath=blend, load_ui=False, use_scripts=False)
    window = bpy.context.window
    active = window.scene if window is not None else bpy.context.scene
    return {
        "blender_version": list(bpy.data.version),
        "active_scene": active.name if active is not None else None,
        "scenes": [_scene_info(scene) for scene in bpy.data.scenes],
        "libraries": [
            {"name": lib.name, "filepath": lib.filepath, "missing": bool(getattr(lib, "is_missing", False))}
            for lib in bpy.data.libraries
        ],
        "images_missing": sorted({img.filepath for img in bpy.data.images if _image_missing(img)}),
    }


def write_json_atomically(path: str, data: dict) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".inspect-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main() -> int:
    """Entry point; returns the process exit status."""
    args = _arguments()
    if len(args) != 2:
        print(
            f"{ERROR_PREFIX}usage: inspect_model.py BLEND OUT_JSON (got {len(args)} arguments)",
            file=sys.stderr,
        )
        return 1
    blend, out = args
    try:
        data = inspect(blend)
    except Exception as exc:
        reason = str(exc).strip().splitlines()
        print(f"{ERROR_PREFIX}{reason[-1] if reason else type(exc).__name__}", file=sys.stderr, flush=True)
        return 1
    write_json_atomically(out, data)
    print(f"inspect_model: wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
