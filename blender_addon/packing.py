"""Pack a scene and everything it needs into one zip, with blender-asset-tracer (BAT).

Runs in a worker thread: nothing here imports ``bpy``. The main thread first saves a copy of
the open scene next to it (:func:`.submit.save_copy`), so unsaved changes are included and
the relative paths written in the file still resolve; this module packs that copy.

BAT (Blender Studio's packer, the one Flamenco uses) traces libraries, images, movie clips,
sounds, fonts, caches and volumes, including those of linked libraries. Files under the
project folder keep their relative place in the pack; files outside it go under
``_outside_project/`` and the paths written in the packed .blend files are rewritten to
point there (BAT's ``Packer``). A file that cannot be found is *missing*: it is reported
before anything is uploaded, and the pack goes on only when the artist allows it.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUTSIDE = "_outside_project"
"""Folder of the pack that holds files from outside the project (BAT's name)."""
STORED_SUFFIXES = {
    ".png",
    ".jpg",
    ".jpeg",
    ".exr",
    ".mp4",
    ".mov",
    ".mkv",
    ".webm",
    ".zip",
    ".abc",
    ".vdb",
    ".ogg",
    ".mp3",
    ".flac",
    ".webp",
    ".tif",
    ".tiff",
}
"""Files put in the zip as they are (already compressed, or large and not worth deflating)."""

StageProgress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: stage ``trace`` (files found so far, total 0), ``copy``
(bytes), ``zip`` (bytes)."""


class PackError(Exception):
    """The scene cannot be packed (the file is not a readable .blend, a folder cannot be written)."""


class MissingFiles(PackError):
    """Files the scene uses do not exist; nothing was uploaded.

    Attributes:
        missing: the missing files' absolute paths, sorted.
    """

    def __init__(self, missing: list[str]) -> None:
        self.missing = missing
        super().__init__(
            f"{len(missing)} file(s) the scene uses are missing: "
            + ", ".join(missing[:5])
            + (" ..." if len(missing) > 5 else "")
        )


class Canceled(PackError):
    """The artist canceled the submission while it was packing."""


@dataclass
class PackResult:
    """A packed scene.

    Attributes:
        zip_path: the zip to upload.
        main: the main .blend's path inside the zip (POSIX, relative).
        files: every file in the zip (POSIX, relative), sorted.
        missing: files the scene uses that were not found (absolute paths); empty unless allowed.
        outside: files from outside the project, packed under ``_outside_project/``.
        size_bytes: the zip's size in bytes.
    """

    zip_path: Path
    main: str
    files: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)
    size_bytes: int = 0


def _callback(progress: StageProgress | None, cancelled: Callable[[], bool] | None, packer: Any) -> Any:
    from blender_asset_tracer.pack import progress as bat_progress

    class Cb(bat_progress.Callback):
        found = 0

        def _check(self) -> None:
            if cancelled and cancelled():
                packer.abort("canceled")

        def trace_blendfile(self, filename: pathlib.Path) -> None:
            self.found += 1
            if progress:
                progress("trace", self.found, 0)
            self._check()

        def trace_asset(self, filename: pathlib.Path) -> None:
            self.trace_blendfile(filename)

        def transfer_progress(self, total_bytes: int, transferred_bytes: int) -> None:
            if progress:
                progress("copy", transferred_bytes, total_bytes)
            self._check()

    return Cb()


def pack_scene(
    blend: Path,
    project: Path,
    work_dir: Path,
    *,
    main_name: str | None = None,
    allow_missing: bool = False,
    progress: StageProgress | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> PackResult:
    """Pack ``blend`` (inside ``project``) and its dependencies into ``work_dir/<name>.zip``.

    Args:
        blend: the .blend to pack (the saved copy of the open scene).
        project: the project folder; ``blend`` must be inside it.
        work_dir: an empty folder of this submission (the pack is assembled in ``pack/``).
        main_name: the name the main .blend gets in the pack (the artist's file name, as
            ``blend`` is a temporary copy); kept as is if a packed file already has that name.
        allow_missing: pack although files are missing (they are listed in the result).
        progress: see :data:`StageProgress`.
        cancelled: polled while packing; when it returns true, :class:`Canceled` is raised.

    Raises:
        MissingFiles: files are missing and ``allow_missing`` is false (before any copy).
        Canceled: ``cancelled()`` became true.
        PackError: BAT could not read a .blend, or the pack could not be written.
    """
    from blender_asset_tracer.blendfile import exceptions as bat_exceptions
    from blender_asset_tracer.pack import Aborted, Packer

    target = work_dir / "pack"
    target.mkdir(parents=True, exist_ok=False)
    try:
        packer = Packer(blend, project, str(target))
    except (OSError, ValueError) as exc:
        raise PackError(f"cannot pack {blend.name}: {exc}") from None
    try:
        packer.progress_cb = _callback(progress, cancelled, packer)
        try:
            packer.strategise()
            missing = sorted(str(p) for p in packer.missing_files)
            if missing and not allow_missing:
                raise MissingFiles(missing)
            packer.execute()
        except Aborted:
            raise Canceled("the submission was canceled") from None
        except bat_exceptions.BlendFileError as exc:
            raise PackError(f"{blend.name} is not a .blend file BAT can read: {exc}") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PackError(f"packing {blend.name} failed: {exc}") from None
        main_path = Path(packer.output_path)
    finally:
        packer.close()
    (target / "pack-info.txt").unlink(missing_ok=True)  # BAT's note for humans; not part of the scene
    if main_name and main_name != main_path.name and not (main_path.parent / main_name).exists():
        main_path = main_path.rename(main_path.parent / main_name)
    main = main_path.relative_to(target).as_posix()
    zip_path = work_dir / (Path(main).stem + ".zip")
    files = zip_folder(target, zip_path, progress=progress, cancelled=cancelled)
    shutil.rmtree(target, ignore_errors=True)
    return PackResult(
        zip_path=zip_path,
        main=main,
        files=files,
        missing=missing,
        outside=[f for f in files if f.startswith(OUTSIDE + "/")],
        size_bytes=zip_path.stat().st_size,
    )


def zip_folder(
    folder: Path,
    zip_path: Path,
    *,
    progress: StageProgress | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> list[str]:
    """Zip every regular file under ``folder`` (paths relative, POSIX); returns them sorted.

    .blend files and other compressible files are deflated (level 1: fast, and .blend files
    shrink a lot); images, movies and caches are stored.

    Raises:
        Canceled: ``cancelled()`` became true (the partial zip is removed).
    """
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    total = sum(p.stat().st_size for p in paths)
    done = 0
    last = 0.0
    names = []
    try:
        with zipfile.ZipFile(zip_path, "w", allowZip64=True) as zf:
            for p in paths:
                name = p.relative_to(folder).as_posix()
                stored = p.suffix.lower() in STORED_SUFFIXES
                zf.write(
                    p,
                    name,
                    compress_type=zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED,
                    compresslevel=None if stored else 1,
                )
                names.append(name)
                done += p.stat().st_size
                if cancelled and cancelled():
                    raise Canceled("the submission was canceled")
                if progress and (time.monotonic() - last > 0.1 or done == total):
                    last = time.monotonic()
                    progress("zip", done, total)
    except BaseException:
        zip_path.unlink(missing_ok=True)
        raise
    return names


def remove_quietly(path: Path) -> None:
    """Delete a file or folder of ours, best effort: one already gone, or on a read-only file
    system, is left as it is."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass


_pending: set[Path] = set()
_pending_lock = threading.Lock()


def track(path: Path) -> None:
    """Remember a temporary file or folder of a submission in progress, so that
    :func:`remove_pending` deletes it if Blender quits (or the add-on is disabled) first:
    worker threads are daemon threads and do not get to clean up then."""
    with _pending_lock:
        _pending.add(path)


def untrack(path: Path) -> None:
    """Forget ``path`` (its submission removed it)."""
    with _pending_lock:
        _pending.discard(path)


def remove_pending() -> None:
    """Delete every tracked temporary (registered with ``atexit`` by the add-on)."""
    with _pending_lock:
        paths = list(_pending)
        _pending.clear()
    for path in paths:
        remove_quietly(path)
