"""The model manager on real files: the shared .blend corpus, zips built here, real Blender."""

from __future__ import annotations

import gc
import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import zstandard

from node_agent.executor.base import BlenderRun, RunOutcome
from node_agent.executor.local import LocalExecutor
from server.model_manager import (
    ModelLimits,
    ModelRejected,
    check_zip,
    extract_zip,
    find_dependencies,
    ingest,
    inspect_blend,
    pick_main,
    read_blend_header,
    safe_blend_filename,
    safe_entry_name,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL = SHARED / "blendfiles" / "real"


def _beside_corpus(rel: str) -> str:
    """Where a ``//../..`` path of a corpus file lands: it depends on where shared/ sits."""
    return os.path.normpath(os.path.join(os.path.abspath(REAL), rel))


GEO = "geometry-nodes"

# Expected outcome of read_blend_header for every .blend of the corpus:
# (compression, version, version_int) or ("refused", status, message fragment).
HEADER_TABLE: dict[str, tuple] = {
    "T55539-particles/particle.blend": ("gzip", "2.79", 279),
    "T55542-smoke/smoke_cache.blend": ("none", "2.79", 279),
    "absolute_path.blend": ("none", "2.80", 280),
    "alembic-source.blend": ("none", "2.79", 279),
    "alembic-user.blend": ("none", "2.79", 279),
    "basic_file.blend": ("none", "2.79", 279),
    "basic_file_compressed.blend": ("gzip", "2.79", 279),
    "basic_file_compressed_zstd.blend": ("zstd", "3.0", 300),
    "basic_file_zstandard.blend": ("zstd", "3.1", 301),
    "basic_file_ñønæščii.blend": ("gzip", "2.79", 279),
    "corrupt_only_magic.blend": ("refused", 422, "corrupt or truncated .blend: no DNA1 block"),
    "doubly_linked.blend": ("none", "2.79", 279),
    "geometry-nodes/file_to_pack.blend": ("none", "2.93", 293),
    "geometry-nodes/node_lib.blend": ("none", "2.93", 293),
    "geometry-nodes/object_lib.blend": ("none", "2.93", 293),
    "geometry-nodes-2/lib_trash.blend": ("none", "3.0", 300),
    "geometry-nodes-2/set_file.blend": ("none", "3.0", 300),
    "geometry-nodes-2/shot_file.blend": ("none", "3.0", 300),
    "image_sequencer.blend": ("none", "2.79", 279),
    "lamp_textures.blend": ("none", "2.79", 279),
    "linked_cube.blend": ("none", "2.79", 279),
    "linked_cube_compressed.blend": ("gzip", "2.79", 279),
    "meshcache-source.blend": ("none", "2.79", 279),
    "meshcache-user.blend": ("none", "2.79", 279),
    "missing_textures.blend": ("none", "2.79", 279),
    "movieclip.blend": ("none", "2.79", 279),
    "multiple_materials.blend": ("none", "2.79", 279),
    "multires_external.blend": ("none", "2.79", 279),
    "ocean_modifier.blend": ("none", "2.79", 279),
    "recursive_dependency_1.blend": ("none", "2.79", 279),
    "recursive_dependency_2.blend": ("none", "2.79", 279),
    "with_sequencer.blend": ("none", "2.79", 279),
}

# Dependencies per corpus file with the corpus folder as root:
# (path as written, kind, resolved, missing, outside_root), in trace order.
HOME = "/home/artist/workspace/bam/blender-asset-tracer/tests/blendfiles"
DEPS_TABLE: dict[str, list[tuple[str, str, str, bool, bool]]] = {
    "basic_file.blend": [],
    "linked_cube.blend": [("//basic_file.blend", "library", "basic_file.blend", False, False)],
    "doubly_linked.blend": [
        ("//linked_cube.blend", "library", "linked_cube.blend", False, False),
        ("//material_textures.blend", "library", "material_textures.blend", True, False),
        ("//basic_file.blend", "library", "basic_file.blend", False, False),
    ],
    "linked_cube_compressed.blend": [
        (f"{HOME}/basic_file.blend", "library", f"{HOME}/basic_file.blend", True, True),
    ],
    "missing_textures.blend": [
        (
            "//textures/HDRI/Myanmar/Golden Palace 2, Old Bagan-1k.exr",
            "image",
            "textures/HDRI/Myanmar/Golden Palace 2, Old Bagan-1k.exr",
            True,
            False,
        ),
        (
            "//textures/Textures/Marble/marble_decoration-color.png",
            "image",
            "textures/Textures/Marble/marble_decoration-color.png",
            True,
            False,
        ),
    ],
    "absolute_path.blend": [
        (
            "//textures/Bricks/brick_dotted_04-color.jpg",
            "image",
            "textures/Bricks/brick_dotted_04-color.jpg",
            True,
            False,
        ),
        (
            f"{HOME}/textures/Textures/Buildings/buildings_roof_04-color.png",
            "image",
            f"{HOME}/textures/Textures/Buildings/buildings_roof_04-color.png",
            True,
            True,
        ),
    ],
    "image_sequencer.blend": [
        ("//imgseq/000210.png", "image", "imgseq/000210.png", False, False),
        (
            "//../../../../cloud/pillar/testfiles/video-tiny.mkv",
            "movie",
            _beside_corpus("../../../../cloud/pillar/testfiles/video-tiny.mkv"),
            True,
            True,
        ),
    ],
    "movieclip.blend": [
        (
            "//../../../../cloud/pillar/testfiles/video.mov",
            "movie",
            _beside_corpus("../../../../cloud/pillar/testfiles/video.mov"),
            True,
            True,
        )
    ],
    "T55539-particles/particle.blend": [
        (
            "//blendcache_particle/43756265_*.bphys",
            "cache",
            "T55539-particles/blendcache_particle/43756265_*.bphys",
            False,
            False,
        )
    ],
    "ocean_modifier.blend": [("//cache_ocean", "cache", "cache_ocean", True, False)],
    "alembic-user.blend": [("//clothsim.abc", "cache", "clothsim.abc", False, False)],
    "meshcache-user.blend": [("//meshcache.mdd", "cache", "meshcache.mdd", False, False)],
    "multires_external.blend": [("//Cube.btx", "mesh", "Cube.btx", False, False)],
    "geometry-nodes/file_to_pack.blend": [
        ("//object_lib.blend", "library", "geometry-nodes/object_lib.blend", False, False),
        ("//node_lib.blend", "library", "geometry-nodes/node_lib.blend", False, False),
    ],
    "geometry-nodes-2/shot_file.blend": [
        ("//set_file.blend", "library", "geometry-nodes-2/set_file.blend", False, False),
        ("//lib_trash.blend", "library", "geometry-nodes-2/lib_trash.blend", False, False),
    ],
}


def small_limits(**kw) -> ModelLimits:
    """Limits small enough for tests to hit; everything else at its default."""
    base = {"max_unpacked_bytes": 50 * 1024 * 1024, "max_entries": 100, "ratio_floor_bytes": 64 * 1024}
    base.update(kw)
    return ModelLimits(**base)


def make_zip(path: Path, entries: dict[str, bytes | Path], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """Write a zip with the given entry names (kept as is) and contents (bytes or a file to copy)."""
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, content in entries.items():
            data = content.read_bytes() if isinstance(content, Path) else content
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return path


def rejected(exc: pytest.ExceptionInfo[ModelRejected], status: int, *fragments: str) -> None:
    assert exc.value.status == status, exc.value
    for fragment in fragments:
        assert fragment in exc.value.message, exc.value.message


# --------------------------------------------------------------------------- headers


def test_header_table_covers_the_corpus() -> None:
    found = {p.relative_to(REAL).as_posix() for p in REAL.rglob("*.blend")}
    assert found == set(HEADER_TABLE), "corpus changed: update HEADER_TABLE"


@pytest.mark.parametrize("name", sorted(HEADER_TABLE))
def test_header_of_each_corpus_file(name: str) -> None:
    expected = HEADER_TABLE[name]
    if expected[0] == "refused":
        with pytest.raises(ModelRejected) as exc:
            read_blend_header(REAL / name)
        rejected(exc, expected[1], expected[2])
        return
    header = read_blend_header(REAL / name)
    assert (header.compression, header.version, header.version_int) == expected
    assert header.pointer_size == 8 and header.endianness == "little" and header.format_version == 0
    if header.compression == "none":
        assert header.unpacked_bytes == (REAL / name).stat().st_size
    else:
        assert header.unpacked_bytes > (REAL / name).stat().st_size


@pytest.mark.parametrize(
    "name",
    ["basic_file.blend", "basic_file_compressed.blend", "basic_file_zstandard.blend", "doubly_linked.blend"],
)
def test_truncated_copy_is_refused(tmp_path: Path, name: str) -> None:
    data = (REAL / name).read_bytes()
    cut = tmp_path / name
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelRejected) as exc:
        read_blend_header(cut)
    rejected(exc, 422, "corrupt or truncated .blend: ")


def test_blend_without_endb_is_refused(tmp_path: Path) -> None:
    data = (REAL / "basic_file.blend").read_bytes()
    assert data[-24:-20] == b"ENDB"  # legacy 8-byte-pointer block header is 24 bytes
    cut = tmp_path / "no_endb.blend"
    cut.write_bytes(data[:-24])
    with pytest.raises(ModelRejected) as exc:
        read_blend_header(cut)
    rejected(exc, 422, "ENDB")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "(empty file)"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "89 50 4e 47"),
        (b"BLENDEX-v279" + b"\0" * 64, "unknown magic"),
        (gzip.compress(b"just some text, not a blend file"), "gzip-compressed data that does not start"),
        (zstandard.ZstdCompressor().compress(b"PK\x03\x04 not a blend"), "zstd-compressed data"),
    ],
)
def test_wrong_magic_is_415(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "upload.blend"
    path.write_bytes(content)
    with pytest.raises(ModelRejected) as exc:
        read_blend_header(path)
    rejected(exc, 415, "not a .blend file", fragment)


def test_bad_header_after_magic_is_422(tmp_path: Path) -> None:
    path = tmp_path / "bad.blend"
    path.write_bytes(b"BLENDER-vXYZ" + b"\0" * 100)
    with pytest.raises(ModelRejected) as exc:
        read_blend_header(path)
    rejected(exc, 422, "bad file header")


def test_corrupt_gzip_stream_is_422(tmp_path: Path) -> None:
    data = bytearray((REAL / "basic_file_compressed.blend").read_bytes())
    data[2000:2100] = b"\xff" * 100
    path = tmp_path / "broken.blend"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelRejected) as exc:
        read_blend_header(path)
    rejected(exc, 422, "corrupt or truncated .blend: gzip stream")


def test_decompression_cap(tmp_path: Path) -> None:
    with pytest.raises(ModelRejected) as exc:
        read_blend_header(REAL / "basic_file_zstandard.blend", max_unpacked_bytes=200_000)
    rejected(exc, 413, "decompresses to more than 200000 bytes")
    assert read_blend_header(REAL / "basic_file_zstandard.blend", max_unpacked_bytes=600_000).version == "3.1"


# --------------------------------------------------------------------------- dependencies


@pytest.mark.parametrize("name", sorted(DEPS_TABLE))
def test_dependency_table(name: str) -> None:
    report = find_dependencies(REAL / name, REAL)
    assert report.error is None
    got = [(d.path, d.kind, d.resolved, d.missing, d.outside_root) for d in report.deps]
    assert got == DEPS_TABLE[name]
    assert report.missing == [d[0] for d in DEPS_TABLE[name] if d[3]]


def test_trace_stays_inside_root(tmp_path: Path) -> None:
    """A library that resolves outside the root (here through a symlink) is listed, not opened."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copyfile(REAL / "doubly_linked.blend", root / "doubly_linked.blend")
    (root / "linked_cube.blend").symlink_to(REAL / "linked_cube.blend")
    report = find_dependencies(root / "doubly_linked.blend", root)
    assert report.error is None
    by_path = {d.path: d for d in report.deps}
    linked = by_path["//linked_cube.blend"]
    assert linked.outside_root and linked.missing
    assert linked.resolved == str((REAL / "linked_cube.blend").resolve())
    # basic_file.blend is linked by linked_cube.blend: not traced, so not listed
    assert "//basic_file.blend" not in by_path
    assert by_path["//material_textures.blend"].missing


def test_trace_of_non_blend_reports_instead_of_raising(tmp_path: Path) -> None:
    junk = tmp_path / "junk.blend"
    junk.write_bytes(b"BLENDER-v279" + os.urandom(4000))
    report = find_dependencies(junk, tmp_path)
    assert report.deps == [] and report.error and "dependency trace stopped" in report.error
    outside = find_dependencies(REAL / "basic_file.blend", tmp_path)
    assert outside.deps == [] and "not a regular file inside the model folder" in (outside.error or "")


def test_no_file_handle_leaks(tmp_path: Path) -> None:
    """Refused and traced files are closed at once, not when the garbage collector runs."""
    data = (REAL / "basic_file_compressed.blend").read_bytes()
    (tmp_path / "cut.blend").write_bytes(data[: len(data) // 2])
    files = [*sorted(REAL.rglob("*.blend")), tmp_path / "cut.blend"]
    fd_dir = Path("/proc/self/fd")
    gc.disable()
    try:
        before = len(list(fd_dir.iterdir()))
        kept = []  # keep the errors (and their tracebacks) alive, as a caller might
        for path in files:
            try:
                read_blend_header(path)
            except ModelRejected as exc:
                kept.append(exc)
            kept.append(find_dependencies(path, path.parent))
        assert len(list(fd_dir.iterdir())) == before
        assert sum(isinstance(k, ModelRejected) for k in kept) == 2
    finally:
        gc.enable()


# --------------------------------------------------------------------------- zips


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("../evil.blend", "leaves the archive root"),
        ("textures/../../evil.png", "leaves the archive root"),
        ("/abs.blend", "absolute path"),
        ("C:\\evil.blend", "drive letter"),
        ("c:evil.blend", "drive letter"),
        ("textures\\..\\..\\evil.png", "leaves the archive root"),
        ("\\\\server\\share\\evil.png", "absolute path"),
        ("a/b:stream", "':'"),
        ("bad\x01name", "control character"),
        ("./", "empty name"),
    ],
)
def test_unsafe_entry_names(tmp_path: Path, name: str, fragment: str) -> None:
    upload = make_zip(tmp_path / "u.zip", {"scene.blend": REAL / "basic_file.blend", name: b"x"})
    with pytest.raises(ModelRejected) as exc:
        check_zip(upload, small_limits())
    rejected(exc, 400, repr(name), fragment)
    with pytest.raises(ModelRejected):
        extract_zip(upload, tmp_path / "out", small_limits())
    assert not any((tmp_path / "out").rglob("*evil*"))
    assert not (tmp_path / "evil.blend").exists() and not Path("/abs.blend").exists()


def test_backslashes_are_separators() -> None:
    assert safe_entry_name("textures\\a.png") == "textures/a.png"
    assert safe_entry_name("./a//b/./c.png") == "a/b/c.png"


def test_symlink_entry_is_refused(tmp_path: Path) -> None:
    info = zipfile.ZipInfo("link.blend")
    info.create_system = 3
    info.external_attr = (0o120777 << 16) & 0xFFFF0000
    with zipfile.ZipFile(tmp_path / "u.zip", "w") as zf:
        zf.writestr("scene.blend", b"BLENDER")
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(ModelRejected) as exc:
        check_zip(tmp_path / "u.zip", small_limits())
    rejected(exc, 400, "'link.blend'", "symbolic link")


def test_duplicate_and_clashing_entries(tmp_path: Path) -> None:
    dup = tmp_path / "dup.zip"
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(dup, "w") as zf:
        zf.writestr("scene.blend", b"1")
        zf.writestr("scene.blend", b"2")
    with pytest.raises(ModelRejected) as exc:
        check_zip(dup, small_limits())
    rejected(exc, 400, "'scene.blend'", "same path")
    # the same path spelt two ways
    make_zip(tmp_path / "dup2.zip", {"tex/a.png": b"1", "tex\\a.png": b"2"})
    with pytest.raises(ModelRejected) as exc:
        check_zip(tmp_path / "dup2.zip", small_limits())
    rejected(exc, 400, "same path")
    make_zip(tmp_path / "clash.zip", {"tex": b"file", "tex/a.png": b"2"})
    with pytest.raises(ModelRejected) as exc:
        check_zip(tmp_path / "clash.zip", small_limits())
    rejected(exc, 400, "'tex/a.png'", "which is a file")


def test_not_a_zip_and_corrupt_zip(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.zip"
    bogus.write_bytes(b"PK\x03\x04" + os.urandom(200))
    with pytest.raises(ModelRejected) as exc:
        check_zip(bogus, small_limits())
    rejected(exc, 400, "not a zip archive, or a corrupt one")
    good = make_zip(tmp_path / "good.zip", {"scene.blend": REAL / "basic_file.blend"})
    cut = tmp_path / "cut.zip"
    cut.write_bytes(good.read_bytes()[:-30])
    with pytest.raises(ModelRejected) as exc:
        check_zip(cut, small_limits())
    rejected(exc, 400, "corrupt")


def _zeros_zip(path: Path, size: int) -> Path:
    chunk = b"\0" * (1024 * 1024)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("scene.blend", b"BLENDER")
        info = zipfile.ZipInfo("bomb.bin")
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w", force_zip64=True) as out:
            for _ in range(size // len(chunk)):
                out.write(chunk)
    return path


def test_zip_bomb_ratio_and_total(tmp_path: Path) -> None:
    started = time.monotonic()
    bomb = _zeros_zip(tmp_path / "bomb.zip", 200 * 1024 * 1024)
    assert bomb.stat().st_size < 1024 * 1024  # ~1000:1
    with pytest.raises(ModelRejected) as exc:
        check_zip(bomb, ModelLimits())  # the default limits already refuse it
    rejected(exc, 413, "'bomb.bin'", "zip bomb")
    with pytest.raises(ModelRejected) as exc:
        extract_zip(bomb, tmp_path / "out", small_limits(max_ratio=10_000.0))
    rejected(exc, 413, "unpacks to more than")
    assert not (tmp_path / "out" / "bomb.bin").exists()
    assert time.monotonic() - started < 20


def test_whole_archive_ratio(tmp_path: Path) -> None:
    """Many entries each under the ratio cap can still make a bomb together."""
    entries = {f"part{i}.bin": b"\0" * 40_000 for i in range(40)}
    upload = make_zip(tmp_path / "u.zip", entries)
    limits = small_limits(ratio_floor_bytes=1_000_000, max_ratio=50.0)
    with pytest.raises(ModelRejected) as exc:
        check_zip(upload, limits)
    rejected(exc, 413, "the zip unpacks")
    assert len(check_zip(upload, small_limits(ratio_floor_bytes=1_000_000, max_ratio=1000.0))) == 40


def test_too_many_entries(tmp_path: Path) -> None:
    upload = make_zip(tmp_path / "u.zip", {f"f{i}.txt": b"x" for i in range(6)})
    with pytest.raises(ModelRejected) as exc:
        check_zip(upload, small_limits(max_entries=5))
    rejected(exc, 413, "6 entries, more than 5")
    assert len(check_zip(upload, small_limits(max_entries=6))) == 6


def _patch_sizes(path: Path, name: bytes, new_size: int) -> None:
    """Rewrite the uncompressed size of ``name`` in its local header and central directory."""
    data = bytearray(path.read_bytes())
    local = data.index(b"PK\x03\x04" + b"\x14\x00")  # first local header
    while True:
        n = struct.unpack_from("<H", data, local + 26)[0]
        if data[local + 30 : local + 30 + n] == name:
            struct.pack_into("<I", data, local + 22, new_size)
            break
        local = data.index(b"PK\x03\x04", local + 4)
    central = data.index(b"PK\x01\x02")
    while True:
        n = struct.unpack_from("<H", data, central + 28)[0]
        if data[central + 46 : central + 46 + n] == name:
            struct.pack_into("<I", data, central + 24, new_size)
            break
        central = data.index(b"PK\x01\x02", central + 4)
    path.write_bytes(bytes(data))


def test_zip_whose_headers_lie_about_sizes(tmp_path: Path) -> None:
    upload = make_zip(tmp_path / "liar.zip", {"scene.blend": b"BLENDER", "big.bin": b"\0" * 5_000_000})
    _patch_sizes(upload, b"big.bin", 1000)  # claims 1000 bytes, inflates to 5 MB
    entries = check_zip(upload, small_limits())  # the directory alone looks harmless
    assert [e.size for e in entries if e.name == "big.bin"] == [1000]
    with pytest.raises(ModelRejected) as exc:
        extract_zip(upload, tmp_path / "out", small_limits())
    rejected(exc, 400, "'big.bin'", "cannot be extracted")
    written = tmp_path / "out" / "big.bin"
    assert written.stat().st_size <= 1000
    # the other way round: claims more than it holds
    short = make_zip(tmp_path / "short.zip", {"small.bin": b"\0" * 1000})
    _patch_sizes(short, b"small.bin", 5000)
    with pytest.raises(ModelRejected) as exc:
        extract_zip(short, tmp_path / "out2", small_limits())
    rejected(exc, 400, "'small.bin'")


def test_extract_geometry_nodes_zip_resolves_libraries(tmp_path: Path) -> None:
    folder = REAL / GEO
    upload = make_zip(tmp_path / "geo.zip", {f"{GEO}/{p.name}": p for p in sorted(folder.glob("*.blend"))})
    entries = extract_zip(upload, tmp_path / "files", small_limits())
    assert sorted(e.name for e in entries) == sorted(f"{GEO}/{p.name}" for p in folder.glob("*.blend"))
    for entry in entries:
        assert (tmp_path / "files" / entry.name).read_bytes() == (folder / Path(entry.name).name).read_bytes()
        assert oct((tmp_path / "files" / entry.name).stat().st_mode & 0o777) == oct(0o644)
    report = find_dependencies(tmp_path / "files" / GEO / "file_to_pack.blend", tmp_path / "files")
    assert report.error is None
    assert [(d.resolved, d.kind, d.missing, d.outside_root) for d in report.deps] == [
        (f"{GEO}/object_lib.blend", "library", False, False),
        (f"{GEO}/node_lib.blend", "library", False, False),
    ]


def test_pick_main() -> None:
    limits_free = [
        ("scene.blend", False),
        ("libs/lib.blend", False),
        ("__MACOSX/._scene.blend", False),
        ("textures/", True),
    ]
    from server.model_manager import ZipEntry

    entries = [ZipEntry(n, n, 1, 1, d) for n, d in limits_free]
    assert pick_main(entries, None) == "scene.blend"
    assert pick_main(entries, "libs\\lib.blend") == "libs/lib.blend"
    with pytest.raises(ModelRejected) as exc:
        pick_main(entries, "textures/")
    assert exc.value.field == "main" and exc.value.status == 400
    with pytest.raises(ModelRejected) as exc:
        pick_main(entries, "../scene.blend")
    assert exc.value.field == "main"
    two = [*entries, ZipEntry("other.BLEND", "other.BLEND", 1, 1, False)]
    with pytest.raises(ModelRejected) as exc:
        pick_main(two, None)
    rejected(exc, 400, "other.BLEND, scene.blend")
    with pytest.raises(ModelRejected) as exc:
        pick_main([ZipEntry("a.txt", "a.txt", 1, 1, False)], None)
    rejected(exc, 400, "no .blend")


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("basic_file_ñønæščii.blend", "basic_file_ñønæščii.blend"),
        ("../../etc/scene.blend", "scene.blend"),
        ("C:\\Users\\artist\\shot 01.blend", "shot 01.blend"),
        ("scene", "scene.blend"),
        ("tab\there.blend", "tabhere.blend"),
    ],
)
def test_safe_blend_filename(given: str, stored: str) -> None:
    assert safe_blend_filename(given) == stored


@pytest.mark.parametrize("given", ["", "   ", ".", "..", "dir/", ".hidden.blend", "a/.."])
def test_unusable_blend_filename(given: str) -> None:
    with pytest.raises(ModelRejected) as exc:
        safe_blend_filename(given)
    rejected(exc, 400, "unusable file name")


# --------------------------------------------------------------------------- ingest without Blender runs


class CountingExecutor(LocalExecutor):
    """The real local executor, counting the Blender runs it starts."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[BlenderRun] = []

    async def run(self, run: BlenderRun, on_line, cancel=None) -> RunOutcome:  # type: ignore[override]
        self.runs.append(run)
        return await super().run(run, on_line, cancel)


@pytest.fixture
def executor() -> CountingExecutor:
    return CountingExecutor()


async def test_ingest_refuses_before_blender(tmp_path: Path, executor: CountingExecutor) -> None:
    png = tmp_path / "image.blend"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    cases = [
        (REAL / "corrupt_only_magic.blend", "corrupt_only_magic.blend", None, 422, "no DNA1 block"),
        (png, "image.blend", None, 415, "not a .blend file or zip archive"),
        (REAL / "basic_file.blend", "..", None, 400, "unusable file name"),
    ]
    geo = make_zip(tmp_path / "geo.zip", {p.name: p for p in sorted((REAL / GEO).glob("*.blend"))})
    cases.append((geo, "geo.zip", None, 400, "file_to_pack.blend, node_lib.blend, object_lib.blend"))
    cases.append((geo, "geo.zip", "nope.blend", 400, "'nope.blend' is not a .blend file in the zip"))
    empty = make_zip(tmp_path / "empty.zip", {"readme.txt": b"hi"})
    cases.append((empty, "empty.zip", None, 400, "no .blend"))
    bad_main = make_zip(tmp_path / "bad.zip", {"scene.blend": b"BLENDER-v279 and then nothing"})
    cases.append((bad_main, "bad.zip", None, 422, "corrupt or truncated .blend"))
    cases.append((REAL / "basic_file.blend", "big.blend", None, 413, "more than 1000"))
    for i, (upload, filename, main, status, fragment) in enumerate(cases):
        dest = tmp_path / f"model{i}"
        limits = small_limits(max_upload_bytes=1000) if filename == "big.blend" else small_limits()
        with pytest.raises(ModelRejected) as exc:
            await ingest(upload, filename, dest, limits, executor, main=main)
        rejected(exc, status, fragment)
        if "main" in fragment or "several" in exc.value.message:
            assert exc.value.field == "main"
        assert not dest.exists() or not any(dest.iterdir()), f"left files behind for {filename}"
    assert executor.runs == []
    assert upload.exists()  # the caller's upload is never consumed


# --------------------------------------------------------------------------- with Blender


@pytest.mark.blender
async def test_ingest_basic_file(tmp_path: Path, executor: CountingExecutor) -> None:
    info = await ingest(
        REAL / "basic_file.blend",
        "C:\\Users\\artist\\basic_file.blend",
        tmp_path / "m",
        ModelLimits(),
        executor,
    )
    data = info.to_dict()
    json.dumps(data)  # JSON-ready
    assert (data["kind"], data["filename"], data["main"], data["version"], data["compression"]) == (
        "blend",
        "basic_file.blend",
        "basic_file.blend",
        "2.79",
        "none",
    )
    assert data["blender_version"][:2] == [2, 79]
    assert data["active_scene"] == "Scene"
    (scene,) = data["scenes"]
    assert scene["camera"] is None and scene["cameras"] == []
    assert (scene["output_format"], scene["media_type"]) == ("FFMPEG", "VIDEO")
    assert (scene["frame_start"], scene["frame_end"], scene["frame_step"], scene["fps"]) == (1, 250, 1, 24.0)
    assert (scene["resolution_x"], scene["resolution_y"], scene["resolution_percentage"]) == (1920, 1080, 50)
    assert (scene["engine"], scene["samples"]) == ("CYCLES", 128)
    assert scene["renderable"] is False and scene["problem"] == "no camera"
    assert data["missing"] == [] and data["dependencies"] == []
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["files"]  # no work dir left behind
    assert (tmp_path / "m" / "files" / "basic_file.blend").read_bytes() == (
        REAL / "basic_file.blend"
    ).read_bytes()
    (run,) = executor.runs
    assert run.args[0].endswith("files/basic_file.blend") and not run.cwd.exists()


@pytest.mark.blender
async def test_ingest_sequencer_file_is_renderable(tmp_path: Path, executor: CountingExecutor) -> None:
    info = await ingest(
        REAL / "with_sequencer.blend", "with_sequencer.blend", tmp_path / "m", ModelLimits(), executor
    )
    (scene,) = info.scenes
    assert scene["camera"] is None
    assert scene["use_sequencer"] is True and scene["sequencer_strips"] == 3
    assert scene["renderable"] is True and scene["problem"] is None
    assert (scene["frame_start"], scene["frame_end"]) == (1, 45)


@pytest.mark.blender
async def test_ingest_non_ascii_gzip_name(tmp_path: Path, executor: CountingExecutor) -> None:
    name = "basic_file_ñønæščii.blend"
    info = await ingest(REAL / name, name, tmp_path / "m", ModelLimits(), executor)
    assert info.main == name and info.files == [name] and info.compression == "gzip"
    assert (tmp_path / "m" / "files" / name).is_file()
    assert info.scenes[0]["problem"] == "no camera"


@pytest.mark.blender
async def test_ingest_geometry_nodes_zip(tmp_path: Path, executor: CountingExecutor) -> None:
    folder = REAL / GEO
    upload = make_zip(tmp_path / "geo.zip", {f"proj/{p.name}": p for p in sorted(folder.glob("*.blend"))})
    info = await ingest(
        upload,
        "../up\tloads/geo.zip",
        tmp_path / "m",
        small_limits(),
        executor,
        main="proj/file_to_pack.blend",
    )
    assert (info.kind, info.filename, info.main) == ("zip", "geo.zip", "proj/file_to_pack.blend")
    assert info.version == "2.93"
    assert info.files == sorted(f"proj/{p.name}" for p in folder.glob("*.blend"))
    assert info.missing == []
    assert {d["resolved"] for d in info.dependencies} == {"proj/object_lib.blend", "proj/node_lib.blend"}
    assert sorted((lib["filepath"], lib["missing"]) for lib in info.libraries) == [
        ("//node_lib.blend", False),
        ("//object_lib.blend", False),
    ]


@pytest.mark.blender
async def test_ingest_reports_missing_library(tmp_path: Path, executor: CountingExecutor) -> None:
    info = await ingest(
        REAL / "doubly_linked.blend", "doubly_linked.blend", tmp_path / "m", ModelLimits(), executor
    )
    # uploaded alone: both of its libraries are missing, per BAT and per Blender
    assert info.missing == ["//linked_cube.blend", "//material_textures.blend"]
    assert sorted((lib["filepath"], lib["missing"]) for lib in info.libraries) == [
        ("//linked_cube.blend", True),
        ("//material_textures.blend", True),
    ]


@pytest.mark.blender
async def test_blender_abort_and_timeout_are_422(tmp_path: Path, executor: CountingExecutor) -> None:
    # Blender 5.0.1 aborts (Mantaflow, SIGABRT) while loading this 2.79 smoke simulation
    smoke = REAL / "T55542-smoke" / "smoke_cache.blend"
    with pytest.raises(ModelRejected) as exc:
        await ingest(smoke, "smoke_cache.blend", tmp_path / "m", ModelLimits(), executor)
    rejected(exc, 422, "Blender could not open the file: ")
    assert not (tmp_path / "m").exists()
    with pytest.raises(ModelRejected) as exc:
        await inspect_blend(REAL / "basic_file.blend", tmp_path / "w", executor, timeout_s=0.05)
    rejected(exc, 422, "Blender could not open the file: the inspection timeout")
    assert list((tmp_path / "w").iterdir()) == []


MAKE_FILES = r"""
import sys, bpy
out = sys.argv[1]
bpy.ops.wm.read_factory_settings(use_empty=True)
def image(name, path, source):
    img = bpy.data.images.new(name, 4, 4)
    img.source = source
    img.filepath = path
    img.use_fake_user = True
image("seq", "//seq/frame_####.png", "SEQUENCE")
image("tiles", "//tiles/t.<UDIM>.png", "TILED")
image("win", "C:\\textures\\wall.png", "FILE")
image("backslash", "//tex\\brick.png", "FILE")
image("gone", "//seq/none_####.png", "SEQUENCE")
# relative_remap=False: keep the paths exactly as set (Blender would rewrite them on save)
bpy.ops.wm.save_as_mainfile(filepath=out + "/made_zstd.blend", compress=True, relative_remap=False)
bpy.ops.wm.save_as_mainfile(filepath=out + "/made_plain.blend", compress=False, relative_remap=False)
"""


@pytest.fixture(scope="module")
def made_by_blender_5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Files saved by this Blender (5.x header), with sequence, UDIM and Windows image paths."""
    out = tmp_path_factory.mktemp("made")
    subprocess.run([sys.executable, "-c", MAKE_FILES, str(out)], check=True, capture_output=True, timeout=120)
    # Files saved on Windows keep backslashes; Blender may turn them into slashes on
    # save, so make sure of them byte for byte (same length) in the uncompressed file.
    plain = out / "made_plain.blend"
    data = plain.read_bytes()
    for slashed, written in [
        (b"C:/textures/wall.png\0", b"C:\\textures\\wall.png\0"),
        (b"//tex/brick.png\0", b"//tex\\brick.png\0"),
    ]:
        data = data.replace(slashed, written)
        assert data.count(written) == 1
    plain.write_bytes(data)
    (out / "seq").mkdir()
    (out / "seq" / "frame_0007.png").write_bytes(b"png")
    (out / "tiles").mkdir()
    (out / "tiles" / "t.1001.png").write_bytes(b"png")
    (out / "tex").mkdir()
    (out / "tex" / "brick.png").write_bytes(b"png")
    return out


@pytest.mark.blender
def test_blender_5_header_and_sequences(made_by_blender_5: Path) -> None:
    zstd = read_blend_header(made_by_blender_5 / "made_zstd.blend")
    plain = read_blend_header(made_by_blender_5 / "made_plain.blend")
    assert (zstd.compression, plain.compression) == ("zstd", "none")
    for header in (zstd, plain):
        assert (header.version, header.format_version, header.pointer_size) == ("5.0", 1, 8)
        assert header.version_int == 500
    assert (
        zstd.unpacked_bytes == plain.unpacked_bytes == (made_by_blender_5 / "made_plain.blend").stat().st_size
    )
    report = find_dependencies(made_by_blender_5 / "made_plain.blend", made_by_blender_5)
    assert report.error is None
    got = {d.path: (d.resolved, d.missing, d.outside_root, d.sequence) for d in report.deps}
    assert got == {
        "//seq/frame_####.png": ("seq/frame_####.png", False, False, True),
        "//tiles/t.<UDIM>.png": ("tiles/t.<UDIM>.png", False, False, True),
        # the file holds backslashes; BAT's BlendPath reads them as slashes, as Blender does
        "C:/textures/wall.png": ("C:/textures/wall.png", True, True, False),
        "//tex/brick.png": ("tex/brick.png", False, False, False),
        "//seq/none_####.png": ("seq/none_####.png", True, False, True),
    }


def test_utf8_names_without_the_utf8_flag_are_read_as_utf8(tmp_path: Path) -> None:
    """Info-ZIP's zip writes UTF-8 names without bit 11; Python would read them as cp437."""
    real = "tex/wöod.png".encode()
    placeholder = b"tex/wXXod.png"
    assert len(real) == len(placeholder)
    path = tmp_path / "infozip.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(placeholder.decode(), b"png bytes")
    path.write_bytes(path.read_bytes().replace(placeholder, real))
    with zipfile.ZipFile(path) as zf:
        assert zf.infolist()[0].filename != "tex/wöod.png"  # what Python alone would make of it
    [entry] = [e for e in check_zip(path, small_limits()) if not e.is_dir]
    assert entry.name == "tex/wöod.png"
    extract_zip(path, tmp_path / "out", small_limits())
    assert (tmp_path / "out" / "tex" / "wöod.png").read_bytes() == b"png bytes"
