"""Render executors: run one Blender process per task attempt.

``LocalExecutor`` runs Blender as a local subprocess (a ``blender`` binary, or this
Python with the bpy module).
"""

from node_agent.executor.base import (
    LOG_TAIL_LINES,
    REASONS,
    BlenderNotFound,
    BlenderRun,
    Executor,
    RunOutcome,
)
from node_agent.executor.local import LocalExecutor, minimal_env

__all__ = [
    "LOG_TAIL_LINES",
    "REASONS",
    "BlenderNotFound",
    "BlenderRun",
    "Executor",
    "LocalExecutor",
    "RunOutcome",
    "minimal_env",
]
