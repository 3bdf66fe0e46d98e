"""Thumbnails of finished frames as Blender icons (``bpy.utils.previews``), for the panel."""

from __future__ import annotations

from typing import Any

import bpy.utils.previews

_collection: list[Any] = []


def icon_id(path: str) -> int:
    """The icon id of the image at ``path`` (loaded once per path); 0 when it cannot be shown."""
    if not path:
        return 0
    if not _collection:
        _collection.append(bpy.utils.previews.new())
    pcoll = _collection[0]
    try:
        preview = pcoll[path] if path in pcoll else pcoll.load(path, path, "IMAGE")
    except (KeyError, RuntimeError, OSError):
        return 0
    return int(preview.icon_id)


def clear() -> None:
    """Free every loaded thumbnail (on unregister)."""
    while _collection:
        bpy.utils.previews.remove(_collection.pop())
