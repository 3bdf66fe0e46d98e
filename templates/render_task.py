"""Render one task's frames: the per-task Blender script of the render farm.

Invocation (either works; the parameters are found after ``--`` if present, else in ``argv[1]``)::

    python render_task.py PARAMS_JSON                  # the bpy module of this Python
    blender -b --factory-startup --disable-autoexec --python-exit-code 1 \\
        --python render_task.py -- PARAMS_JSON         # a Blender binary

``PARAMS_JSON`` is the path of a JSON file holding ``protocol.messages.RenderParams.to_dict()``
(an argument that starts with ``{`` is read as the JSON text itself). Task parameters reach
this script only as data: nothing from them is ever evaluated as Python.

What it does, in order:

1. turns auto-run scripts off and opens ``blend_file`` without its UI and without running
   its scripts (``wm.open_mainfile(load_ui=False, use_scripts=False)``);
2. selects the scene (named, else the window's active scene, else the first one) and
   makes it the window's scene;
3. applies the overrides (engine, samples, resolution %, resolution x/y, camera), each
   checked against the range Blender's RNA declares for the property (Blender clamps
   silently otherwise);
4. refuses a scene without a camera unless it renders from the video sequencer;
5. switches the output to an image format (PNG, OPEN_EXR or JPEG): in Blender 5
   ``image_settings.media_type`` must be ``'IMAGE'`` before ``file_format`` accepts an
   image format when the file had a movie output;
6. points the output at ``output_dir/frame_######`` and writes the manifest
   ``{"frames": {"<frame>": "<absolute path>"}}`` (paths from
   ``RenderSettings.frame_path(frame=n)``) to ``manifest_path`` before rendering;
7. renders each frame: ``scene.frame_set(f)``, output path set to the resolved
   ``frame_path(frame=f)``, ``render.render(write_still=True)``, pattern restored.
   Measured with bpy 5.0.1: ``scene.frame_start`` cannot be negative (clamped to 0
   silently) and ``write_still`` does not substitute ``#``, so rendering "frame f" through
   the frame range or the ``#`` pattern writes the wrong file for negative frames; the
   sequence above works for any frame, negative included.

Progress goes to stdout as one JSON object per line, prefixed with ``EVENT_PREFIX``
(the same literal as ``protocol.messages.EVENT_PREFIX``) and flushed::

    {"event": "start", "frames": [...], "scene": "...", "camera": "..." | null}
    {"event": "frame_start", "frame": n}
    {"event": "frame_done", "frame": n, "path": "...", "seconds": s}
    {"event": "error", "message": "..."}          # then exit status 1
    {"event": "done"}

Any error (bad parameters, unreadable file, unknown scene or camera, no camera, a
render that writes nothing, any Python exception) prints the traceback to stderr, an
``error`` event to stdout, and exits with status 1.

Self-contained: imports only bpy and the standard library, since a Blender binary's
Python does not have the project's packages.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import traceback

import bpy

EVENT_PREFIX = "@@renderfarm "
"""Prefix of event lines; a copy of ``protocol.messages.EVENT_PREFIX``."""

OUTPUT_FORMATS = ("PNG", "OPEN_EXR", "JPEG")
"""Accepted ``output_format`` values; a copy of ``protocol.messages.OUTPUT_FORMATS``."""

DEVICES = ("CPU", "OPTIX", "CUDA", "HIP", "ONEAPI", "METAL")
"""Accepted ``device`` values: the CPU or a Cycles GPU backend (``protocol.devices.BACKENDS``)."""

COMMAND_POLL_S = 0.02
"""Warm mode: seconds between looks for the next command file."""

FILE_PATTERN = "frame_######"
"""Output file name pattern inside ``output_dir``; Blender replaces the last run of ``#``."""


class TaskError(Exception):
    """An error the user can act on; its message is reported as is.

    ``kind`` classifies it for the farm's failure policy (``protocol.messages.FAILURE_KINDS``):
    ``"device"`` when the requested render device is unusable, else ``"python_error"``.
    """

    def __init__(self, message: str, kind: str = "python_error") -> None:
        super().__init__(message)
        self.kind = kind


def emit(event: str, **fields: object) -> None:
    """Print one event line on stdout, flushed."""
    payload = {"event": event, **fields}
    sys.stdout.write(EVENT_PREFIX + json.dumps(payload) + "\n")
    sys.stdout.flush()


def _quote(name: str) -> str:
    return "'" + name + "'"


def _names(names: list[str]) -> str:
    return ", ".join(_quote(n) for n in names) if names else "(none)"


# --------------------------------------------------------------------------- parameters


def _argument() -> str:
    argv = sys.argv
    rest = argv[argv.index("--") + 1 :] if "--" in argv else argv[1:]
    if len(rest) != 1:
        raise TaskError(f"expected one argument (the parameters JSON), got {len(rest)}")
    return rest[0]


def read_params(arg: str) -> dict:
    """Load and check the parameters; raise TaskError on anything malformed."""
    if arg.lstrip().startswith("{"):
        text = arg
    else:
        try:
            with open(arg, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise TaskError(f"cannot read parameters file {arg!r}: {exc}") from exc
    try:
        params = json.loads(text)
    except ValueError as exc:
        raise TaskError(f"parameters are not valid JSON: {exc}") from exc
    if not isinstance(params, dict):
        raise TaskError("parameters must be a JSON object")

    def need_str(key: str, optional: bool) -> None:
        value = params.get(key)
        if value is None and optional:
            params[key] = None
            return
        if not isinstance(value, str) or not value:
            raise TaskError(f"parameter {key!r} must be a non-empty string")

    def need_int(key: str) -> None:
        value = params.get(key)
        if value is None:
            params[key] = None
            return
        if isinstance(value, bool) or not isinstance(value, int):
            raise TaskError(f"parameter {key!r} must be an integer or null")

    for key in ("blend_file", "output_dir", "manifest_path"):
        need_str(key, optional=False)
    for key in ("scene", "camera", "engine", "output_format", "confine_root", "command_dir"):
        need_str(key, optional=True)
    device = params.get("device", "CPU")
    if device not in DEVICES:
        raise TaskError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    params["device"] = device
    if not isinstance(params.get("cpu_fallback", False), bool):
        raise TaskError("parameter 'cpu_fallback' must be true or false")
    params["cpu_fallback"] = bool(params.get("cpu_fallback", False))
    idle = params.get("idle_s", 60)
    if isinstance(idle, bool) or not isinstance(idle, (int, float)) or idle <= 0:
        raise TaskError("parameter 'idle_s' must be a positive number of seconds")
    params["idle_s"] = float(idle)
    for key in ("samples", "resolution_percentage", "resolution_x", "resolution_y"):
        need_int(key)

    frames = params.get("frames")
    if not isinstance(frames, list) or not frames:
        raise TaskError("parameter 'frames' must be a non-empty list of integers")
    unique: list[int] = []
    for f in frames:
        if isinstance(f, bool) or not isinstance(f, int):
            raise TaskError(f"parameter 'frames' holds a non-integer: {f!r}")
        if f not in unique:
            unique.append(f)
    params["frames"] = unique

    fmt = params["output_format"]
    if fmt is not None and fmt not in OUTPUT_FORMATS:
        raise TaskError(f"output_format {fmt!r} is not one of {', '.join(OUTPUT_FORMATS)}")

    out = os.path.abspath(params["output_dir"])
    if out.startswith("//"):  # POSIX keeps a leading '//', which Blender reads as "relative to the .blend"
        out = "/" + out.lstrip("/")
    params["output_dir"] = out
    params["manifest_path"] = os.path.abspath(params["manifest_path"])
    params["blend_file"] = os.path.abspath(params["blend_file"])
    return params


def _check_range(owner: bpy.types.bpy_struct, prop: str, value: int, label: str) -> None:
    """Raise TaskError unless ``value`` lies in the hard range Blender's RNA declares for ``prop``."""
    rna = owner.bl_rna.properties[prop]
    if not rna.hard_min <= value <= rna.hard_max:
        raise TaskError(f"{label} {value} is outside Blender's range {rna.hard_min}..{rna.hard_max}")


# --------------------------------------------------------------------------- scene setup


def open_blend(path: str) -> None:
    """Open ``path`` with auto-run scripts off and without its UI."""
    if not os.path.isfile(path):
        raise TaskError(f"blend file not found: {path}")
    bpy.context.preferences.filepaths.use_scripts_auto_execute = False
    bpy.ops.wm.open_mainfile(filepath=path, load_ui=False, use_scripts=False)


def select_scene(name: str | None) -> bpy.types.Scene:
    """Return the named scene, else the window's scene, else the first; make it the window's scene."""
    scenes = list(bpy.data.scenes)
    if not scenes:
        raise TaskError("the file has no scene")
    if name is not None:
        scene = bpy.data.scenes.get(name)
        if scene is None:
            raise TaskError(
                f"unknown scene {_quote(name)}; scenes in the file: {_names([s.name for s in scenes])}"
            )
    else:
        scene = bpy.context.scene or scenes[0]
    window = getattr(bpy.context, "window", None)
    if window is not None:
        try:
            window.scene = scene
        except (AttributeError, TypeError, RuntimeError):
            pass  # no window to switch: render.render(scene=...) still picks the scene
    return scene


def uses_sequencer(scene: bpy.types.Scene) -> bool:
    """True when the scene's output comes from the video sequencer.

    ``RenderSettings.use_sequencer`` and at least one strip. Strips are
    ``SequenceEditor.strips_all`` in Blender 5 (``sequences_all`` before 4.4).
    """
    editor = scene.sequence_editor
    if not scene.render.use_sequencer or editor is None:
        return False
    strips = getattr(editor, "strips_all", None)
    if strips is None:
        strips = getattr(editor, "sequences_all", ())
    return len(strips) > 0


def apply_overrides(scene: bpy.types.Scene, params: dict) -> bpy.types.Object | None:
    """Apply engine, samples, resolution and camera overrides; return the override camera or None."""
    render = scene.render
    engine = params["engine"]
    if engine is not None:
        # The engine enum is dynamic (add-on engines such as Cycles register at run time),
        # so RNA's static enum_items lists only part of it: assigning is the real check.
        try:
            render.engine = engine
        except TypeError as exc:
            raise TaskError(f"unknown engine {_quote(engine)}: {exc}") from None

    samples = params["samples"]
    if samples is not None:
        if render.engine == "CYCLES":
            _check_range(scene.cycles, "samples", samples, "samples")
            scene.cycles.samples = samples
        elif render.engine.startswith("BLENDER_EEVEE"):
            _check_range(scene.eevee, "taa_render_samples", samples, "samples")
            scene.eevee.taa_render_samples = samples
        else:
            print(f"renderfarm: samples ignored for engine {render.engine}", file=sys.stderr, flush=True)

    for key in ("resolution_percentage", "resolution_x", "resolution_y"):
        value = params[key]
        if value is not None:
            _check_range(render, key, value, key)
            setattr(render, key, value)

    name = params["camera"]
    if name is None:
        return None
    cameras = [obj for obj in scene.objects if obj.type == "CAMERA"]
    camera = next((obj for obj in cameras if obj.name == name), None)
    if camera is None:
        raise TaskError(
            f"unknown camera {_quote(name)} in scene {_quote(scene.name)}; "
            f"cameras in the scene: {_names([c.name for c in cameras])}"
        )
    scene.camera = camera
    # Markers bound to cameras switch scene.camera on every frame change and at render
    # time; unbind them so that the override holds (the file is never saved).
    for marker in scene.timeline_markers:
        marker.camera = None
    return camera


def check_camera(scene: bpy.types.Scene) -> None:
    """Raise TaskError when the scene cannot render for lack of a camera."""
    if scene.camera is not None or uses_sequencer(scene):
        return
    if any(marker.camera is not None for marker in scene.timeline_markers):
        return  # a marker binds a camera; checked again per frame
    raise TaskError(f"scene {_quote(scene.name)} has no camera")


def set_output(scene: bpy.types.Scene, output_format: str | None, output_dir: str) -> str:
    """Set the image format and the output pattern; return the pattern.

    ``output_format`` None keeps the file's format when it writes one image per frame,
    else falls back to PNG. Blender 5 refuses an image ``file_format`` while
    ``media_type`` is ``'VIDEO'`` (measured with bpy 5.0.1), so the media type goes first.
    """
    settings = scene.render.image_settings
    media = getattr(settings, "media_type", None)
    if output_format is None:
        if media in (None, "IMAGE", "MULTI_LAYER_IMAGE") and settings.file_format not in ("FFMPEG",):
            output_format = settings.file_format
        else:
            output_format = "PNG"
    if media is not None and media != "IMAGE" and output_format in OUTPUT_FORMATS:
        settings.media_type = "IMAGE"
    if settings.file_format != output_format:
        settings.file_format = output_format
    os.makedirs(output_dir, exist_ok=True)
    pattern = os.path.join(output_dir, FILE_PATTERN)
    render = scene.render
    render.filepath = pattern
    render.use_overwrite = True
    render.use_placeholder = False
    render.use_file_extension = True
    return pattern


def select_device(scene: bpy.types.Scene, device: str, cpu_fallback: bool) -> tuple[str, bool]:
    """Enable the Cycles ``device`` explicitly; return (the devices used, as logged; whether the
    render fell back to the CPU).

    ``--factory-startup`` (and a fresh bpy module) starts with no compute device configured,
    so nothing is left to the user's preferences: ``CyclesPreferences.compute_device_type`` is
    set to the backend, ``refresh_devices()`` lists what the driver offers, exactly the
    devices of that backend get ``use = True`` and ``scene.cycles.device`` becomes ``'GPU'``
    (Blender manual, Cycles > GPU rendering; measured with bpy 5.0.1: its backends are CUDA,
    OPTIX, HIP and ONEAPI, and assigning another raises TypeError). ``"CPU"`` sets
    ``compute_device_type = 'NONE'`` and ``scene.cycles.device = 'CPU'``.

    Engines other than Cycles choose their device themselves: logged, nothing changed.

    Raises:
        TaskError: (kind ``"device"``) the backend has no usable device and ``cpu_fallback``
            is false; raised before any frame renders, so the job fails fast with the reason.
    """
    if scene.render.engine != "CYCLES":
        used = f"{scene.render.engine} (device selection applies to Cycles only)"
        print(f"renderfarm: render devices: {used}", flush=True)
        emit("device", device=used, fallback=False)
        return used, False
    prefs = bpy.context.preferences.addons["cycles"].preferences
    problem = ""
    fallback = False
    if device != "CPU":
        try:
            prefs.compute_device_type = device
        except TypeError:
            problem = f"this Blender has no {device} support"
        if not problem:
            prefs.refresh_devices()
            gpus = [d for d in prefs.get_devices_for_type(device) if d.type == device]
            if not gpus:
                problem = f"no {device} device found (no such GPU, or its driver is missing)"
        if problem and not cpu_fallback:
            raise TaskError(
                f"cannot render on {device}: {problem}; the job does not allow falling back to the CPU",
                kind="device",
            )
        if not problem:
            for d in prefs.devices:
                d.use = d.type == device
            scene.cycles.device = "GPU"
            used = f"{device}: " + ", ".join(d.name for d in gpus)
            print(f"renderfarm: render devices: {used}", flush=True)
            emit("device", device=used, fallback=False)
            return used, False
        fallback = True
        print(f"renderfarm: warning: {problem}; rendering on the CPU as the job allows", flush=True)
    prefs.compute_device_type = "NONE"
    scene.cycles.device = "CPU"
    prefs.refresh_devices()
    cpu = next((d.name for d in prefs.devices if d.type == "CPU"), "") or platform.machine()
    used = f"CPU: {cpu} ({os.cpu_count()} threads)"
    print(f"renderfarm: render devices: {used}", flush=True)
    emit("device", device=used, fallback=fallback, reason=problem)
    return used, fallback


def write_manifest(path: str, frames: dict[int, str]) -> None:
    """Write ``{"frames": {"<frame>": "<path>"}}`` atomically (temp file, then ``os.replace``)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"frames": {str(f): p for f, p in frames.items()}}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- rendering


OUTSIDE = "//__outside_the_package__/"
"""Where a path that leaves the model's folder is pointed instead (a place that does not exist)."""


def _outside(path: str, root: str, library: object = None) -> bool:
    if not path:
        return False
    try:
        full = bpy.path.abspath(path, library=library)
    except Exception:
        full = path
    real = os.path.realpath(full)
    return real != root and not real.startswith(root + os.sep)


def confine_inputs(root: str) -> list[str]:
    """Point every external file a render would read outside ``root`` at a path that does not exist.

    Images, movie clips, sounds, caches (Alembic, volumes, mesh cache and ocean modifiers)
    and sequencer strips are read at render time, so re-pointing them before rendering
    keeps Blender from reading the render machine's own files through a hostile or stale
    absolute (or ``//../..``) path: such inputs render as missing, as the job asked
    (``allow_missing``). Libraries are read when the file opens; the server refuses
    models that link libraries outside their package. Packed data is left alone.

    Returns:
        The paths that were cut off, for the log.
    """
    root = os.path.realpath(root)
    cut: list[str] = []

    def fix(owner: object, attr: str, library: object = None) -> None:
        path = getattr(owner, attr, "")
        if isinstance(path, str) and _outside(path, root, library):
            cut.append(path)
            setattr(owner, attr, OUTSIDE + os.path.basename(path.rstrip("/\\")))

    for coll in (
        bpy.data.images,
        bpy.data.movieclips,
        bpy.data.sounds,
        bpy.data.cache_files,
        bpy.data.volumes,
    ):
        for block in coll:
            if getattr(block, "packed_file", None) is None:
                fix(block, "filepath", block.library)
    for obj in bpy.data.objects:
        for mod in obj.modifiers:
            for attr in ("filepath", "cache_directory"):
                if hasattr(mod, attr):
                    fix(mod, attr, obj.library)
    for scene in bpy.data.scenes:
        if scene.sequence_editor is None:
            continue
        for strip in scene.sequence_editor.strips_all:
            if strip.type == "MOVIE":
                fix(strip, "filepath", scene.library)
            elif strip.type == "IMAGE":
                fix(strip, "directory", scene.library)
    for path in cut:
        print(f"renderfarm: not reading {path!r}: it lies outside the model's package", flush=True)
    return cut


def render_frames(
    scene: bpy.types.Scene,
    pattern: str,
    paths: dict[int, str],
    camera: bpy.types.Object | None,
    tag: dict | None = None,
) -> None:
    """Render each frame of ``paths`` (frame -> absolute file path) to its path.

    ``camera`` (the override, or None) is re-applied after every ``frame_set``. Raises
    TaskError if the scene has no camera at a frame or Blender writes no file.
    """
    render = scene.render
    sequencer = uses_sequencer(scene)
    for frame, path in paths.items():
        emit("frame_start", frame=frame, **(tag or {}))
        started = time.monotonic()
        scene.frame_set(frame)
        if camera is not None:
            scene.camera = camera
        if scene.camera is None and not sequencer:
            raise TaskError(f"scene {_quote(scene.name)} has no camera at frame {frame}")
        if os.path.lexists(path):
            os.remove(path)  # a stale file must not pass for this attempt's output
        render.filepath = path
        try:
            result = bpy.ops.render.render(write_still=True, scene=scene.name)
        finally:
            render.filepath = pattern
        if "FINISHED" not in result:
            raise TaskError(f"render of frame {frame} ended with {sorted(result)}")
        if not os.path.isfile(path):
            raise TaskError(f"Blender did not write frame {frame} to {path}")
        emit(
            "frame_done", frame=frame, path=path, seconds=round(time.monotonic() - started, 3), **(tag or {})
        )


def check_frames(frames: list[int]) -> None:
    """Raise TaskError for a frame outside the range Blender's RNA declares for ``frame_current``."""
    rna_frame = bpy.types.Scene.bl_rna.properties["frame_current"]
    for f in frames:
        if not rna_frame.hard_min <= f <= rna_frame.hard_max:
            raise TaskError(
                f"frame {f} is outside Blender's range {rna_frame.hard_min}..{rna_frame.hard_max}"
            )


def prepare(params: dict) -> tuple[bpy.types.Scene, bpy.types.Object | None]:
    """Open the file and set up the scene once: scene, confinement, overrides, camera check, device.

    Returns:
        (the scene, the override camera or None).
    """
    open_blend(params["blend_file"])
    scene = select_scene(params["scene"])
    if params["confine_root"]:
        confine_inputs(params["confine_root"])
    camera = apply_overrides(scene, params)
    check_camera(scene)
    select_device(scene, params["device"], params["cpu_fallback"])
    return scene, camera


def render_task(
    scene: bpy.types.Scene,
    camera: bpy.types.Object | None,
    frames: list[int],
    output_dir: str,
    manifest_path: str,
    output_format: str | None,
    task: str | None = None,
) -> None:
    """Render ``frames`` into ``output_dir``: set the output, write the manifest, emit ``start``,
    each frame's events and ``done`` (each with ``task`` when given)."""
    check_frames(frames)
    tag = {"task": task} if task is not None else {}
    pattern = set_output(scene, output_format, output_dir)
    paths = {f: os.path.abspath(scene.render.frame_path(frame=f)) for f in frames}
    if len(set(paths.values())) != len(paths):
        raise TaskError("two frames resolve to the same output file")
    write_manifest(manifest_path, paths)
    emit(
        "start",
        frames=frames,
        scene=scene.name,
        camera=scene.camera.name if scene.camera is not None else None,
        **tag,
    )
    render_frames(scene, pattern, paths, camera, tag)
    emit("done", **tag)


def read_command(path: str) -> dict:
    """Load and check one warm-mode command file: ``{"quit": true}`` or ``{"task": str, "frames":
    [int, ...], "output_dir": str, "manifest_path": str}``; raise TaskError on anything malformed."""
    try:
        with open(path, encoding="utf-8") as fh:
            cmd = json.load(fh)
    except (OSError, ValueError) as exc:
        raise TaskError(f"cannot read command {path!r}: {exc}") from exc
    if not isinstance(cmd, dict):
        raise TaskError(f"command {path!r} is not a JSON object")
    if cmd.get("quit") is True:
        return cmd
    if not isinstance(cmd.get("task"), str) or not cmd["task"]:
        raise TaskError(f"command {path!r}: 'task' must be a non-empty string")
    for key in ("output_dir", "manifest_path"):
        if not isinstance(cmd.get(key), str) or not cmd[key]:
            raise TaskError(f"command {path!r}: {key!r} must be a non-empty string")
        cmd[key] = os.path.abspath(cmd[key])
    frames = cmd.get("frames")
    if (
        not isinstance(frames, list)
        or not frames
        or any(isinstance(f, bool) or not isinstance(f, int) for f in frames)
    ):
        raise TaskError(f"command {path!r}: 'frames' must be a non-empty list of integers")
    cmd["frames"] = list(dict.fromkeys(frames))
    return cmd


def serve(scene: bpy.types.Scene, camera: bpy.types.Object | None, params: dict) -> None:
    """Warm mode: render one command after another without reopening the file.

    Commands are files ``000001.json``, ``000002.json``... in ``params["command_dir"]``, each
    written whole (the agent renames it into place) and read once, in order. Emits ``ready``
    when the file is open, then per command ``task_start`` and the task's events; returns on a
    ``quit`` command (``bye``) or after ``idle_s`` seconds without a command (``idle``).
    """
    folder = params["command_dir"]
    emit("ready")
    seq = 0
    idle_since = time.monotonic()
    while True:
        seq += 1
        path = os.path.join(folder, f"{seq:06d}.json")
        while not os.path.exists(path):
            if time.monotonic() - idle_since > params["idle_s"]:
                emit("idle")
                return
            time.sleep(COMMAND_POLL_S)
        cmd = read_command(path)
        if cmd.get("quit"):
            emit("bye")
            return
        emit("task_start", task=cmd["task"])
        render_task(
            scene,
            camera,
            cmd["frames"],
            cmd["output_dir"],
            cmd["manifest_path"],
            params["output_format"],
            cmd["task"],
        )
        idle_since = time.monotonic()


def run(arg: str) -> None:
    """Do the whole task (or, with ``command_dir``, serve tasks) for the parameters named by ``arg``;
    raise on any error."""
    params = read_params(arg)
    check_frames(params["frames"])
    scene, camera = prepare(params)
    if params["command_dir"]:
        serve(scene, camera, params)
        return
    render_task(
        scene,
        camera,
        params["frames"],
        params["output_dir"],
        params["manifest_path"],
        params["output_format"],
    )


def _crash_report() -> None:
    """Have Python write its traceback of a fatal signal (SIGSEGV, SIGABRT...) to
    ``$TMPDIR/renderfarm.crash.txt``; the agent attaches it to the task's log. The bpy module
    writes no crash report of its own (measured with bpy 5.0.1); a Blender binary still writes
    ``<file>.crash.txt`` there too (faulthandler calls the previous handler)."""
    import faulthandler
    import tempfile

    try:
        fh = open(os.path.join(tempfile.gettempdir(), "renderfarm.crash.txt"), "w")
        faulthandler.enable(file=fh, all_threads=True)
    except OSError:
        faulthandler.enable()


def main() -> None:
    """Entry point: run the task; on any error print the traceback, emit ``error``, exit 1."""
    _crash_report()
    try:
        run(_argument())
    except TaskError as exc:
        message = str(exc)
        print(f"renderfarm: error: {message}", file=sys.stderr, flush=True)
        emit("error", message=message, kind=exc.kind)
        sys.exit(1)
    except BaseException as exc:
        traceback.print_exc()
        sys.stderr.flush()
        emit("error", message=f"{type(exc).__name__}: {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()
