"""The add-on's preferences and the per-scene settings of the Render Farm panel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bpy
from bpy.props import BoolProperty, EnumProperty, IntProperty, PointerProperty, StringProperty

from . import credentials
from .client import FarmError, normalise_server
from .state import FARM

PACKAGE = __package__ or "render_farm"
DEVICES = [
    ("ANY", "Any", "An agent's GPU if it has one, else its CPU"),
    ("GPU", "GPU", "Only agents with a GPU (CUDA, OptiX, HIP, oneAPI or Metal)"),
    ("CPU", "CPU", "Only on CPUs"),
]
FORMATS = [
    ("PNG", "PNG", "8-bit PNG frames"),
    ("OPEN_EXR", "OpenEXR", "Float OpenEXR frames"),
    ("JPEG", "JPEG", "JPEG frames"),
]


def user_folder() -> Path:
    """The extension's own writable folder (credentials, thumbnails)."""
    try:
        return Path(bpy.utils.extension_path_user(PACKAGE, create=True))
    except (ValueError, AttributeError):  # loaded as a legacy add-on, not an extension
        return Path(bpy.utils.user_resource("CONFIG", path="render_farm", create=True))


def token_store() -> credentials.TokenStore:
    """Where personal API tokens are kept (see :mod:`.credentials`)."""
    return credentials.TokenStore(user_folder())


def prefs(context: bpy.types.Context | None = None) -> RenderFarmPreferences:
    """This add-on's preferences."""
    ctx = context or bpy.context
    assert ctx.preferences is not None
    return ctx.preferences.addons[PACKAGE].preferences  # type: ignore[return-value]


def server_url(context: bpy.types.Context | None = None) -> str:
    """The preferences' server URL, normalised (``http://farm:3000``).

    Raises:
        FarmError: (``refused``) the URL is empty or not an http(s) URL.
    """
    raw = prefs(context).server_url
    if not raw.strip():
        raise FarmError("invalid", "no farm server is set: open the add-on's preferences and set Server URL")
    return normalise_server(raw)


def login_entry(context: bpy.types.Context | None = None) -> dict[str, Any] | None:
    """The stored token entry of the preferences' server, or None."""
    try:
        return token_store().get(server_url(context))
    except (FarmError, ValueError):  # no server set, or a URL that is not one: drawn as logged out
        return None


def _project_search(self: Any, context: bpy.types.Context, edit_text: str) -> list[str]:
    return [p for p in FARM.projects if edit_text.lower() in p.lower()]


class RenderFarmPreferences(bpy.types.AddonPreferences):
    """Server URL, login and default project. The token is kept apart from the preferences
    (see :mod:`.credentials`); the password is never stored."""

    bl_idname = PACKAGE

    server_url: StringProperty(
        name="Server URL",
        description="The farm's address, such as http://farm.studio.lan:3000",
        default="http://127.0.0.1:3000",
    )
    username: StringProperty(name="User Name", description="Your farm user name")
    default_project: StringProperty(
        name="Default Project",
        description="The project new scenes submit to (empty: your only project)",
        search=_project_search,
    )

    def draw(self, context: bpy.types.Context) -> None:
        """Server, login state and buttons."""
        layout = self.layout
        layout.prop(self, "server_url")
        entry = login_entry(context)
        row = layout.row()
        if entry:
            row.label(
                text=f"Logged in as {entry.get('username', '?')} (token until "
                f"{str(entry.get('expires_at') or '?')[:10]})",
                icon="CHECKMARK",
            )
            row.operator("render_farm.logout", text="Log Out")
        else:
            row.prop(self, "username")
            row.operator("render_farm.login", text="Log In...")
        if FARM.auth_error:
            layout.label(text=FARM.auth_error, icon="ERROR")
        row = layout.row()
        row.operator("render_farm.test_connection", icon="LINKED")
        if FARM.connection:
            layout.label(text=FARM.connection)
        layout.prop(self, "default_project")


class RenderFarmSceneSettings(bpy.types.PropertyGroup):
    """The Render Farm panel's settings, saved with the scene."""

    project: StringProperty(
        name="Project",
        description="Project to submit to (empty: the preferences' default project)",
        search=_project_search,
    )
    use_scene_frames: BoolProperty(
        name="Scene Frame Range", description="Render the scene's frame range and step", default=True
    )
    frames: StringProperty(
        name="Frames", description="Frames to render: 1-10, 1-10,20-25, 1-99x2 (every 2nd), -5-5", default="1"
    )
    chunk_size: IntProperty(name="Chunk Size", description="Frames per task", default=1, min=1, max=10000)
    priority: IntProperty(name="Priority", description="Higher renders first", default=0, min=-100, max=100)
    device: EnumProperty(name="Device", items=DEVICES, default="ANY")
    samples: IntProperty(
        name="Samples",
        description="Override the render samples (0: the scene's own)",
        default=0,
        min=0,
        max=1_000_000,
    )
    output_format: EnumProperty(name="Format", items=FORMATS, default="PNG")
    allow_missing: BoolProperty(
        name="Allow Missing Files",
        description="Submit even though files the scene uses are missing (they render as Blender shows "
        "missing files)",
        default=False,
    )
    download_dir: StringProperty(
        name="Download To",
        description="Folder frames download into, one sub-folder per job",
        default="//render_farm/",
        subtype="DIR_PATH",
    )


class RenderFarmSession(bpy.types.PropertyGroup):
    """Results scripts can read after ``bpy.ops.render_farm.submit`` (window manager, not saved)."""

    last_job_id: StringProperty(name="Last Job", description="The job the last submission created")
    last_state: StringProperty(name="Last State", description="That job's state when last seen")
    last_download_dir: StringProperty(name="Last Download Folder", subtype="DIR_PATH")


CLASSES = (RenderFarmPreferences, RenderFarmSceneSettings, RenderFarmSession)


def scene_settings(context: bpy.types.Context) -> RenderFarmSceneSettings:
    """The Render Farm panel's settings of the context's scene.

    Raises:
        FarmError: (``refused``) there is no scene.
    """
    if context.scene is None:
        raise FarmError("refused", "there is no scene to render")
    return context.scene.render_farm  # type: ignore[attr-defined]


def session(context: bpy.types.Context) -> RenderFarmSession | None:
    """``window_manager.render_farm`` (what scripts read after a submission), if there is a window manager."""
    wm = context.window_manager
    return wm.render_farm if wm is not None else None  # type: ignore[attr-defined]


def register() -> None:
    """Register the classes and the ``scene.render_farm`` / ``window_manager.render_farm`` pointers."""
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.render_farm = PointerProperty(type=RenderFarmSceneSettings)  # type: ignore[attr-defined,func-returns-value]
    bpy.types.WindowManager.render_farm = PointerProperty(type=RenderFarmSession)  # type: ignore[attr-defined,func-returns-value]


def unregister() -> None:
    """Undo :func:`register`."""
    del bpy.types.WindowManager.render_farm  # type: ignore[attr-defined]
    del bpy.types.Scene.render_farm  # type: ignore[attr-defined]
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
