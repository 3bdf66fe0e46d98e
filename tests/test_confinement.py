"""A model cannot make the farm read files outside its package (DESIGN: every .blend is hostile)."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from cli.client import ClientError
from tests.conftest import Farm

pytestmark = pytest.mark.blender

BUILD = textwrap.dedent(
    """
    import sys, bpy
    out, image, library = sys.argv[1], sys.argv[2], sys.argv[3]
    bpy.ops.wm.read_factory_settings(use_empty=True)
    s = bpy.context.scene
    if library != "-":
        with bpy.data.libraries.load(library, link=True) as (src, dst):
            dst.objects = ["LibCube"]
        s.collection.objects.link(dst.objects[0])
    bpy.ops.mesh.primitive_plane_add(size=4)
    plane = bpy.context.object
    mat = bpy.data.materials.new("Secret")
    tree = mat.node_tree
    tex = tree.nodes.new("ShaderNodeTexImage")
    tex.image = bpy.data.images.load(image)  # an absolute path of this machine
    emit = tree.nodes.new("ShaderNodeEmission")
    tree.links.new(tex.outputs["Color"], emit.inputs["Color"])
    tree.links.new(emit.outputs["Emission"], tree.nodes["Material Output"].inputs["Surface"])
    plane.data.materials.append(mat)
    bpy.ops.object.camera_add(location=(0, 0, 3))
    s.camera = bpy.context.object
    s.render.engine = "CYCLES"
    s.cycles.samples = 1
    s.render.resolution_x, s.render.resolution_y = 64, 64
    bpy.ops.wm.save_as_mainfile(filepath=out, relative_remap=False)
    """
)
LIB = textwrap.dedent(
    """
    import sys, bpy
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.ops.mesh.primitive_cube_add()
    bpy.context.object.name = "LibCube"
    bpy.ops.wm.save_as_mainfile(filepath=sys.argv[1])
    """
)


def _blender(code: str, *args: str) -> None:
    subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, timeout=120)


@pytest.fixture
def secret_image(tmp_path: Path) -> Path:
    path = tmp_path / "secret" / "green.png"
    path.parent.mkdir()
    Image.new("RGB", (16, 16), (0, 255, 0)).save(path)
    return path


async def test_absolute_image_paths_are_not_read_even_when_missing_files_are_allowed(
    farm: Farm, tmp_path: Path, secret_image: Path
) -> None:
    shot = tmp_path / "shot.blend"
    _blender(BUILD, str(shot), str(secret_image), "-")
    model = await farm.client.upload_model(shot)
    outside = [d for d in model["info"]["dependencies"] if d["outside_root"]]
    assert [d["path"] for d in outside] == [str(secret_image)]
    with pytest.raises(ClientError, match="not in it"):
        await farm.client.create_job(model_id=model["id"], frames="1")
    job = await farm.client.create_job(model_id=model["id"], frames="1", allow_missing=True)
    final = await farm.client.wait(job["id"], poll_s=0.2)
    assert final["state"] == "completed", final["message"]
    [frame] = (await farm.client.outputs(job["id"]))["frames"]
    async with farm.client.http.get(farm.url + frame["url"]) as r:
        with Image.open(io.BytesIO(await r.read())) as im:
            r_, g, b = im.convert("RGB").getpixel((32, 32))
    # the plane shows Blender's missing-image magenta, not the farm machine's green file
    assert r_ > g + 50 and b > g + 50, (r_, g, b)
    [task] = await farm.client.tasks(job["id"])
    assert any("outside the model's package" in line for line in task["log_tail"])


async def test_libraries_outside_the_package_are_always_refused(
    farm: Farm, tmp_path: Path, secret_image: Path
) -> None:
    lib = tmp_path / "secret" / "lib.blend"
    _blender(LIB, str(lib))
    shot = tmp_path / "shot.blend"
    _blender(BUILD, str(shot), str(secret_image), str(lib))
    model = await farm.client.upload_model(shot)
    for allow in (False, True):
        with pytest.raises(ClientError, match="links libraries by absolute paths") as err:
            await farm.client.create_job(model_id=model["id"], frames="1", allow_missing=allow)
        assert str(lib) in str(err.value)
