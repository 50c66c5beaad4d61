"""Liveness for the v2 routes and RPCs: the app's own check when it has one, else alive while it answers."""

from __future__ import annotations

import inspect
from typing import Any


async def liveness_problem(state: Any) -> str | None:
    """None while the process works; else what is wrong, from `state.liveness` (a callable) when the app has one."""
    check = getattr(state, "liveness", None)
    if check is None:
        return None
    result = check()
    if inspect.isawaitable(result):
        result = await result
    # The check may answer True/False, or None/a description of the problem.
    if isinstance(result, bool):
        return None if result else "the liveness check failed"
    return str(result) if result else None
