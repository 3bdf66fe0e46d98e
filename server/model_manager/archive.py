"""Checking and extracting an uploaded zip without trusting anything it says.

Refused (``ModelRejected``, naming the entry):

* 400: not a zip or a corrupt one; an entry that leaves the root (``..``
  component, absolute path, drive letter ``C:``, a UNC ``\\\\server`` path, with
  backslashes read as separators as Windows tools write them); a symlink or other
  special file (unix mode in ``external_attr``, APPNOTE 4.4.15); an encrypted
  entry; two entries with the same path, or a file where a folder must be;
* 413: more entries than ``max_entries``, more than ``max_unpacked_bytes`` in
  all, or a compression ratio over ``max_ratio`` for one entry or for the whole
  archive (OWASP's zip-bomb checks).

The caps are checked twice: on the sizes the central directory declares
(:func:`check_zip`), and while extracting, on the bytes actually written
(:func:`extract_zip`), since headers can lie. ``zipfile`` itself stops reading an
entry at its declared size and then checks its CRC-32.
"""

from __future__ import annotations

import os
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import ModelRejected
from .limits import ModelLimits

_CHUNK = 1024 * 1024
_NAME_MAX = 255


@dataclass(frozen=True)
class ZipEntry:
    """One checked entry of a zip.

    Attributes:
        name: the safe relative POSIX path the entry is extracted to
            (``"textures/a.png"``; backslashes already read as ``/``).
        raw_name: the name as stored in the zip.
        size: uncompressed size the zip declares, in bytes.
        compressed_size: compressed size the zip declares, in bytes.
        is_dir: True for a folder entry.
    """

    name: str
    raw_name: str
    size: int
    compressed_size: int
    is_dir: bool


def _bad(entry: str, why: str) -> ModelRejected:
    return ModelRejected(400, f"zip entry {entry!r} {why}")


def entry_text(info: zipfile.ZipInfo) -> str:
    """The entry's name as its author meant it.

    The zip format (APPNOTE 4.4.4, general purpose bit 11) says a name is UTF-8 only
    when bit 11 is set, else IBM code page 437, and Python decodes it so. Info-ZIP's
    ``zip`` on Linux and macOS writes UTF-8 names without setting the bit, so a name
    that is valid UTF-8 when re-encoded to cp437 bytes is taken as UTF-8.
    """
    if info.flag_bits & 0x800:
        return info.filename
    try:
        return info.filename.encode("cp437").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return info.filename


def safe_entry_name(raw: str) -> str:
    """The relative POSIX path a zip entry name stands for, or raise if it is unsafe.

    Backslashes count as separators (zips made on Windows may use them, and
    Blender reads them so too). ``.`` and empty components are dropped.

    Raises:
        ModelRejected: 400 for an absolute path, a drive letter, a ``..``
            component, a NUL or control character, a component longer than 255
            characters, or a name that is empty once cleaned.
    """
    name = raw.replace("\\", "/")
    if any(ord(c) < 32 for c in name):
        raise _bad(raw, "has a control character in its name")
    if name.startswith("/"):
        raise _bad(raw, "has an absolute path")
    if len(name) >= 2 and name[1] == ":" and name[0].isascii() and name[0].isalpha():
        raise _bad(raw, "starts with a drive letter")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _bad(raw, "leaves the archive root ('..')")
    if any(":" in p for p in parts):
        raise _bad(raw, "has a ':' in a path component (a Windows drive or stream)")
    if any(len(p.encode("utf-8", "surrogateescape")) > _NAME_MAX for p in parts):
        raise _bad(raw, "has a path component longer than 255 bytes")
    if not parts:
        raise _bad(raw, "has an empty name")
    return "/".join(parts)


def _open(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise ModelRejected(400, f"not a zip archive, or a corrupt one: {exc}") from exc


def _check_ratio(size: int, compressed: int, limits: ModelLimits, what: str) -> None:
    if size > limits.ratio_floor_bytes and size > limits.max_ratio * max(compressed, 1):
        ratio = size / max(compressed, 1)
        raise ModelRejected(
            413,
            f"{what} unpacks {ratio:.0f} times its compressed size (more than {limits.max_ratio:g}): "
            "refused as a zip bomb",
        )


def _check_infos(zf: zipfile.ZipFile, archive_bytes: int, limits: ModelLimits) -> list[ZipEntry]:
    infos = zf.infolist()
    if len(infos) > limits.max_entries:
        raise ModelRejected(413, f"the zip has {len(infos)} entries, more than {limits.max_entries}")
    entries: list[ZipEntry] = []
    names: dict[str, str] = {}
    total = 0
    for info in infos:
        raw = entry_text(info)
        name = safe_entry_name(raw)
        mode = info.external_attr >> 16
        if info.create_system == 3 and mode:  # made on unix: the high word is st_mode
            if stat.S_ISLNK(mode):
                raise _bad(raw, "is a symbolic link")
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)) and stat.S_IFMT(mode):
                raise _bad(raw, "is a special file (device, FIFO or socket)")
        if info.flag_bits & 0x1:
            raise _bad(raw, "is encrypted")
        if info.file_size < 0 or info.compress_size < 0:
            raise _bad(raw, "declares a negative size")
        if name in names:
            raise _bad(raw, f"has the same path as {names[name]!r}")
        names[name] = raw
        is_dir = info.is_dir()
        if is_dir and info.file_size:
            raise _bad(raw, "is a folder with content")
        total += info.file_size
        if info.file_size > limits.max_unpacked_bytes or total > limits.max_unpacked_bytes:
            raise ModelRejected(
                413, f"the zip unpacks to more than {limits.max_unpacked_bytes} bytes (at entry {raw!r})"
            )
        _check_ratio(info.file_size, info.compress_size, limits, f"zip entry {raw!r}")
        entries.append(ZipEntry(name, raw, info.file_size, info.compress_size, is_dir))
    # A file cannot also be a folder that other entries live in.
    files = {e.name for e in entries if not e.is_dir}
    for e in entries:
        for parent in PurePosixPath(e.name).parents:
            if str(parent) in files:
                raise _bad(e.raw_name, f"lies inside {str(parent)!r}, which is a file in the zip")
    _check_ratio(total, archive_bytes, limits, "the zip")
    return entries


def check_zip(path: Path, limits: ModelLimits) -> list[ZipEntry]:
    """Check a zip's directory: entry paths, types, counts, sizes and ratios.

    Args:
        path: the uploaded file.
        limits: the caps (``max_entries``, ``max_unpacked_bytes``, ``max_ratio``).

    Returns:
        Its entries, in archive order, with safe relative names.

    Raises:
        ModelRejected: 400 (not a zip, corrupt, unsafe or duplicate entry,
            symlink, encrypted) or 413 (too many entries, too large, zip bomb),
            naming the entry at fault.
    """
    with _open(path) as zf:
        return _check_infos(zf, path.stat().st_size, limits)


def _target(dest: Path, name: str) -> Path:
    target = dest / name
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    if not parent.resolve().is_relative_to(dest) or not target.resolve().is_relative_to(dest):
        raise _bad(name, "would be written outside the extraction folder")
    return target


def extract_zip(path: Path, dest: Path, limits: ModelLimits) -> list[ZipEntry]:
    """Check a zip (as :func:`check_zip`) and extract it into ``dest``.

    Each file is streamed into a path built from its checked name and verified to
    lie inside ``dest`` (``resolve()`` + ``is_relative_to``), created with
    ``O_EXCL | O_NOFOLLOW`` so that nothing existing is overwritten or followed.
    While writing, the bytes actually written count against the entry's declared
    size, ``max_unpacked_bytes`` and the ratio caps. Modes from the zip are
    ignored: files are 0644, folders 0755.

    Args:
        path: the zip file.
        dest: folder to extract into (created if missing; should be empty).
        limits: the caps.

    Returns:
        The entries, as :func:`check_zip` returns them.

    Raises:
        ModelRejected: 400 or 413 as :func:`check_zip`, and also while extracting
            (CRC mismatch, entry longer than declared, unsupported compression).
            ``dest`` may then hold part of the files; the caller removes it.
        OSError: on a disk error (out of space...).
    """
    dest.mkdir(parents=True, exist_ok=True)
    dest = dest.resolve()
    with _open(path) as zf:
        entries = _check_infos(zf, path.stat().st_size, limits)
        total = 0
        for info, entry in zip(zf.infolist(), entries, strict=True):
            if entry.is_dir:
                target = dest / entry.name
                target.mkdir(parents=True, exist_ok=True)
                if not target.resolve().is_relative_to(dest):
                    raise _bad(entry.raw_name, "would be written outside the extraction folder")
                continue
            target = _target(dest, entry.name)
            written = 0
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            except FileExistsError as exc:
                raise _bad(entry.raw_name, "clashes with another entry") from exc
            try:
                with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                    while chunk := src.read(_CHUNK):
                        written += len(chunk)
                        total += len(chunk)
                        if written > entry.size:
                            raise _bad(
                                entry.raw_name, f"holds more data than its declared {entry.size} bytes"
                            )
                        if total > limits.max_unpacked_bytes:
                            raise ModelRejected(
                                413, f"the zip unpacks to more than {limits.max_unpacked_bytes} bytes"
                            )
                        _check_ratio(written, entry.compressed_size, limits, f"zip entry {entry.raw_name!r}")
                        out.write(chunk)
            except ModelRejected:
                raise
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
                raise _bad(entry.raw_name, f"cannot be extracted: {exc}") from exc
            if written != entry.size:
                raise _bad(entry.raw_name, f"holds {written} bytes, not the {entry.size} its header declares")
    return entries
