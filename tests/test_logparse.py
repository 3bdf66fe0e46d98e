"""Unit and property tests of node_agent.logparse (no Blender needed)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from node_agent.logparse import MAX_LINE_BYTES, TRUNCATED_MARK, Event, LineSplitter, parse_line
from protocol.messages import EVENT_PREFIX

# ----------------------------------------------------------------------------- LineSplitter


def test_splits_on_newlines_across_chunks():
    s = LineSplitter()
    assert s.feed(b"hel") == []
    assert s.feed(b"lo\nwor") == ["hello"]
    assert s.feed(b"ld\n\nlast") == ["world"]
    assert s.flush() == ["last"]
    assert s.flush() == []


def test_splits_on_carriage_returns_and_drops_blank_lines():
    s = LineSplitter()
    assert s.feed(b"a\r\nb\rc\n  \n\td \n") == ["a", "b", "c", "d"]


def test_multibyte_character_split_between_chunks():
    s = LineSplitter()
    data = "héllo ✓\n".encode()
    assert s.feed(data[:2]) == []
    assert s.feed(data[2:]) == ["héllo ✓"]


def test_invalid_utf8_is_replaced():
    s = LineSplitter()
    assert s.feed(b"bad \xff\xfe bytes\n") == ["bad \ufffd\ufffd bytes"]


def test_long_line_is_truncated_and_rest_dropped():
    s = LineSplitter()
    out: list[str] = []
    chunk = b"x" * 65536
    for _ in range(80):  # a 5 MiB line, no newline
        out += s.feed(chunk)
        assert len(s._buf) <= MAX_LINE_BYTES  # memory stays bounded
    assert len(out) == 1
    assert out[0] == "x" * MAX_LINE_BYTES + TRUNCATED_MARK
    assert s.feed(b"yyy\nnext\n") == ["next"]  # the tail of the long line is dropped
    assert s.flush() == []


def test_long_line_with_newline_in_same_chunk():
    s = LineSplitter()
    out = s.feed(b"z" * (MAX_LINE_BYTES + 10) + b"\nafter\n")
    assert out == ["z" * MAX_LINE_BYTES + TRUNCATED_MARK, "after"]


def test_line_of_exactly_the_cap_is_not_truncated():
    s = LineSplitter()
    assert s.feed(b"a" * MAX_LINE_BYTES) == []
    assert s.feed(b"\n") == ["a" * MAX_LINE_BYTES]


def test_truncated_line_at_flush_is_not_emitted_twice():
    s = LineSplitter()
    assert len(s.feed(b"q" * (MAX_LINE_BYTES + 1))) == 1
    assert s.flush() == []


# ----------------------------------------------------------------------------- parse_line


def ev(obj: object) -> str:
    return EVENT_PREFIX + json.dumps(obj)


def test_script_events():
    e = parse_line(ev({"event": "start", "frames": [1, -2], "scene": "S", "camera": None}))
    assert e == Event(kind="start", data={"event": "start", "frames": [1, -2], "scene": "S", "camera": None})
    e = parse_line(ev({"event": "frame_start", "frame": -3}))
    assert (e.kind, e.frame) == ("frame_start", -3)
    e = parse_line(ev({"event": "frame_done", "frame": 7, "path": "/o/f.png", "seconds": 1.5}))
    assert (e.kind, e.frame, e.path, e.data["seconds"]) == ("frame_done", 7, "/o/f.png", 1.5)
    e = parse_line(ev({"event": "error", "message": "scene 'S' has no camera"}))
    assert (e.kind, e.message) == ("error", "scene 'S' has no camera")
    assert parse_line("  " + ev({"event": "done"}) + "  ").kind == "done"


def test_script_events_with_wrong_shapes_are_ignored():
    bad = [
        EVENT_PREFIX + "{not json",
        EVENT_PREFIX + "[1, 2]",
        EVENT_PREFIX + '"done"',
        EVENT_PREFIX,
        ev({"frame": 1}),
        ev({"event": 5}),
        ev({"event": ""}),
        ev({"event": "frame_start", "frame": "1"}),
        ev({"event": "frame_start", "frame": True}),
        ev({"event": "frame_start", "frame": 1.0}),
        ev({"event": "frame_start"}),
        ev({"event": "frame_done", "frame": 1}),
        ev({"event": "frame_done", "frame": 1, "path": 3}),
        ev({"event": "error"}),
        ev({"event": "error", "message": ["x"]}),
        ev({"event": "start", "frames": "1-3"}),
        EVENT_PREFIX + '{"event": "frame_start", "frame": ' + "9" * 5000 + "}",
        EVENT_PREFIX + "[" * 100000 + "]" * 100000,
    ]
    for line in bad:
        assert parse_line(line) is None, line[:80]


def test_blender_saved_lines():
    # Blender 5 (CLOG prefix), as printed by bpy 5.0.1, and the bare form of older versions.
    e = parse_line("00:01.394  render           | Saved: '/tmp/out/frame_-000003.png'")
    assert e == Event(kind="saved", path="/tmp/out/frame_-000003.png")
    assert parse_line("Saved: '/a b/it''s.png'").path == "/a b/it''s.png"
    assert parse_line("Saved: no quotes") is None
    assert parse_line('Info: Saved as "demo.blend"') is None


def test_blender_frame_lines():
    line = (
        "Fra:12 Mem:25.02M (Peak 26.00M) | Time:00:00.12 | Mem:0.00M, Peak:0.00M "
        "| Scene, ViewLayer | Sample 1/16"
    )
    assert parse_line(line) == Event(kind="frame", frame=12)
    assert parse_line("Fra:-5 Mem:1M").frame == -5
    assert parse_line("00:00.123  render | Fra:3 Mem:1M").frame == 3
    assert parse_line("Fra:" + "1" * 5000) is None
    assert parse_line("Fra:x") is None
    assert parse_line("Frame 12") is None


def test_other_lines_are_none():
    for line in ["", "hello", "@@renderfar", "Traceback (most recent call last):", "\x00\x01"]:
        assert parse_line(line) is None
    assert parse_line(None) is None  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- properties


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=3000), max_size=20))
def test_splitter_never_raises_and_bounds_lines(chunks):
    s = LineSplitter()
    lines = []
    for c in chunks:
        lines += s.feed(c)
    lines += s.flush()
    for line in lines:
        assert isinstance(line, str) and line
        assert len(line.encode("utf-8", "surrogatepass")) <= MAX_LINE_BYTES * 3 + len(TRUNCATED_MARK.encode())
        assert "\n" not in line and "\r" not in line


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=10), st.integers(min_value=1, max_value=64))
def test_splitter_small_cap_matches_reference(chunks, cap):
    """With a small cap, the output equals a straightforward reference implementation."""
    s = LineSplitter(max_line_bytes=cap)
    got = []
    for c in chunks:
        got += s.feed(c)
    got += s.flush()
    expected = []
    data = b"".join(chunks).replace(b"\r", b"\n")
    for raw in data.split(b"\n"):
        text = raw[:cap].decode("utf-8", "replace").strip()
        if len(raw) > cap:
            expected.append(text + TRUNCATED_MARK)
        elif text:
            expected.append(text)
    assert got == expected


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=500))
def test_parse_line_never_raises(text):
    result = parse_line(text)
    assert result is None or isinstance(result, Event)
    result = parse_line(EVENT_PREFIX + text)
    assert result is None or isinstance(result, Event)


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=20,
    ),
    st.sampled_from(["start", "frame_start", "frame_done", "error", "done", "other"]),
)
def test_parse_line_on_arbitrary_json_events(value, kind):
    obj = {"event": kind, "frame": value, "path": value, "message": value, "frames": value}
    result = parse_line(EVENT_PREFIX + json.dumps(obj))
    if result is not None:
        assert result.kind == kind
        assert result.frame is None or (type(result.frame) is int)
        assert result.path is None or isinstance(result.path, str)
        assert result.message is None or isinstance(result.message, str)
