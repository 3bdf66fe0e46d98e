"""Size and archive caps applied to uploaded models."""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3


@dataclass(frozen=True)
class ModelLimits:
    """Caps on one uploaded model (the server config passes these; tests pass small ones).

    Attributes:
        max_upload_bytes: largest uploaded file (.blend or .zip), in bytes (2 GiB).
        max_unpacked_bytes: largest total of a zip's extracted entries, and largest
            decompressed size of one gzip/zstd .blend, in bytes (8 GiB).
        max_entries: most entries (files and folders) in a zip (10,000).
        max_ratio: largest uncompressed/compressed size ratio, for each zip entry
            and for the zip as a whole (200.0). Deflate cannot exceed about 1032:1,
            so a ratio above a few hundred is a zip bomb, not a real asset.
        max_blend_inspect_s: wall-clock limit of the Blender inspection run, in seconds.
        ratio_floor_bytes: the ratio caps apply only to entries (and archives) that
            unpack to more than this many bytes, so that a small, highly
            compressible file (a text file of spaces) is not taken for a bomb (1 MiB).
    """

    max_upload_bytes: int = 2 * GiB
    max_unpacked_bytes: int = 8 * GiB
    max_entries: int = 10_000
    max_ratio: float = 200.0
    max_blend_inspect_s: float = 120.0
    ratio_floor_bytes: int = 1024 * 1024
