"""Liveness and readiness for the v2 routes and RPCs: the data plane's checks, the same that /livez and /health answer."""

from __future__ import annotations

from typing import Any


async def liveness(state: Any) -> tuple[bool, str | None]:
    """(live, what is wrong when not): whether the process still works, whatever its models' state."""
    live, reason = state.dataplane.liveness()
    return bool(live), None if live else reason


async def readiness(state: Any) -> tuple[bool, str | None]:
    """(ready, why not): what GET /health answers, draining and the readiness policy included."""
    ready, reason = state.dataplane.readiness()
    return bool(ready), None if ready else reason
