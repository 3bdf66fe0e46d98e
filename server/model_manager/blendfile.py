"""Reading and checking the header of an uploaded .blend file.

A .blend file starts with a header (Blender's ``source/blender/blenloader``,
documented in ``doc/blend-file``; parsed here by blender-asset-tracer, BAT):

* legacy, up to Blender 4.x: 12 bytes, ``BLENDER`` + pointer size (``_`` = 4,
  ``-`` = 8) + endianness (``v`` little, ``V`` big) + 3-digit version
  (``BLENDER-v279``);
* Blender 5 (file format 1): 17 bytes, ``BLENDER17-01v0500``: header size 17,
  ``-``, format version ``01``, ``v`` (little endian, 8-byte pointers), 4-digit
  version.

The whole file may be gzip-compressed (Blender up to 2.9x, magic ``1f 8b``) or
zstd-compressed (Blender 3.0+, magic ``28 b5 2f fd``), in which case the
decompressed stream starts with the header. After the header come blocks; a valid
file holds a ``DNA1`` block (the struct definitions) and ends with ``ENDB``.
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Literal

import zstandard
from blender_asset_tracer import blendfile as bat_blendfile
from blender_asset_tracer.blendfile import exceptions as bat_exceptions
from blender_asset_tracer.blendfile import header as bat_header

from .errors import ModelRejected

BLEND_MAGIC = b"BLENDER"
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
"""The zstd frame magic (RFC 8878, section 3.1.1)."""
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
"""A zip's first local file header, or the end record of an empty zip (APPNOTE 4.3)."""

Compression = Literal["none", "gzip", "zstd"]

_CHUNK = 1024 * 1024
_HEADER_BYTES = 17


@dataclass(frozen=True)
class BlendHeader:
    """What the header of a .blend file says.

    Attributes:
        version: version of Blender that saved the file, as Blender writes it:
            ``"2.79"``, ``"2.80"``, ``"3.0"``, ``"4.5"``, ``"5.0"`` (two-digit minor
            before 3.0, as Blender 2.x named itself).
        version_int: the same as the header stores it: 279, 300, 500.
        compression: ``"none"``, ``"gzip"`` or ``"zstd"``.
        pointer_size: 4 or 8 (bytes).
        endianness: ``"little"`` or ``"big"``.
        format_version: 0 for the legacy 12-byte header, 1 for Blender 5's 17-byte one.
        unpacked_bytes: size of the decompressed file, in bytes (the file size when
            not compressed).
    """

    version: str
    version_int: int
    compression: Compression
    pointer_size: int
    endianness: Literal["little", "big"]
    format_version: int
    unpacked_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """The header as a JSON-ready dict."""
        return asdict(self)


def sniff(path: Path) -> Literal["blend", "gzip", "zstd", "zip"] | None:
    """Tell a file's kind by its first bytes (its magic), not by its name.

    Returns:
        ``"blend"`` (an uncompressed .blend), ``"gzip"`` or ``"zstd"`` (maybe a
        compressed .blend: only decompression tells), ``"zip"``, or None.

    Raises:
        OSError: when the file cannot be read.
    """
    with path.open("rb") as f:
        head = f.read(8)
    if head.startswith(BLEND_MAGIC):
        return "blend"
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if head.startswith(ZIP_MAGICS):
        return "zip"
    return None


def format_version(version_int: int) -> str:
    """Blender's version number as a string: 279 -> ``"2.79"``, 300 -> ``"3.0"``, 405 -> ``"4.5"``.

    Blender 2.x wrote its minor version with two digits (``2.80``); from 3.0 on the
    minor is one number (``BLENDER_VERSION`` 405 is "4.5", ``BKE_blender_version_string``).
    """
    major, minor = divmod(version_int, 100)
    return f"{major}.{minor:02d}" if major < 3 else f"{major}.{minor}"


@contextmanager
def _decompressed(path: Path, compression: Compression) -> Iterator[IO[bytes]]:
    with path.open("rb") as raw:
        if compression == "gzip":
            with gzip.GzipFile(fileobj=raw, mode="rb") as g:
                yield g
        elif compression == "zstd":
            with zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True) as z:
                yield z
        else:
            yield raw


def _corrupt(reason: str) -> ModelRejected:
    return ModelRejected(422, f"corrupt or truncated .blend: {reason}")


def _measure(path: Path, compression: Compression, max_unpacked_bytes: int | None) -> tuple[bytes, int]:
    """First 17 decompressed bytes and the decompressed size, within the cap."""
    if compression == "none":
        with path.open("rb") as f:
            return f.read(_HEADER_BYTES), path.stat().st_size
    try:
        with _decompressed(path, compression) as stream:
            head = stream.read(_HEADER_BYTES)
            if not head.startswith(BLEND_MAGIC):
                raise ModelRejected(
                    415, f"not a .blend file: {compression}-compressed data that does not start with BLENDER"
                )
            total = len(head)
            while chunk := stream.read(_CHUNK):
                total += len(chunk)
                if max_unpacked_bytes is not None and total > max_unpacked_bytes:
                    raise ModelRejected(
                        413,
                        f"the .blend decompresses to more than {max_unpacked_bytes} bytes",
                    )
            return head, total
    except ModelRejected:
        raise
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
        raise _corrupt(f"{compression} stream: {exc}") from exc


def _parse_header(head: bytes, path: Path) -> bat_header.BlendFileHeader:
    try:
        return bat_header.BlendFileHeader(io.BytesIO(head), path)
    except (bat_exceptions.BlendFileError, ValueError) as exc:
        raise _corrupt(f"bad file header {head[:_HEADER_BYTES]!r}") from exc


def open_blend_file(path: Path) -> bat_blendfile.BlendFile:
    """Open ``path`` with BAT, outside BAT's process-wide cache; the caller closes it.

    ``BAT.BlendFile(path)`` leaves its file (and, for a compressed file, its
    decompressed temp file) open when the constructor raises (no DNA1 block,
    bad header...), until the garbage collector finds it; this closes it at once.

    Raises:
        Whatever BAT raises: ``BlendFileError`` (``NoDNA1Block``...), ``OSError``,
        ``EOFError``, ``struct.error``... on a corrupt file.
    """
    bfile = bat_blendfile.BlendFile.__new__(bat_blendfile.BlendFile)
    try:
        bfile.__init__(path)  # type: ignore[misc]
    except BaseException:
        fileobj = getattr(bfile, "fileobj", None)
        if fileobj is not None:
            fileobj.close()
        raise
    return bfile


def _check_blocks(path: Path) -> None:
    """Read every block with BAT; refuse a file with no DNA1, a block past the end or no ENDB."""
    bfile = None
    try:
        bfile = open_blend_file(path)
        raw_size = os.fstat(bfile.fileobj.fileno()).st_size
        end = bfile.fileobj.tell()
        if bfile.blocks:
            last = bfile.blocks[-1]
            end = last.file_offset + last.size
            for block in bfile.blocks:
                if block.size < 0 or block.file_offset + block.size > raw_size:
                    code = block.code.decode("ascii", "replace")
                    raise _corrupt(
                        f"block {code!r} at offset {block.file_offset} runs past the end of the file"
                    )
        bfile.fileobj.seek(end)
        if bfile.fileobj.read(4) != b"ENDB":
            raise _corrupt("the file ends without an ENDB block")
    except ModelRejected:
        raise
    except bat_exceptions.NoDNA1Block as exc:
        raise _corrupt("no DNA1 block (the file is truncated or not a complete .blend)") from exc
    except bat_exceptions.BlendFileError as exc:
        raise _corrupt(str(exc.args[0]) if exc.args else type(exc).__name__) from exc
    except Exception as exc:  # BAT raises struct.error, EOFError, KeyError... on hostile data
        raise _corrupt(f"{type(exc).__name__}: {exc}") from exc
    finally:
        if bfile is not None:
            bfile.close()


def check_unpacked_size(path: Path, max_unpacked_bytes: int | None) -> int:
    """Decompressed size of a (maybe compressed) .blend, in bytes, checked against a cap.

    Streams the whole file through the decompressor (nothing is written), so a
    decompression bomb is refused before anyone decompresses it to disk.

    Raises:
        ModelRejected: 415 when the magic is not a .blend's (plain, gzip or zstd);
            413 over ``max_unpacked_bytes``; 422 when the compressed stream is corrupt.
    """
    kind = sniff(path)
    if kind not in ("blend", "gzip", "zstd"):
        raise ModelRejected(415, f"not a .blend file: {path.name}")
    compression: Compression = "none" if kind == "blend" else kind
    return _measure(path, compression, max_unpacked_bytes)[1]


def read_blend_header(path: Path, *, max_unpacked_bytes: int | None = None) -> BlendHeader:
    """Check that ``path`` is a readable .blend file and return its header.

    The magic is checked here (``BLENDER``, or the gzip/zstd magic and then
    ``BLENDER`` after decompression); then BAT reads every block, and the file
    must have a DNA1 block, no block running past the end, and an ENDB block.

    Args:
        path: the file, any name.
        max_unpacked_bytes: refuse a compressed file that decompresses to more
            than this many bytes (a decompression bomb); None for no cap.

    Returns:
        The header; see :class:`BlendHeader`.

    Raises:
        ModelRejected: 415 ``"not a .blend file ..."`` when the magic is wrong;
            413 when the decompressed size is over ``max_unpacked_bytes``;
            422 ``"corrupt or truncated .blend: <reason>"`` when the compressed
            stream, the header or the blocks cannot be read.
        OSError: when ``path`` cannot be read at all.
    """
    kind = sniff(path)
    if kind is None or kind == "zip":
        with path.open("rb") as f:
            head = f.read(8)
        what = "a zip archive" if kind == "zip" else f"unknown magic {head.hex(' ') or '(empty file)'}"
        raise ModelRejected(415, f"not a .blend file: {what}")
    compression: Compression = "none" if kind == "blend" else kind
    head, unpacked = _measure(path, compression, max_unpacked_bytes)
    if len(head) < 12:
        raise _corrupt(f"the file ends inside its header ({len(head)} bytes)")
    hdr = _parse_header(head, path)
    _check_blocks(path)
    return BlendHeader(
        version=format_version(hdr.version),
        version_int=hdr.version,
        compression=compression,
        pointer_size=hdr.pointer_size,
        endianness="little" if hdr.is_little_endian else "big",
        format_version=hdr.file_format_version,
        unpacked_bytes=unpacked,
    )
