"""The Render Farm panel in Properties > Output: settings, Render on Farm, the job, recent jobs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import bpy

from . import previews
from .props import login_entry, scene_settings
from .state import FARM, JobView, frame_ranges

if TYPE_CHECKING:
    from bpy.stub_internal.rna_enums import IconItems

STATE_ICONS: dict[str, IconItems] = {
    "done": "CHECKMARK",
    "completed": "CHECKMARK",
    "rendering": "RENDER_ANIMATION",
    "running": "RENDER_ANIMATION",
    "queued": "TIME",
    "failed": "ERROR",
    "canceled": "CANCEL",
}
MAX_RANGE_ROWS = 12
"""Rows of frame ranges the panel draws before summarising the rest."""


class RENDERFARM_PT_render_farm(bpy.types.Panel):
    """Submit the scene to the render farm."""

    bl_label = "Render Farm"
    bl_idname = "RENDERFARM_PT_render_farm"
    bl_space_type = "PROPERTIES"
    bl_region_type = "WINDOW"
    bl_context = "output"

    def draw(self, context: bpy.types.Context) -> None:
        """Login state, the submission's settings, the button and the submission's progress."""
        layout, scene = self.layout, context.scene
        if layout is None or scene is None:
            return
        layout.use_property_split = True
        layout.use_property_decorate = False
        settings = scene_settings(context)
        entry = login_entry(context)
        if FARM.auth_error or not entry:
            box = layout.box()
            box.label(text=FARM.auth_error or "Not logged in to the farm", icon="ERROR")
            box.operator("render_farm.login", text="Log In...", icon="USER")
        layout.prop(settings, "project")
        layout.prop(settings, "use_scene_frames")
        row = layout.row()
        if settings.use_scene_frames:
            row.label(
                text=f"Frames {scene.frame_start}-{scene.frame_end}"
                + (f" step {scene.frame_step}" if scene.frame_step > 1 else "")
            )
        else:
            row.prop(settings, "frames")
        layout.prop(settings, "chunk_size")
        layout.prop(settings, "priority")
        layout.prop(settings, "device")
        layout.prop(settings, "samples")
        layout.prop(settings, "output_format")
        layout.prop(settings, "allow_missing")
        layout.prop(settings, "download_dir")
        sub = FARM.submission
        row = layout.row()
        row.scale_y = 1.5
        row.enabled = not (sub and sub.busy)
        row.operator("render_farm.submit", text="Render on Farm", icon="RENDER_ANIMATION")
        if sub is None:
            return
        col = layout.column()
        if sub.busy:
            row = col.row()
            row.progress(factor=sub.progress, text=sub.text or sub.stage.title())
            row.operator("render_farm.cancel_submission", text="", icon="X")
            return
        icon: IconItems = {"submitted": "CHECKMARK", "canceled": "CANCEL"}.get(sub.stage, "ERROR")  # type: ignore[assignment]
        for i, line in enumerate(_wrap(sub.text, 60)):
            col.label(text=line, icon=icon if i == 0 else "BLANK1")
        if sub.stage == "missing":
            for path in sub.missing[:10]:
                col.label(text=path, icon="LIBRARY_DATA_BROKEN")
            if len(sub.missing) > 10:
                col.label(text=f"... and {len(sub.missing) - 10} more")
            col.label(text="Tick Allow Missing Files to submit anyway", icon="INFO")


def _wrap(text: str, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return [*lines, line] if line else lines or [""]


def draw_job(layout: bpy.types.UILayout, view: JobView) -> None:
    """One job: state, progress bar, frames by state, thumbnail, Download, Open, Cancel."""
    s = view.summary
    col = layout.column()
    title = f"{s.get('name') or view.job_id}  ({view.job_id})"
    col.label(text=title, icon=STATE_ICONS.get(view.state, "QUESTION"))
    if s:
        done, total = s.get("frames_done", 0), s.get("frame_count", 0)
        col.progress(
            factor=float(s.get("progress", 0)) / 100.0, text=f"{view.state}: {done} of {total} frames"
        )
        if s.get("message"):
            for line in _wrap(str(s["message"]), 60):
                col.label(text=line)
    if view.error:
        col.label(text=view.error, icon="ERROR")
    ranges = frame_ranges(view.frame_states)
    if ranges:
        grid = col.grid_flow(columns=2, even_columns=True, align=True)
        for state, span in ranges[:MAX_RANGE_ROWS]:
            grid.label(text=f"{span}: {state}", icon=STATE_ICONS.get(state, "DOT"))
        if len(ranges) > MAX_RANGE_ROWS:
            col.label(text=f"... {len(ranges) - MAX_RANGE_ROWS} more ranges")
    icon = previews.icon_id(view.thumbnail)
    if icon:
        col.template_icon(icon_value=icon, scale=8.0)
    if view.thumbnail_frame is not None:
        col.label(text=f"Latest finished frame: {view.thumbnail_frame}", icon="IMAGE_DATA")
    row = col.row(align=True)
    op = row.operator("render_farm.download", text="Download", icon="IMPORT")
    op.job_id = view.job_id
    sub = row.row(align=True)
    sub.enabled = view.latest_frame is not None
    op = sub.operator("render_farm.open_image", text="Open in Image Editor", icon="IMAGE")
    op.job_id = view.job_id
    sub = row.row(align=True)
    sub.enabled = not view.finished
    op = sub.operator("render_farm.cancel_job", text="Cancel", icon="CANCEL")
    op.job_id = view.job_id
    if view.download_text:
        col.label(text=view.download_text, icon="FILE_FOLDER")


class RENDERFARM_PT_job(bpy.types.Panel):
    """The job the panel follows."""

    bl_label = "Job"
    bl_idname = "RENDERFARM_PT_job"
    bl_parent_id = "RENDERFARM_PT_render_farm"
    bl_space_type = "PROPERTIES"
    bl_region_type = "WINDOW"
    bl_context = "output"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        """Shown once a job is followed."""
        return bool(FARM.active_job)

    def draw(self, context: bpy.types.Context) -> None:
        """See :func:`draw_job`."""
        if self.layout is not None:
            draw_job(self.layout, FARM.view(FARM.active_job))


class RENDERFARM_PT_recent(bpy.types.Panel):
    """Your recent jobs."""

    bl_label = "Recent Jobs"
    bl_idname = "RENDERFARM_PT_recent"
    bl_parent_id = "RENDERFARM_PT_render_farm"
    bl_space_type = "PROPERTIES"
    bl_region_type = "WINDOW"
    bl_context = "output"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context: bpy.types.Context) -> None:
        """A refresh button and one row per job (a button shows it above)."""
        layout = self.layout
        if layout is None:
            return
        layout.operator("render_farm.refresh_jobs", icon="FILE_REFRESH")
        if FARM.recent_error:
            layout.label(text=FARM.recent_error, icon="ERROR")
        for job in FARM.recent:
            row = layout.row(align=True)
            state = str(job.get("state", ""))
            row.label(text=f"{job.get('name') or job['id']}", icon=STATE_ICONS.get(state, "QUESTION"))
            row.label(text=f"{state} {float(job.get('progress', 0)):.0f}%")
            op = row.operator("render_farm.show_job", text="", icon="VIEWZOOM")
            op.job_id = str(job["id"])


CLASSES = (RENDERFARM_PT_render_farm, RENDERFARM_PT_job, RENDERFARM_PT_recent)


def redraw_panels() -> None:
    """Tag every Properties editor and Preferences window for redraw (after news from a worker)."""
    wm = bpy.context.window_manager
    if wm is None:
        return
    for window in wm.windows:
        for area in window.screen.areas:
            if area.type in ("PROPERTIES", "PREFERENCES"):
                area.tag_redraw()
