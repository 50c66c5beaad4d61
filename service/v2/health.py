"""Liveness and readiness for the v2 routes and RPCs, in one place: whatever checks the app has, else the defaults.

The app's own checks, when it has them, are callables on its state: `liveness()` and `readiness()`,
each answering a bool or a `(bool, reason)` pair. Without them a process that answers is live, and
readiness is the data plane's (the same answer as GET /health).
"""

from __future__ import annotations

import inspect
from typing import Any


async def _check(state: Any, name: str) -> tuple[bool, str | None] | None:
    """What the app's `name` check answers, as (ok, reason); None when the app has no such check."""
    check = getattr(state, name, None)
    if check is None:
        return None
    result = check()
    if inspect.isawaitable(result):
        result = await result
    if isinstance(result, tuple):
        ok, reason = bool(result[0]), (str(result[1]) if len(result) > 1 and result[1] else None)
    else:
        ok, reason = bool(result), None
    return ok, (None if ok else reason or f"the {name} check failed")


async def liveness(state: Any) -> tuple[bool, str | None]:
    """(live, what is wrong when not): the app's liveness check, else live while the process answers."""
    return await _check(state, "liveness") or (True, None)


async def readiness(state: Any) -> tuple[bool, str | None]:
    """(ready, why not): the app's readiness check, else every model has a ready version (GET /health's answer)."""
    answer = await _check(state, "readiness")
    if answer is not None:
        return answer
    ready = state.dataplane.ready()
    return ready, None if ready else "a model has no ready version, or none is served"
