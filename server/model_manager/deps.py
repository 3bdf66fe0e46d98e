"""Dependencies of a .blend file (libraries, images, caches...), traced with BAT.

blender-asset-tracer (BAT, the packer of Blender Studio's farm) walks the file's
blocks and yields one ``BlockUsage`` per external file. This module turns those
into :class:`Dependency` records relative to the model's root folder, and adds
what a farm needs on top of BAT:

* the trace never opens a file outside ``root`` (a hostile .blend may link
  ``/etc/...``, a FIFO or another user's model): such a library is reported,
  marked outside the root and missing, and not followed;
* a dependency outside ``root`` is always ``missing``: only the uploaded files
  reach a render node, and the server's own disk is not probed for it;
* paths are resolved as Blender resolves them (``BLI_path_abs``): ``//`` is the
  folder of the .blend that holds the path, backslashes are separators, and a
  Windows drive path (``C:\\...``) never exists on a Linux node; a plain relative
  path (no ``//``, rare) is taken relative to the .blend's folder too;
* sequences (``#`` runs, ``<UDIM>``, ``<UVTILE>``, numbered first frames, cache
  folders) count as missing only when no file of the sequence exists.
"""

from __future__ import annotations

import glob
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blender_asset_tracer import blendfile as bat_blendfile
from blender_asset_tracer import bpathlib
from blender_asset_tracer.trace import asset_holding_blocks, blocks2assets, file2blocks, file_sequence

from .blendfile import check_unpacked_size, open_blend_file
from .errors import ModelRejected

_WINDOWS_ABS = re.compile(r"^[A-Za-z]:[\\/]")
_HASH_RUN = re.compile(r"#+")
_SOUND_SUFFIXES = frozenset(
    {".wav", ".mp3", ".flac", ".ogg", ".oga", ".aac", ".m4a", ".aif", ".aiff", ".opus"}
)

_KIND_BY_DNA = {
    "Library": "library",
    "Image": "image",
    "CacheFile": "cache",
    "PointCache": "cache",
    "MeshCacheModifierData": "cache",
    "OceanModifierData": "cache",
    "FluidsimSettings": "cache",
    "FluidDomainSettings": "cache",
    "NodesModifierData": "cache",
    "NodesModifierBake": "cache",
    "bSound": "sound",
    "VFont": "font",
    "MovieClip": "movie",
    "Volume": "volume",
    "Mesh": "mesh",
    "NodeShaderTexIES": "ies",
}


@dataclass(frozen=True)
class Dependency:
    """One external file (or sequence of files) that a .blend uses.

    Attributes:
        path: the path as written in the .blend that uses it (``"//textures/a.png"``,
            ``"/home/artist/b.blend"``, ``"C:/tex/c.png"``); BAT reads backslashes as
            slashes, as Blender does (``BLI_path_abs``).
        resolved: where it points: POSIX path relative to the model root when
            inside it (``"textures/a.png"``), else the absolute path (for a
            Windows path, the path as written).
        kind: ``library``, ``image``, ``cache``, ``sound``, ``font``, ``movie``,
            ``volume``, ``mesh`` (multires external data), ``ies``, or the
            lower-cased DNA type for anything else BAT reports.
        missing: True when no file of it exists inside the root (always True when
            outside the root).
        outside_root: True when it resolves outside the model root.
        sequence: True for a sequence of files (image sequence, UDIM tiles, cache folder).
    """

    path: str
    resolved: str
    kind: str
    missing: bool
    outside_root: bool
    sequence: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The dependency as a JSON-ready dict."""
        return asdict(self)


@dataclass
class DependencyReport:
    """What tracing found: the dependencies, and why tracing stopped early, if it did.

    Attributes:
        deps: deduplicated dependencies, in the order BAT found them.
        error: None when the trace went through; else one line naming the failure
            (the deps found before it are still listed).
    """

    deps: list[Dependency] = field(default_factory=list)
    error: str | None = None

    @property
    def missing(self) -> list[str]:
        """Paths (as written) of the missing dependencies, each once."""
        return list(dict.fromkeys(d.path for d in self.deps if d.missing))


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def _is_regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


class _RootedBlockIterator(file2blocks.BlockIterator):
    """BAT's block iterator that opens only regular files inside ``root``.

    Files are opened without BAT's process-wide cache (``open_cached``), so
    concurrent traces never close each other's files; :meth:`close` closes
    what this trace opened. A compressed library that decompresses to more than
    ``max_unpacked_bytes`` stops the trace (BAT would decompress it to a temp file).
    """

    def __init__(self, root: Path, max_unpacked_bytes: int | None) -> None:
        super().__init__()
        self.root = root
        self.max_unpacked_bytes = max_unpacked_bytes
        self._opened: dict[Path, bat_blendfile.BlendFile] = {}

    def may_open(self, path: Path) -> bool:
        """True for a regular file inside the root, symlinks resolved (no disk access outside it)."""
        if not _inside(Path(os.path.normpath(path)), self.root):
            return False
        real = Path(os.path.realpath(path))
        return _inside(real, self.root) and _is_regular_file(real)

    def open_blendfile(self, bfilepath: Path) -> bat_blendfile.BlendFile:
        key = bpathlib.make_absolute(bfilepath)
        bfile = self._opened.get(key)
        if bfile is None:
            if not self.may_open(key):
                raise PermissionError(f"refusing to open {key}: not a regular file inside the model folder")
            # Also refuses a corrupt compressed stream before BAT, which leaks its
            # temp file when decompression fails half-way.
            check_unpacked_size(key, self.max_unpacked_bytes)
            self.progress_cb.trace_blendfile(key)
            bfile = open_blend_file(key)
            self._opened[key] = bfile
        return bfile

    def _visit_linked_blocks(self, blocks_per_lib: dict) -> Iterator[bat_blendfile.BlendFileBlock]:
        # BAT opens every library that exists; follow only those inside the root.
        allowed = {
            lib_bpath: idblocks
            for lib_bpath, idblocks in blocks_per_lib.items()
            if self.may_open(bpathlib.make_absolute(lib_bpath.to_path()))
        }
        yield from super()._visit_linked_blocks(allowed)

    def close(self) -> None:
        for bfile in self._opened.values():
            bfile.close()
        self._opened.clear()


def _kind(usage: Any, written: str) -> str:
    dna = usage.block.dna_type_name
    if dna in _KIND_BY_DNA:
        return _KIND_BY_DNA[dna]
    if dna in ("Strip", "StripData", "Sequence"):
        if usage.is_sequence:
            return "image"
        return "sound" if Path(written).suffix.lower() in _SOUND_SUFFIXES else "movie"
    return dna.lower()


def _exists(candidate: Path, is_sequence: bool) -> bool:
    """Whether the file, or at least one file of the sequence, exists (BAT's ``expand_sequence``)."""
    name = candidate.name
    markers = "#" in name or "<UDIM>" in name or "<UVTILE>" in name
    if not is_sequence and not markers:
        return candidate.exists()
    target = candidate
    if markers:
        # Blender's frame (#) and tile markers become wildcards; the rest of the path is literal.
        pattern = glob.escape(name).replace("<UDIM>", "*").replace("<UVTILE>", "*")
        target = Path(glob.escape(str(candidate.parent))) / _HASH_RUN.sub("*", pattern)
    try:
        return next(iter(file_sequence.expand_sequence(target)), None) is not None
    except (OSError, ValueError):  # file_sequence.DoesNotExist is an OSError
        return False


def _display(path: Path | str) -> str:
    return os.fsencode(str(path)).decode("utf-8", "replace")


def _resolve(usage: Any, root: Path) -> Dependency:
    raw = bytes(usage.asset_path)
    written = raw.decode("utf-8", "replace")
    kind = _kind(usage, written)
    is_sequence = bool(usage.is_sequence) or "#" in written or "<UDIM>" in written or "<UVTILE>" in written
    if _WINDOWS_ABS.match(written):
        return Dependency(written, written, kind, missing=True, outside_root=True, sequence=is_sequence)
    owner_dir = Path(os.path.abspath(usage.block.bfile.filepath)).parent
    text = os.fsdecode(raw)
    # BLI_path_abs: "//" is the folder of the .blend; backslashes become slashes.
    if text.startswith("//"):
        text = text[2:].replace("\\", "/")
        candidate = owner_dir / text
    else:
        text = text.replace("\\", "/")
        candidate = Path(text) if text.startswith("/") else owner_dir / text
    candidate = Path(os.path.normpath(candidate))
    if not _inside(candidate, root):
        shown = _display(candidate)
        return Dependency(written, shown, kind, missing=True, outside_root=True, sequence=is_sequence)
    real = Path(os.path.realpath(candidate))
    if not _inside(real, root):  # a symlink inside the root that points out of it
        shown = _display(real)
        return Dependency(written, shown, kind, missing=True, outside_root=True, sequence=is_sequence)
    rel = _display(candidate.relative_to(root).as_posix())
    missing = not _exists(candidate, is_sequence)
    return Dependency(written, rel, kind, missing=missing, outside_root=False, sequence=is_sequence)


def find_dependencies(
    blend_path: Path, root: Path, *, max_unpacked_bytes: int | None = None
) -> DependencyReport:
    """Trace the dependencies of ``blend_path`` (and of its libraries inside ``root``).

    Args:
        blend_path: the main .blend, inside ``root``.
        root: the model's root folder (``files/`` of an extracted upload).
        max_unpacked_bytes: stop the trace at a compressed library that
            decompresses to more than this many bytes; None for no cap.

    Returns:
        A :class:`DependencyReport`: dependencies deduplicated by resolved path
        (the first kind seen wins: a movie strip and its sound share one file), in
        trace order; a library of a library is listed with the path
        written in the library that links it. Libraries outside ``root`` are listed
        but not traced into.

    Never raises on a hostile or corrupt file: a failure of the trace ends it, and
    ``error`` names the failure while ``deps`` keeps what was found before.
    """
    root = Path(os.path.realpath(root))
    blend_path = Path(os.path.realpath(blend_path))
    report = DependencyReport()
    seen: set[str] = set()
    iterator = _RootedBlockIterator(root, max_unpacked_bytes)
    try:
        bfile = iterator.open_blendfile(blend_path)
        for block in asset_holding_blocks(iterator.iter_blocks(bfile)):
            for usage in blocks2assets.iter_assets(block):
                dep = _resolve(usage, root)
                key = dep.resolved
                if key in seen:
                    continue
                seen.add(key)
                report.deps.append(dep)
    except ModelRejected as exc:
        report.error = f"dependency trace stopped: {exc.message}"
    except Exception as exc:  # hostile data: BAT may raise anything; report, never raise
        report.error = f"dependency trace stopped: {type(exc).__name__}: {exc}"
    finally:
        iterator.close()
    return report
