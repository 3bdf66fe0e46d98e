"""The add-on's packer (blender_addon/packing.py, BAT) on every .blend of the corpus, in place:
each dependency ends up in the pack or is reported missing, and the packed files resolve inside
the pack. The pack is then read the way the server reads an upload (its zip checks and its own
dependency trace), so the add-on and the server agree on what a pack holds."""

from __future__ import annotations

import fnmatch
import zipfile
from pathlib import Path

import pytest

from blender_addon import packing
from server.model_manager.archive import extract_zip
from server.model_manager.deps import find_dependencies
from server.model_manager.limits import ModelLimits

REAL = Path(__file__).resolve().parents[2] / "shared" / "blendfiles" / "real"
BLENDS = sorted(p.relative_to(REAL).as_posix() for p in REAL.rglob("*.blend")) if REAL.is_dir() else []
UNREADABLE = {"corrupt_only_magic.blend"}


def original_deps(blend: Path) -> tuple[set[str], set[str]]:
    """(found, missing) dependency file names of the original, by BAT's trace, the way the server
    traces an upload (root: the corpus folder)."""
    report = find_dependencies(blend, REAL)
    found = {Path(d.resolved).name for d in report.deps if not d.missing}
    missing = {Path(d.resolved).name for d in report.deps if d.missing}
    return found, missing


@pytest.mark.parametrize("name", BLENDS)
def test_every_dependency_is_packed_or_reported_missing(name: str, tmp_path: Path) -> None:
    blend = REAL / name
    if name in UNREADABLE:
        with pytest.raises(packing.PackError, match=r"not a \.blend file BAT can read"):
            packing.pack_scene(blend, blend.parent, tmp_path)
        assert not list(tmp_path.glob("*.zip"))
        return
    project = blend.parent
    try:
        packing.pack_scene(blend, project, tmp_path / "strict")
        reported: list[str] = []
    except packing.MissingFiles as exc:
        reported = exc.missing
        assert reported and not list((tmp_path / "strict").glob("*.zip"))  # nothing to upload
    result = packing.pack_scene(
        blend, project, tmp_path / "allowed", allow_missing=True, main_name=blend.name
    )
    assert result.missing == reported
    assert result.main == blend.name
    assert sorted(zipfile.ZipFile(result.zip_path).namelist()) == result.files
    # the server's own reading of the upload: safe entries, then its dependency trace
    root = tmp_path / "extracted"
    extract_zip(result.zip_path, root, ModelLimits())
    packed = find_dependencies(root / result.main, root)
    assert packed.error is None, packed.error
    for dep in packed.deps:
        if dep.missing:  # a dependency missing from the pack was missing on disk, and said so
            assert any(Path(m).name == Path(dep.resolved).name for m in reported), (dep, reported)
        else:
            assert not dep.outside_root, dep
    found, missing = original_deps(blend)
    for dep_name in found:  # a file, a sequence (a glob such as cache_*.bphys) or a folder
        assert any(
            fnmatch.fnmatch(Path(f).name, dep_name) or dep_name in Path(f).parts[:-1] for f in result.files
        ), (dep_name, result.files)
    assert {Path(m).name for m in reported} >= {m for m in missing if "/" not in m}


def test_the_corpus_is_there() -> None:
    assert len(BLENDS) >= 30, f"corpus at {REAL} has {len(BLENDS)} .blend files"


def test_canceling_stops_the_pack_and_leaves_no_zip(tmp_path: Path) -> None:
    with pytest.raises(packing.Canceled):
        packing.pack_scene(REAL / "linked_cube.blend", REAL, tmp_path, cancelled=lambda: True)
    assert not list(tmp_path.rglob("*.zip"))
