"""Frame specs and chunking (protocol.frames)."""

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.frames import MAX_FRAME, MIN_FRAME, FrameSpecError, chunk_frames, format_frames, parse_frames


@pytest.mark.parametrize(
    ("spec", "frames"),
    [
        ("7", [7]),
        ("1-10", list(range(1, 11))),
        ("1-10,20-25", [*range(1, 11), *range(20, 26)]),
        ("1-99x2", list(range(1, 100, 2))),
        ("-5-5", list(range(-5, 6))),
        ("-10--1", list(range(-10, 0))),
        (" 1 - 3 ,  5 ", [1, 2, 3, 5]),
        ("1-10x3", [1, 4, 7, 10]),
        ("3,1-2,2", [1, 2, 3]),
        ("0", [0]),
    ],
)
def test_parse(spec: str, frames: list[int]) -> None:
    assert parse_frames(spec) == frames


def test_negative_range_is_eleven_frames() -> None:
    assert len(parse_frames("-5-5")) == 11


@pytest.mark.parametrize(
    ("spec", "token"),
    [
        ("1 10", "1 10"),
        ("1-10x0", "1-10x0"),
        ("1-10x-1", "1-10x-1"),
        ("5-1", "5-1"),
        ("abc", "abc"),
        ("1,abc,3", "abc"),
        ("1-", "1-"),
        ("x2", "x2"),
        ("1--", "1--"),
    ],
)
def test_bad_specs_name_the_token(spec: str, token: str) -> None:
    with pytest.raises(FrameSpecError) as err:
        parse_frames(spec)
    assert err.value.token == token
    assert repr(token) in str(err.value)


@pytest.mark.parametrize(
    "spec", ["", "   ", "1,,2", "1,", f"{MIN_FRAME - 1}", f"0-{MAX_FRAME + 1}", "1-1000000", "1" * 1025]
)
def test_refused(spec: str) -> None:
    with pytest.raises(FrameSpecError):
        parse_frames(spec)


@pytest.mark.parametrize("spec", ["100000000", "-100000000", "999999999999999999999", "1-100000000"])
def test_out_of_range_frames_say_so(spec: str) -> None:
    with pytest.raises(FrameSpecError, match="frames must lie within"):
        parse_frames(spec)


@pytest.mark.parametrize("spec", ["１-３", "٣", "1\u00a0-3", "1\n2"])
def test_only_ascii_digits_and_plain_spaces(spec: str) -> None:
    with pytest.raises(FrameSpecError):
        parse_frames(spec)


def test_chunks_take_the_list_not_the_range() -> None:
    assert chunk_frames(parse_frames("1-10x3"), 2) == [[1, 4], [7, 10]]
    assert chunk_frames(parse_frames("1-10"), 3)[-1] == [10]
    with pytest.raises(ValueError):
        chunk_frames([1, 2], 0)


def test_format_round_trip() -> None:
    assert format_frames([1, 2, 3, 7, -2, -1]) == "-2--1,1-3,7"
    assert parse_frames(format_frames([5, 1, 2, 9])) == [1, 2, 5, 9]


items = st.tuples(st.integers(-2000, 2000), st.integers(0, 300), st.integers(1, 7)).map(
    lambda t: f"{t[0]}-{t[0] + t[1]}x{t[2]}" if t[1] else str(t[0])
)


@given(st.lists(items, min_size=1, max_size=20), st.integers(1, 50))
def test_chunks_cover_every_frame_exactly_once(parts: list[str], chunk: int) -> None:
    spec = ",".join(parts)
    frames = parse_frames(spec)
    chunks = chunk_frames(frames, chunk)
    flat = [f for c in chunks for f in c]
    assert flat == frames  # each frame once, in order
    assert len(set(flat)) == len(flat)
    assert all(1 <= len(c) <= chunk for c in chunks)
    assert all(len(c) == chunk for c in chunks[:-1])


@given(st.text(max_size=1024))
def test_arbitrary_text_parses_or_raises_frame_spec_error(spec: str) -> None:
    try:
        frames = parse_frames(spec)
    except FrameSpecError:
        return
    assert frames == sorted(set(frames))


@pytest.mark.parametrize(
    "spec",
    [
        ",".join(["-1048574-1048574x9999"] * 46)[:1024],
        ",".join([f"{i}-{i + 90}" for i in range(0, 100000, 100)])[:1024].rsplit(",", 1)[0],
        "9" * 1024,
    ],
)
def test_worst_case_inputs_parse_quickly(spec: str) -> None:
    # A guard on complexity (work is linear in frames named, capped at 100,000), not a benchmark.
    t = time.perf_counter()
    try:
        parse_frames(spec)
    except FrameSpecError:
        pass
    assert time.perf_counter() - t < 0.1
