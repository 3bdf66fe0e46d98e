"""Render Farm: submit the open scene to a renderfarm server and get the frames back in Blender.

A Blender extension (see ``blender_manifest.toml``). The panel lives in Properties > Output >
Render Farm; the preferences hold the server URL and the login. Scripts call
``bpy.ops.render_farm.submit(frames="1-10", wait=True, download=True)``.

Only the standard library and the bundled blender-asset-tracer wheel are used, and nothing is
imported at module level, so the package's pure modules (:mod:`.client`, :mod:`.packing`,
:mod:`.worker`, :mod:`.state`) can be imported outside Blender.
"""

from __future__ import annotations

import atexit

_registered: list[object] = []


def register() -> None:
    """Register the preferences, panel and operators, and the timer that brings worker news."""
    import bpy

    from . import ops, packing, props, state, ui

    props.register()
    for cls in (*ops.CLASSES, *ui.CLASSES):
        bpy.utils.register_class(cls)
    state.set_reporter(ops.blender_report)
    state.on_redraw(ui.redraw_panels)
    bpy.app.timers.register(state.drain, first_interval=state.DRAIN_INTERVAL_S, persistent=True)
    _registered.append(state.drain)
    atexit.register(packing.remove_pending)  # Blender quitting mid-submission leaves no temporary


def unregister() -> None:
    """Stop polling, remove the timer, free thumbnails and unregister the classes."""
    import bpy

    from . import ops, packing, previews, props, state, ui

    ops.stop_watching()
    if state.FARM.submission is not None:
        state.FARM.submission.cancel.set()  # a submission in progress stops at its next block
    atexit.unregister(packing.remove_pending)
    packing.remove_pending()
    if bpy.app.timers.is_registered(state.drain):
        bpy.app.timers.unregister(state.drain)
    state.set_reporter(None)
    state._redraw.clear()
    state.FARM.__init__()  # type: ignore[misc]
    previews.clear()
    for cls in reversed((*ops.CLASSES, *ui.CLASSES)):
        bpy.utils.unregister_class(cls)
    props.unregister()
    _registered.clear()
