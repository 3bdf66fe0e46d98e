"""Frame specifications and chunking.

A frame spec is a comma-separated list of items, each one of:

* ``N`` -- a single frame (``7``, ``-3``);
* ``A-B`` -- frames A to B inclusive, A <= B (``1-10``, ``-5-5``, ``-10--1``);
* ``A-BxS`` -- every S-th frame from A up to B (``1-99x2``), S >= 1.

Spaces around numbers, dashes, ``x`` and commas are tolerated; ``1 10`` (two
numbers with no separator) is not. Frames may be negative, as in Blender,
where a scene's current frame can go below zero (Blender's ``MINAFRAME`` is
-1048574, ``MAXFRAME`` 1048574; those are the bounds enforced here).

Chunking splits the *list* of frames, not the range: ``1-10x3`` in chunks of
2 is ``[1, 4]``, ``[7, 10]``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MIN_FRAME = -1_048_574
MAX_FRAME = 1_048_574
MAX_FRAMES = 100_000
"""Largest number of distinct frames one spec may name (a guard for the API)."""
MAX_SPEC_LENGTH = 1024
"""Longest spec accepted, in characters."""

_ITEM = re.compile(
    r"""^[ \t]*(?P<a>-?[0-9]+)[ \t]*
        (?:-[ \t]*(?P<b>-?[0-9]+)[ \t]*
           (?:[xX][ \t]*(?P<step>-?[0-9]+)[ \t]*)?
        )?$""",
    re.VERBOSE | re.ASCII,
)


class FrameSpecError(ValueError):
    """A frame spec that cannot be parsed; ``token`` is the offending item."""

    def __init__(self, message: str, token: str) -> None:
        super().__init__(message)
        self.token = token


def parse_frames(spec: str) -> list[int]:
    """Parse a frame spec into the sorted list of distinct frames it names.

    Args:
        spec: e.g. ``"1-10,20-25"``, ``"1-99x2"``, ``"-5-5"``.

    Returns:
        Frames in ascending order, each once (overlapping items are merged).

    Raises:
        FrameSpecError: naming the bad item (``'1 10'``, ``'5-1'``, ``'1-10x0'``),
            or when the spec is empty, longer than 1024 characters, leaves the
            Blender frame bounds or names more than 100,000 frames.

    Runs in time linear in the number of frames named, so any spec up to
    1 KB parses in well under 100 ms.
    """
    if not isinstance(spec, str):
        raise FrameSpecError("frames must be a string such as '1-10'", repr(spec))
    if len(spec) > MAX_SPEC_LENGTH:
        raise FrameSpecError(f"frame spec is longer than {MAX_SPEC_LENGTH} characters", spec[:40] + "...")
    if not spec.strip():
        raise FrameSpecError("frame spec is empty", spec)
    frames: set[int] = set()
    for raw in spec.split(","):
        token = raw.strip()
        if not token:
            raise FrameSpecError("empty item in frame spec (two commas, or a trailing comma)", raw)
        m = _ITEM.match(raw)
        if not m:
            raise FrameSpecError(f"bad frame spec item {token!r}: expected N, A-B or A-BxS", token)
        a = int(m["a"])
        b = int(m["b"]) if m["b"] is not None else a
        step = int(m["step"]) if m["step"] is not None else 1
        if step > MAX_FRAME - MIN_FRAME:
            raise FrameSpecError(
                f"bad frame spec item {token!r}: step {step} is larger than any frame range", token
            )
        if step < 1:
            raise FrameSpecError(f"bad frame spec item {token!r}: step must be at least 1", token)
        if b < a:
            raise FrameSpecError(f"bad frame spec item {token!r}: end {b} is before start {a}", token)
        if a < MIN_FRAME or b > MAX_FRAME:
            raise FrameSpecError(
                f"bad frame spec item {token!r}: frames must lie within {MIN_FRAME}..{MAX_FRAME}", token
            )
        count = (b - a) // step + 1
        if len(frames) + count > MAX_FRAMES:
            raise FrameSpecError(f"frame spec names more than {MAX_FRAMES} frames", token)
        frames.update(range(a, b + 1, step))
    return sorted(frames)


def chunk_frames(frames: Iterable[int], chunk_size: int) -> list[list[int]]:
    """Split a list of frames into consecutive chunks of at most ``chunk_size``.

    Raises:
        ValueError: if ``chunk_size`` is below 1.
    """
    if chunk_size < 1:
        raise ValueError("chunk size must be at least 1")
    items = list(frames)
    return [items[i : i + chunk_size] for i in range(0, len(items), chunk_size)]


def format_frames(frames: Iterable[int]) -> str:
    """Render frames back as a compact spec (``[1, 2, 3, 7]`` -> ``"1-3,7"``)."""
    out: list[str] = []
    run: list[int] = []
    for f in sorted(set(frames)):
        if run and f == run[-1] + 1:
            run.append(f)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [f]
    if run:
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(out)
