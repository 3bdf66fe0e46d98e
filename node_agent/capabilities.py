"""What this machine offers: CPU cores, memory, GPUs and their Cycles backends, Blender version, tags."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
from typing import Any


def detect_gpus(timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """NVIDIA GPUs as ``[{"name": str, "memory_bytes": int, "index": int}]`` through ``nvidia-smi``.

    Returns an empty list when ``nvidia-smi`` is absent or fails (no GPU, no driver).
    """
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[0].isdigit():
            mib = int(parts[2]) if parts[2].isdigit() else 0
            gpus.append({"index": int(parts[0]), "name": parts[1], "memory_bytes": mib << 20})
    return gpus


def blender_version(blender: str | None) -> str:
    """The Blender version the agent renders with: the ``bpy`` module's, or ``""`` for a binary
    (reported by its first render's log instead of being probed at start)."""
    if blender:
        return ""
    try:
        return importlib.metadata.version("bpy")
    except importlib.metadata.PackageNotFoundError:
        return ""


def detect(blender: str | None = None, tags: list[str] | None = None) -> dict[str, Any]:
    """This machine's capabilities in the shape of ``server.api.schemas.AgentCapabilities``."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    gpus = detect_gpus()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0
    return {
        "cpu_cores": cores,
        "memory_bytes": memory,
        "gpus": gpus,
        "backends": ["CUDA", "OPTIX"] if gpus else [],
        "blender": blender_version(blender),
        "tags": sorted(set(tags or [])),
    }
