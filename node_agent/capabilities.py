"""What this machine offers: CPU cores, memory, GPUs and their Cycles backends, Blender version, tags."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import subprocess
from typing import Any

from protocol.devices import normalise_backends

MIN_COMPUTE_CAPABILITY = (5, 0)
"""Blender 5 renders with CUDA and OptiX on NVIDIA GPUs of compute capability 5.0 and higher
(Blender manual, Cycles > GPU Rendering)."""

MIN_OPTIX_DRIVER = 535
"""OptiX needs an NVIDIA driver of version 535 or newer (Blender manual, Cycles > GPU Rendering)."""


def _nvml_gpus() -> list[dict[str, Any]] | None:
    """NVIDIA GPUs through NVML (the ``nvidia-ml-py`` package); None when it is not installed or
    no NVIDIA driver answers."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # pynvml.NVMLError: no driver, no library
        return None
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append(
                {
                    "index": i,
                    "name": _text(name),
                    "memory_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                    "compute_capability": f"{major}.{minor}",
                    "driver": driver,
                    "uuid": _text(pynvml.nvmlDeviceGetUUID(handle)),
                }
            )
        return gpus
    except Exception:
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _smi_gpus(timeout_s: float) -> list[dict[str, Any]]:
    """NVIDIA GPUs through ``nvidia-smi``; empty when it is absent or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    query = "index,name,memory.total,compute_cap,driver_version,uuid"
    try:
        out = subprocess.run(
            [exe, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_smi(out)


def parse_smi(out: str) -> list[dict[str, Any]]:
    """Parse ``nvidia-smi --query-gpu=index,name,memory.total,compute_cap,driver_version,uuid
    --format=csv,noheader,nounits`` output (memory in MiB) into GPU dicts (the uuid column may
    be missing)."""
    gpus = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) not in (5, 6) or not parts[0].isdigit():
            continue
        mib = int(parts[2]) if parts[2].isdigit() else 0
        gpus.append(
            {
                "index": int(parts[0]),
                "name": parts[1],
                "memory_bytes": mib << 20,
                "compute_capability": parts[3],
                "driver": parts[4],
                **({"uuid": parts[5]} if len(parts) == 6 and parts[5] else {}),
            }
        )
    return gpus


def detect_gpus(timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """NVIDIA GPUs as ``[{"index": int, "name": str, "memory_bytes": int, "compute_capability":
    "8.9", "driver": "550.54.14", "uuid": "GPU-..."}]``: through NVML when ``nvidia-ml-py`` is
    installed and a driver answers, else through ``nvidia-smi``; empty without a GPU or driver."""
    gpus = _nvml_gpus()
    return gpus if gpus is not None else _smi_gpus(timeout_s)


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in str(text).split("."))
    except ValueError:
        return ()


def nvidia_backends(gpus: list[dict[str, Any]]) -> list[str]:
    """The Cycles backends NVIDIA ``gpus`` support: CUDA with compute capability 5.0 or higher,
    and OptiX as well with a driver of version 535 or newer (:data:`MIN_COMPUTE_CAPABILITY`,
    :data:`MIN_OPTIX_DRIVER`). A GPU whose compute capability is unknown counts as supported."""

    def supported(gpu: dict[str, Any]) -> bool:
        cc = _version(gpu.get("compute_capability", ""))
        return not cc or cc >= MIN_COMPUTE_CAPABILITY

    usable = [g for g in gpus if supported(g)]
    if not usable:
        return []
    backends = ["CUDA"]
    drivers = [_version(g.get("driver", "")) for g in usable]
    if any(not d or d[0] >= MIN_OPTIX_DRIVER for d in drivers):
        backends.insert(0, "OPTIX")
    return backends


def blender_version(blender: str | None) -> str:
    """The Blender version the agent renders with: the ``bpy`` module's, or ``""`` for a binary
    (reported by its first render's log instead of being probed at start)."""
    if blender:
        return ""
    try:
        return importlib.metadata.version("bpy")
    except importlib.metadata.PackageNotFoundError:
        return ""


def detect(
    blender: str | None = None, tags: list[str] | None = None, backends: list[str] | None = None
) -> dict[str, Any]:
    """This machine's capabilities in the shape of ``server.api.schemas.AgentCapabilities``.

    Args:
        backends: the Cycles backends to advertise instead of the detected ones (``[]``: CPU
            only, e.g. to keep a GPU for other work; AMD HIP and Intel oneAPI GPUs are not
            detected, so such machines name theirs). Unknown names are dropped.
    """
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
        "backends": nvidia_backends(gpus) if backends is None else normalise_backends(backends),
        "blender": blender_version(blender),
        "tags": sorted(set(tags or [])),
    }
