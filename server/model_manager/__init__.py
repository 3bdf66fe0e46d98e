"""The model manager: checks uploaded models (.blend or .zip) and builds their metadata.

Entry point: :func:`ingest`. The parts are usable alone: :func:`read_blend_header`
(magic, compression, version, block sanity via BAT), :func:`check_zip` /
:func:`extract_zip` (safe paths, zip-bomb caps), :func:`find_dependencies` (BAT's
tracer, confined to the model's folder) and :func:`inspect_blend` (Blender's view:
scenes, cameras, frame range, output, missing files).
"""

from .archive import ZipEntry, check_zip, extract_zip, safe_entry_name
from .blendfile import BlendHeader, check_unpacked_size, format_version, read_blend_header, sniff
from .deps import Dependency, DependencyReport, find_dependencies
from .errors import ModelRejected
from .inspect import inspect_blend
from .limits import ModelLimits
from .manager import FILES_DIR, ModelInfo, ingest, pick_main, safe_blend_filename

__all__ = [
    "FILES_DIR",
    "BlendHeader",
    "Dependency",
    "DependencyReport",
    "ModelInfo",
    "ModelLimits",
    "ModelRejected",
    "ZipEntry",
    "check_unpacked_size",
    "check_zip",
    "extract_zip",
    "find_dependencies",
    "format_version",
    "ingest",
    "inspect_blend",
    "pick_main",
    "read_blend_header",
    "safe_blend_filename",
    "safe_entry_name",
    "sniff",
]
