"""Render devices: what a job asks for, what an agent offers, and which agents may take which tasks.

Standard library only (the server, the agents and the add-on share it).

A job asks for a **device**: ``any`` (the agent's best: a GPU when it has one, else its
CPU), ``cpu``, ``gpu`` (any GPU backend) or ``gpu:<backend>`` with a Cycles backend
(``gpu:cuda``, ``gpu:optix``, ``gpu:hip``, ``gpu:oneapi``, ``gpu:metal``). An agent offers
the Cycles backends of its GPUs (``AgentCapabilities.backends``), and always its CPU.

Agents with the same pool and the same backends form one **route** (a capability pool):
one broker queue, ``renderfarm.tasks`` for CPU agents of the default pool,
``renderfarm.tasks.<pool>.gpu-<backends>`` for GPU agents. The dispatcher sends each task
to a route whose backends satisfy the job's device (:func:`satisfies`).
"""

from __future__ import annotations

BACKENDS = ("OPTIX", "CUDA", "HIP", "ONEAPI", "METAL")
"""Cycles GPU backends (``CyclesPreferences.compute_device_type`` values other than ``NONE``),
in the order an agent prefers them when a job asks for ``gpu`` or ``any``."""

DEVICES = ("any", "cpu", "gpu", *(f"gpu:{b.lower()}" for b in BACKENDS))
"""Values of a job's ``device``."""

DEFAULT_DEVICE = "any"


class DeviceError(ValueError):
    """A device or backend name that is not one of :data:`DEVICES` / :data:`BACKENDS`."""


def check_device(device: str) -> str:
    """Return ``device`` normalised (lower case, trimmed).

    Raises:
        DeviceError: it is not one of :data:`DEVICES`.
    """
    norm = (device or "").strip().lower()
    if norm not in DEVICES:
        raise DeviceError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    return norm


def normalise_backends(backends: list[str] | tuple[str, ...] | set[str]) -> list[str]:
    """Known backends of ``backends``, upper case, in :data:`BACKENDS` order (unknown ones dropped)."""
    have = {str(b).strip().upper() for b in backends}
    return [b for b in BACKENDS if b in have]


def satisfies(device: str, backends: list[str] | tuple[str, ...] | set[str]) -> bool:
    """Whether an agent offering GPU ``backends`` (and a CPU) may render a job asking for ``device``.

    ``any`` and ``cpu``: every agent. ``gpu``: an agent with at least one backend.
    ``gpu:x``: an agent offering backend ``X``.
    """
    have = set(normalise_backends(backends))
    if device in ("any", "cpu"):
        return True
    if device == "gpu":
        return bool(have)
    if device.startswith("gpu:"):
        return device[4:].upper() in have
    return False


def cycles_device(device: str, backends: list[str] | tuple[str, ...] | set[str]) -> str:
    """The Cycles device an agent with ``backends`` renders a ``device`` job on: ``"CPU"`` or one
    of :data:`BACKENDS`.

    ``cpu`` -> CPU; ``gpu:x`` -> X; ``gpu`` and ``any`` -> the agent's first backend in
    :data:`BACKENDS` order; without one, ``any`` -> CPU and ``gpu`` -> CUDA (the dispatcher does
    not route ``gpu`` work to such an agent; should it get some, the render script finds no CUDA
    device and fails, or falls back to the CPU if the job allows it).
    """
    have = normalise_backends(backends)
    if device == "cpu":
        return "CPU"
    if device.startswith("gpu:"):
        return device[4:].upper()
    if have:
        return have[0]
    return "CPU" if device == "any" else "CUDA"


def route_key(pool: str, backends: list[str] | tuple[str, ...] | set[str]) -> str:
    """The route (capability pool) of an agent: ``pool`` for a CPU-only agent, else
    ``<pool>.gpu-<backend>-<backend>`` (lower case, :data:`BACKENDS` order)."""
    have = normalise_backends(backends)
    if not have:
        return pool
    return f"{pool}.gpu-" + "-".join(b.lower() for b in have)


def route_backends(route: str) -> list[str]:
    """The backends a route key (:func:`route_key`) stands for."""
    _, sep, tail = route.rpartition(".gpu-")
    if not sep:
        return []
    return normalise_backends(tail.split("-"))


def route_pool(route: str) -> str:
    """The pool a route key (:func:`route_key`) belongs to."""
    head, sep, _ = route.rpartition(".gpu-")
    return head if sep else route
