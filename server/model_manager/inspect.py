"""Metadata of a .blend, read by Blender itself in a run sandboxed like a render.

The run goes through a render executor (``node_agent.executor``: a local
subprocess or a container), with ``templates/inspect_model.py``: auto-run
scripts off, the file opened without UI and scripts, a fresh empty working
folder, a hard timeout. Blender's answer is JSON written by the script; nothing
in it is ever evaluated.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from node_agent.executor.base import BlenderRun, Executor
from templates import template_path

from .errors import ModelRejected

SCRIPT_NAME = "inspect_model.py"
ERROR_PREFIX = "inspect_model: error: "
"""Prefix of the one line the script prints when it fails (see the template)."""

MAX_RESULT_BYTES = 16 * 1024 * 1024
"""Largest inspection JSON read back, in bytes (a file with many scenes is still far below)."""

_NOISE_PREFIXES = ("Traceback (most recent call last)", "File ", "^", "~")


def _last_meaningful_line(lines: list[str]) -> str:
    """The script's error line if any, else the last line that is not traceback noise."""
    for line in reversed(lines):
        if ERROR_PREFIX in line:
            return line.split(ERROR_PREFIX, 1)[1].strip()
    for line in reversed(lines):
        text = line.strip()
        if text and not text.startswith(_NOISE_PREFIXES) and not line.startswith("    "):
            return text
    return "no output"


def _reject(why: str) -> ModelRejected:
    return ModelRejected(422, f"Blender could not open the file: {why}")


async def inspect_blend(
    blend_path: Path,
    work_dir: Path,
    executor: Executor,
    timeout_s: float,
    stall_timeout_s: float | None = None,
) -> dict[str, Any]:
    """Open ``blend_path`` in Blender and return what it says about the file.

    Args:
        blend_path: the .blend to inspect (its libraries resolve from its folder).
        work_dir: a folder of the caller's (created if missing) for the result
            JSON and the run's empty working folder (``cwd`` and ``HOME``);
            both are removed before returning.
        executor: a render executor (``LocalExecutor()``, a container executor).
        timeout_s: hard limit of the Blender run, in seconds.
        stall_timeout_s: kill the run after this many seconds without output;
            defaults to ``timeout_s``.

    Returns:
        The script's JSON (see ``templates/inspect_model.py``): ``blender_version``
        (list of 3 ints, the file's), ``active_scene``, ``scenes`` (list of dicts),
        ``libraries`` (list of ``{name, filepath, missing}``), ``images_missing``.

    Raises:
        ModelRejected: 422 ``"Blender could not open the file: <reason>"`` when
            the run fails, crashes, times out or writes no valid result; the
            reason is the last meaningful log line.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="inspect-", dir=work_dir))
    try:
        cwd = scratch / "cwd"
        cwd.mkdir()
        out = scratch / "result.json"
        run = BlenderRun(
            script=template_path(SCRIPT_NAME),
            args=[str(Path(blend_path).resolve()), str(out)],
            cwd=cwd,
            timeout_s=timeout_s,
            stall_timeout_s=stall_timeout_s if stall_timeout_s is not None else timeout_s,
        )
        outcome = await executor.run(run, lambda _line: None)
        if outcome.reason in ("timeout", "stalled"):
            raise _reject(f"the inspection {outcome.reason} after {outcome.duration_s:.0f} s")
        if not outcome.ok:
            why = _last_meaningful_line(outcome.log_tail)
            if outcome.exit_code is not None and outcome.exit_code < 0:
                why = f"Blender was killed by signal {-outcome.exit_code} ({why})"
            raise _reject(why)
        try:
            if out.stat().st_size > MAX_RESULT_BYTES:
                raise _reject("the inspection result is too large")
            data = json.loads(out.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise _reject(f"no inspection result ({type(exc).__name__})") from exc
        if not isinstance(data, dict) or not isinstance(data.get("scenes"), list):
            raise _reject("the inspection result has no scenes")
        return data
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
