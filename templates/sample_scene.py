"""Build the bundled demo scene and save it as a .blend file.

Run with the bpy module or a Blender binary::

    python sample_scene.py OUT.blend
    blender -b --factory-startup --python-exit-code 1 --python sample_scene.py -- OUT.blend

The scene is built from scratch (``bpy.ops.wm.read_factory_settings(use_empty=True)``),
so the result does not depend on the user's preferences or startup file:

* frames 1-24 at 24 fps; a cube that moves across the view, spins and changes colour
  (red to blue), so every frame differs visibly; the spin extrapolates linearly, so
  frames outside 1-24 (negative ones included) differ too;
* a camera (scene camera), a sun light, a ground plane;
* Cycles on the CPU, 16 samples, no denoising, 320x240 at 100 %, PNG output
  (RGB, 8 bit) to ``//frames/frame_######``.

A frame takes about 1 s to render on one CPU core of the development machine (bpy 5.0.1).
The file is saved uncompressed. Standard library and bpy only: this script runs in
Blender's own Python.
"""

from __future__ import annotations

import math
import os
import sys
import traceback

import bpy

FRAME_START = 1
FRAME_END = 24


def _argument() -> str:
    """Return the output path: the first argument after ``--``, else ``argv[1]``."""
    argv = sys.argv
    if "--" in argv:
        rest = argv[argv.index("--") + 1 :]
    else:
        rest = argv[1:]
    if len(rest) != 1:
        raise SystemExit("usage: sample_scene.py OUT.blend")
    return os.path.abspath(rest[0])


def _mesh_object(name: str, verts: list, faces: list) -> bpy.types.Object:
    mesh = bpy.data.meshes.new(name)
    mesh.from_pydata(verts, [], faces)
    mesh.update()
    obj = bpy.data.objects.new(name, mesh)
    bpy.context.scene.collection.objects.link(obj)
    return obj


def _material(name: str, rgba: tuple) -> bpy.types.Material:
    mat = bpy.data.materials.new(name)
    bsdf = mat.node_tree.nodes.get("Principled BSDF")
    bsdf.inputs["Base Color"].default_value = rgba
    bsdf.inputs["Roughness"].default_value = 0.5
    return mat


def _linear_extrapolation(id_data: bpy.types.ID, data_path: str) -> None:
    """Make the F-curves of ``data_path`` in ``id_data``'s action extrapolate linearly.

    Blender 5 actions are layered: F-curves live in the channel bag of the action slot
    (``bpy_extras.anim_utils.action_get_channelbag_for_slot``); ``Action.fcurves`` is gone.
    """
    from bpy_extras import anim_utils

    anim = id_data.animation_data
    channelbag = anim_utils.action_get_channelbag_for_slot(anim.action, anim.action_slot)
    for fcurve in channelbag.fcurves:
        if fcurve.data_path == data_path:
            fcurve.extrapolation = "LINEAR"


def build(path: str) -> None:
    """Build the demo scene and save it uncompressed at ``path`` (absolute)."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.name = "Demo"
    scene.frame_start = FRAME_START
    scene.frame_end = FRAME_END
    scene.render.fps = 24

    # Ground plane, 20 m square, grey.
    ground = _mesh_object("Ground", [(-10, -10, 0), (10, -10, 0), (10, 10, 0), (-10, 10, 0)], [(0, 1, 2, 3)])
    ground.data.materials.append(_material("GroundMat", (0.6, 0.6, 0.6, 1.0)))

    # A 1 m cube standing on the ground.
    h = 0.7
    verts = [(x, y, z) for x in (-h, h) for y in (-h, h) for z in (-h, h)]
    faces = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    cube = _mesh_object("Cube", verts, faces)
    cube_mat = _material("CubeMat", (0.8, 0.05, 0.05, 1.0))
    cube.data.materials.append(cube_mat)

    # Animation: move from left to right, spin, and turn from red to blue.
    color = cube_mat.node_tree.nodes["Principled BSDF"].inputs["Base Color"]
    for frame, x, angle, rgba in (
        (FRAME_START, -2.2, 0.0, (0.8, 0.05, 0.05, 1.0)),
        (FRAME_END, 2.2, math.pi, (0.05, 0.1, 0.8, 1.0)),
    ):
        cube.location = (x, 0.0, h)
        cube.rotation_euler = (0.0, 0.0, angle)
        cube.keyframe_insert("location", frame=frame)
        cube.keyframe_insert("rotation_euler", frame=frame)
        color.default_value = rgba
        color.keyframe_insert("default_value", frame=frame)
    _linear_extrapolation(cube, "rotation_euler")

    # Camera looking at the cube from the front, slightly above.
    cam_data = bpy.data.cameras.new("Camera")
    cam_data.lens = 35
    camera = bpy.data.objects.new("Camera", cam_data)
    scene.collection.objects.link(camera)
    camera.location = (0.0, -7.5, 3.0)
    camera.rotation_euler = (math.radians(74), 0.0, 0.0)
    scene.camera = camera

    # Sun light and a dim grey world.
    sun_data = bpy.data.lights.new("Sun", type="SUN")
    sun_data.energy = 3.0
    sun = bpy.data.objects.new("Sun", sun_data)
    scene.collection.objects.link(sun)
    sun.rotation_euler = (math.radians(40), math.radians(15), math.radians(30))
    world = bpy.data.worlds.new("World")
    world.node_tree.nodes["Background"].inputs["Color"].default_value = (0.05, 0.05, 0.08, 1.0)
    scene.world = world

    # Render settings.
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = 16
    scene.cycles.use_denoising = False
    scene.render.resolution_x = 320
    scene.render.resolution_y = 240
    scene.render.resolution_percentage = 100
    settings = scene.render.image_settings
    settings.media_type = "IMAGE"
    settings.file_format = "PNG"
    settings.color_mode = "RGB"
    settings.color_depth = "8"
    scene.render.filepath = "//frames/frame_######"

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    bpy.ops.wm.save_as_mainfile(filepath=path, compress=False)


def main() -> None:
    """Entry point: build the scene; exit 1 with a traceback on any error."""
    try:
        path = _argument()
        build(path)
        print(f"sample scene saved: {path}", flush=True)
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        sys.exit(1)


if __name__ == "__main__":
    main()
