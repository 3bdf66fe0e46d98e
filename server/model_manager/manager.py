"""Ingest one uploaded model: check it, unpack it, describe it.

``ingest`` is what the HTTP layer calls once the upload is on disk. It decides by
content (magic bytes), not by the file name: a .blend (plain, gzip or zstd) or
a zip. The result lives in ``dest_dir/files/`` (the model's root, as render
nodes will see it) and is described by a :class:`ModelInfo`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from node_agent.executor.base import Executor

from .archive import ZipEntry, extract_zip, safe_entry_name
from .blendfile import BlendHeader, read_blend_header, sniff
from .deps import find_dependencies
from .errors import ModelRejected
from .inspect import inspect_blend
from .limits import ModelLimits

FILES_DIR = "files"
"""Sub-folder of ``dest_dir`` that holds the model's files (its root)."""

_NAME_MAX_BYTES = 255
_IGNORED_PREFIXES = ("__MACOSX/",)


@dataclass
class ModelInfo:
    """What the model manager knows about an accepted model.

    Attributes:
        kind: ``"blend"`` or ``"zip"``.
        filename: the uploaded file's name, cleaned: base name only, no control
            characters, NFC (for a .blend, the name it is stored under, = ``main``;
            for a zip with an unusable name, ``"model.zip"``).
        main: path of the main .blend, relative to ``files/`` (POSIX).
        size_bytes: size of the upload, in bytes.
        unpacked_bytes: bytes under ``files/`` (the extracted zip, or the .blend).
        files: paths of the files under ``files/`` (relative, POSIX), sorted.
        version: version of Blender that saved the main .blend, from its header
            (``"2.79"``, ``"5.0"``); ``version_int`` the same as a number (279, 500).
        compression: the main .blend's compression: ``"none"``, ``"gzip"``, ``"zstd"``.
        pointer_size: 4 or 8 (bytes), from the header.
        endianness: ``"little"`` or ``"big"``, from the header.
        dependencies: :meth:`Dependency.to_dict` of each dependency.
        missing: paths (as written in the .blend) of missing dependencies, each
            once: those BAT found missing, libraries Blender found missing, and
            images Blender could not find.
        dependency_error: why the dependency trace stopped early, or None.
        blender_version: version the file was saved with, per Blender
            (``bpy.data.version``, e.g. ``[2, 79, 2]``).
        active_scene: the scene Blender opens the file on.
        scenes: one dict per scene (camera, frame range, fps, resolution,
            engine, samples, output path/format, sequencer, renderable, problem).
        libraries: ``{name, filepath, missing}`` per linked library, per Blender.
        images_missing: image paths Blender could not find.
    """

    kind: str
    filename: str
    main: str
    size_bytes: int
    unpacked_bytes: int
    files: list[str]
    version: str
    version_int: int
    compression: str
    pointer_size: int
    endianness: str
    dependencies: list[dict[str, Any]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    dependency_error: str | None = None
    blender_version: list[int] | None = None
    active_scene: str | None = None
    scenes: list[dict[str, Any]] = field(default_factory=list)
    libraries: list[dict[str, Any]] = field(default_factory=list)
    images_missing: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The model's metadata as a JSON-ready dict (the fields above)."""
        return asdict(self)


def _clean_name(filename: str) -> str:
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    base = unicodedata.normalize("NFC", "".join(c for c in base if unicodedata.category(c)[0] != "C"))
    return base.strip()


def safe_blend_filename(filename: str) -> str:
    """The name a single uploaded .blend is stored under: the base name, cleaned.

    Keeps non-ASCII letters (``basic_file_ñønæščii.blend``, NFC-normalised),
    drops any folder part (``/`` or ``\\``) and control characters, and adds
    ``.blend`` when the name lacks it (the content was already found to be a .blend).

    Raises:
        ModelRejected: 400 (field ``"file"``) for an empty name, ``.``/``..``,
            or a name starting with a dot.
    """
    base = _clean_name(filename)
    if not base or base in (".", "..") or base.startswith("."):
        raise ModelRejected(400, f"unusable file name {filename!r}", "file")
    if not base.lower().endswith(".blend"):
        base += ".blend"
    while len(base.encode("utf-8")) > _NAME_MAX_BYTES:
        stem = base[: -len(".blend")]
        base = stem[:-1] + ".blend"
    return base


def pick_main(entries: list[ZipEntry], main: str | None) -> str:
    """Choose the main .blend of a zip.

    Args:
        entries: the zip's checked entries.
        main: the client's choice (a path inside the zip), or None.

    Returns:
        ``main`` (cleaned like an entry name) when given; else the only .blend
        at the shallowest depth (macOS ``__MACOSX/`` and ``._*`` files ignored).

    Raises:
        ModelRejected: 400 with field ``"main"`` when ``main`` is not a .blend in
            the zip, when no .blend exists, or when several share the shallowest
            depth (the message names them).
    """
    blends = [
        e.name
        for e in entries
        if not e.is_dir
        and e.name.lower().endswith(".blend")
        and not e.name.startswith(_IGNORED_PREFIXES)
        and not PurePosixPath(e.name).name.startswith("._")
    ]
    if main is not None:
        try:
            wanted = safe_entry_name(main)
        except ModelRejected as exc:
            raise ModelRejected(400, f"main {main!r} is not a path inside the zip", "main") from exc
        if wanted not in blends:
            raise ModelRejected(400, f"main {main!r} is not a .blend file in the zip", "main")
        return wanted
    if not blends:
        raise ModelRejected(400, "the zip holds no .blend file", "main")
    depth = min(name.count("/") for name in blends)
    shallowest = sorted(name for name in blends if name.count("/") == depth)
    if len(shallowest) > 1:
        raise ModelRejected(
            400,
            "the zip holds several .blend files at the same depth; say which is the main one: "
            + ", ".join(shallowest),
            "main",
        )
    return shallowest[0]


def _listing(root: Path) -> tuple[list[str], int]:
    files: list[str] = []
    total = 0
    for folder, _dirs, names in os.walk(root):
        for name in names:
            path = Path(folder, name)
            files.append(path.relative_to(root).as_posix())
            total += path.lstat().st_size
    return sorted(files), total


async def ingest(
    upload: Path,
    filename: str,
    dest_dir: Path,
    limits: ModelLimits,
    executor: Executor,
    main: str | None = None,
) -> ModelInfo:
    """Check an uploaded model, place its files in ``dest_dir/files/`` and describe it.

    Steps: size cap; kind by magic (.blend plain/gzip/zstd, or zip; else 415);
    a zip is checked and extracted and its main .blend picked (:func:`pick_main`),
    a .blend is copied under :func:`safe_blend_filename`; the main .blend's header
    is read (:func:`read_blend_header`), its dependencies traced
    (:func:`find_dependencies`, root ``files/``), and Blender inspects it
    (:func:`inspect_blend`, at most ``limits.max_blend_inspect_s`` seconds).

    Args:
        upload: the uploaded file, left in place (it is copied or read, never moved).
        filename: the client's file name (used for a single .blend's name only).
        dest_dir: the model's folder; ``files/`` is created in it and must not exist.
        limits: the caps.
        executor: a render executor, for the Blender inspection.
        main: for a zip, the path of the main .blend inside it (ignored for a .blend).

    Returns:
        The :class:`ModelInfo`.

    Raises:
        ModelRejected: 400, 413, 415 or 422 (see :class:`ModelRejected`); then
            ``dest_dir/files/`` and anything else this call made are removed.
    """
    files_dir = dest_dir / FILES_DIR
    if files_dir.exists():
        raise FileExistsError(f"{files_dir} already exists")
    size = upload.stat().st_size
    if size > limits.max_upload_bytes:
        raise ModelRejected(413, f"the upload is {size} bytes, more than {limits.max_upload_bytes}")
    kind = sniff(upload)
    if kind is None:
        raise ModelRejected(415, "not a .blend file or zip archive (unrecognised content)")
    made_dest = not dest_dir.exists()
    dest_dir.mkdir(parents=True, exist_ok=True)
    cap = limits.max_unpacked_bytes
    header: BlendHeader
    try:
        if kind == "zip":
            entries = await asyncio.to_thread(extract_zip, upload, files_dir, limits)
            main_rel = pick_main(entries, main)
            header = await asyncio.to_thread(read_blend_header, files_dir / main_rel, max_unpacked_bytes=cap)
        else:
            # The header first: a corrupt or hostile .blend is refused before it is copied.
            main_rel = safe_blend_filename(filename)
            header = await asyncio.to_thread(read_blend_header, upload, max_unpacked_bytes=cap)
            files_dir.mkdir()
            await asyncio.to_thread(shutil.copyfile, upload, files_dir / main_rel)
        main_path = files_dir / main_rel
        report = await asyncio.to_thread(find_dependencies, main_path, files_dir, max_unpacked_bytes=cap)
        inspection = await inspect_blend(
            main_path, dest_dir / ".work", executor, timeout_s=limits.max_blend_inspect_s
        )
    except BaseException:
        shutil.rmtree(files_dir, ignore_errors=True)
        shutil.rmtree(dest_dir / ".work", ignore_errors=True)
        if made_dest:
            with contextlib.suppress(OSError):
                dest_dir.rmdir()
        raise
    shutil.rmtree(dest_dir / ".work", ignore_errors=True)

    listing, unpacked = await asyncio.to_thread(_listing, files_dir)
    libraries = [lib for lib in inspection.get("libraries", []) if isinstance(lib, dict)]
    images_missing = [str(p) for p in inspection.get("images_missing", [])]
    missing = list(
        dict.fromkeys(
            [*report.missing]
            + [str(lib.get("filepath")) for lib in libraries if lib.get("missing")]
            + images_missing
        )
    )
    if kind == "zip":
        shown = _clean_name(filename)
        shown = shown if shown and not shown.startswith(".") else "model.zip"
    else:
        shown = main_rel
    return ModelInfo(
        kind="zip" if kind == "zip" else "blend",
        filename=shown[:255],
        main=main_rel,
        size_bytes=size,
        unpacked_bytes=unpacked,
        files=listing,
        version=header.version,
        version_int=header.version_int,
        compression=header.compression,
        pointer_size=header.pointer_size,
        endianness=header.endianness,
        dependencies=[d.to_dict() for d in report.deps],
        missing=missing,
        dependency_error=report.error,
        blender_version=inspection.get("blender_version"),
        active_scene=inspection.get("active_scene"),
        scenes=inspection["scenes"],
        libraries=libraries,
        images_missing=images_missing,
    )
