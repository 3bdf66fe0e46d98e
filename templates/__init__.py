"""Blender Python scripts shipped with renderfarm.

The scripts in this folder run inside Blender (the bpy module or a Blender binary), never
in the farm's own processes, and import only bpy and the standard library:

* ``render_task.py``: renders one task's frames from a ``RenderParams`` JSON file;
* ``sample_scene.py``: builds the bundled demo scene (a .blend file).
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def template_path(name: str) -> Path:
    """Return the absolute path of the file ``name`` in this folder.

    ``name`` is a bare file name such as ``"render_task.py"``.

    Raises:
        ValueError: ``name`` is empty, ``.``/``..``, or holds a path separator (``/`` or ``\\``)
            or a NUL byte.
        FileNotFoundError: no such file in this folder.
    """
    if not name or name in (".", "..") or any(c in name for c in ("/", "\\", "\0")):
        raise ValueError(f"not a template name: {name!r}")
    path = _HERE / name
    if not path.is_file():
        raise FileNotFoundError(f"no template named {name!r} in {_HERE}")
    return path


__all__ = ["template_path"]
