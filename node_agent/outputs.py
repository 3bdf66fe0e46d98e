"""Checks on a rendered frame before it is uploaded."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

EXR_MAGIC = b"\x76\x2f\x31\x01"
"""First four bytes of every OpenEXR file (OpenEXR file layout specification)."""


def check_image(path: Path, out_dir: Path, output_format: str) -> str | None:
    """Return why ``path`` must not be uploaded, or ``None`` when it is a whole image inside ``out_dir``.

    PNG and JPEG are decoded fully with Pillow; OpenEXR (which Pillow cannot read)
    is checked by its magic number and a non-trivial size.
    """
    try:
        real = path.resolve()
        if not real.is_relative_to(out_dir.resolve()):
            return f"{path} is outside the attempt's output folder"
        if not real.is_file():
            return f"{path.name} was not written"
        if output_format == "OPEN_EXR":
            with open(real, "rb") as fh:
                head = fh.read(4)
            if head != EXR_MAGIC or real.stat().st_size < 64:
                return f"{path.name} is not a valid OpenEXR file"
            return None
        with Image.open(real) as im:
            im.load()
        return None
    except Exception as exc:  # any decoding error means a broken frame
        return f"{path.name} does not decode as an image: {type(exc).__name__}: {exc}"
