"""Splitting Blender's output into lines and recognising the lines that matter.

Nothing in this module raises on any input: Blender's output (and that of a hostile
.blend's scripts, should any run) is arbitrary bytes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from protocol.messages import EVENT_PREFIX

MAX_LINE_BYTES = 64 * 1024
"""Longest line kept, in bytes (before decoding); the rest of a longer line is dropped."""

TRUNCATED_MARK = " …[truncated]"
"""Appended to a line that was cut at :data:`MAX_LINE_BYTES`."""

_SEPARATORS = re.compile(rb"[\r\n]")


class LineSplitter:
    """Turn a stream of byte chunks into decoded, stripped text lines.

    Lines end at ``\\n`` or ``\\r`` (so ``\\r\\n`` and progress lines redrawn with ``\\r``
    both work); blank lines are dropped. Bytes are decoded as UTF-8 with
    ``errors="replace"``. A line longer than :data:`MAX_LINE_BYTES` bytes is emitted as
    its first :data:`MAX_LINE_BYTES` bytes plus :data:`TRUNCATED_MARK`, and the rest up
    to the next line end is discarded as it arrives, so memory stays bounded by about
    ``MAX_LINE_BYTES`` plus one chunk whatever the input.
    """

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self._max = max(1, int(max_line_bytes))
        self._buf = bytearray()
        self._discarding = False

    def _emit(self, raw: bytes | bytearray, truncated: bool, out: list[str]) -> None:
        text = bytes(raw).decode("utf-8", errors="replace").strip()
        if truncated:
            out.append(text + TRUNCATED_MARK)
        elif text:
            out.append(text)

    def feed(self, data: bytes) -> list[str]:
        """Add a chunk of output; return the lines it completed (possibly none)."""
        out: list[str] = []
        try:
            pos = 0
            n = len(data)
            while pos < n:
                m = _SEPARATORS.search(data, pos)
                end = m.start() if m else n
                piece = data[pos:end]
                if self._discarding:
                    if m:
                        self._discarding = False
                else:
                    room = self._max - len(self._buf)
                    if len(piece) > room:
                        self._buf += piece[:room]
                        self._emit(self._buf, True, out)
                        self._buf.clear()
                        self._discarding = m is None
                    else:
                        self._buf += piece
                        if m:
                            self._emit(self._buf, False, out)
                            self._buf.clear()
                pos = end + 1 if m else n
        except Exception:  # never raise on input; drop what cannot be handled
            self._buf.clear()
            self._discarding = False
        return out

    def flush(self) -> list[str]:
        """Return the last, unterminated line (if any) and reset the splitter."""
        out: list[str] = []
        try:
            if self._buf and not self._discarding:
                self._emit(self._buf, False, out)
        except Exception:
            out = []
        self._buf.clear()
        self._discarding = False
        return out


@dataclass
class Event:
    """One recognised output line.

    ``kind`` is the render script's ``"event"`` value (``start``, ``frame_start``,
    ``frame_done``, ``error``, ``done``, or a newer one), or ``"saved"`` for Blender's
    ``Saved: '<path>'`` line, or ``"frame"`` for Blender's ``Fra:<n> ...`` progress line.
    ``frame`` is a Blender frame number (may be negative); ``path`` an output file path;
    ``message`` an error text; ``data`` the whole JSON object of a script event
    (empty for Blender's own lines).
    """

    kind: str
    frame: int | None = None
    path: str | None = None
    message: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


# Blender 5 logs through CLOG with a "MM:SS.mmm  category | " prefix
# (e.g. "00:01.394  render           | Saved: '/out/frame_000001.png'"); older versions
# and some code paths print the bare text. Both are accepted.
_LOG_PREFIX = r"(?:\d+:\d{2}(?:\.\d+)?\s+[\w.]+\s*\|\s*)?"
_SAVED = re.compile(_LOG_PREFIX + r"Saved: '(.+)'")
_FRA = re.compile(_LOG_PREFIX + r"Fra:\s*(-?\d{1,9})(?!\d)")

_FRAME_KINDS = ("frame_start", "frame_done")


def _script_event(payload: str) -> Event | None:
    obj = json.loads(payload)
    if not isinstance(obj, dict):
        return None
    kind = obj.get("event")
    if not isinstance(kind, str) or not kind:
        return None
    frame = obj.get("frame")
    path = obj.get("path")
    message = obj.get("message")
    if frame is not None and (isinstance(frame, bool) or not isinstance(frame, int)):
        return None
    if path is not None and not isinstance(path, str):
        return None
    if message is not None and not isinstance(message, str):
        return None
    if kind in _FRAME_KINDS and frame is None:
        return None
    if kind == "frame_done" and path is None:
        return None
    if kind == "error" and message is None:
        return None
    if kind == "start" and not (
        isinstance(obj.get("frames"), list)
        and all(isinstance(f, int) and not isinstance(f, bool) for f in obj["frames"])
    ):
        return None
    return Event(kind=kind, frame=frame, path=path, message=message, data=obj)


def parse_line(line: str) -> Event | None:
    """Recognise one output line; return None for anything else. Never raises.

    * ``@@renderfarm {json}`` (:data:`protocol.messages.EVENT_PREFIX`): the render script's
      event. None when the JSON is bad, is not an object, lacks a string ``"event"``, or
      has fields of the wrong type (``frame`` int, ``path``/``message`` str; ``frame_start``
      and ``frame_done`` need ``frame``, ``frame_done`` needs ``path``, ``error`` needs
      ``message``, ``start`` needs a list of int ``frames``).
    * ``Saved: '<path>'``: Blender wrote an output file -> ``Event("saved", path=...)``.
    * ``Fra:<n> ...``: Blender's render progress -> ``Event("frame", frame=n)``.
    """
    try:
        if not isinstance(line, str):
            return None
        text = line.strip()
        if text.startswith(EVENT_PREFIX.strip()):
            return _script_event(text[len(EVENT_PREFIX.strip()) :].strip())
        m = _SAVED.fullmatch(text)
        if m:
            return Event(kind="saved", path=m.group(1))
        m = _FRA.match(text)
        if m:
            return Event(kind="frame", frame=int(m.group(1)))
    except Exception:  # bad JSON, huge numbers, deep nesting: not an event
        return None
    return None


__all__ = ["MAX_LINE_BYTES", "TRUNCATED_MARK", "Event", "LineSplitter", "parse_line"]
