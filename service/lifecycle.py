"""The service's life: start-up loading, readiness and liveness, and the drain before exit.

Readiness says whether a load balancer should send requests here; liveness only whether the
process still works, so that a probe restarts it when it is stuck and never because a model is
loading or failed to load.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
import time
from collections.abc import Iterator
from typing import Literal

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .registry import Registry, ServedModel
from .settings import Settings

log = logging.getLogger(__name__)

Phase = Literal["loading", "serving", "draining"]

HEARTBEAT_S = 0.5
# An event loop that has not run its heartbeat for this long is stuck: every request waits behind it.
STALL_S = 10.0


def batcher_alive(served: ServedModel) -> bool:
    """Whether a served version's batcher still gathers batches (a closing one counts as alive)."""
    return served.batcher is None or served.batcher.healthy


class Lifecycle:
    """Where the service is in its life, and the readiness and liveness checks every probe route uses."""

    def __init__(self, settings: Settings, registry: Registry):
        self.settings = settings
        self.registry = registry
        self.phase: Phase = "loading"
        self.heartbeat = time.monotonic()
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._watchdog_stop = threading.Event()
        self._watch_task: asyncio.Task[None] | None = None

    # --- probes ---------------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        """Whether to send requests here, and why (or why not) in words."""
        if self.phase == "draining":
            return False, "draining: shutting down, requests in flight are still answered"
        if self.phase == "loading":
            return False, "loading the models found at start-up"
        unavailable = self.registry.unavailable()
        if unavailable is not None:
            return False, unavailable
        models = self.registry.all()
        if not any(m.state == "ready" for m in models):
            return False, "no model has a ready version" if models else "no model is served"
        required, uncounted = self.registry.unready_names(strict=self.settings.readiness_policy == "strict")
        if required:
            return False, f"no ready version of {', '.join(required)}"
        if uncounted:
            return True, (
                f"ready; added while running and not loaded: {', '.join(uncounted)} "
                "(not counted for readiness under --readiness-policy startup)"
            )
        return True, "ready"

    def liveness(self) -> tuple[bool, str]:
        """Whether the process still works (its event loop runs, its batchers gather), whatever its models' state."""
        task = self._heartbeat_task
        if task is not None and task.done():
            return False, "the event loop's heartbeat task has stopped"
        stalled = time.monotonic() - self.heartbeat
        if task is not None and stalled > STALL_S:
            return False, f"the event loop did not run for {stalled:.1f} s"
        dead = [f"{m.name} v{m.version}" for m in self.registry.all() if not batcher_alive(m)]
        if dead:
            return False, f"the batcher of {', '.join(dead)} has stopped"
        return True, "live" if self.phase != "loading" else "live; loading models"

    # --- running --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the heartbeat and its watchdog, load and warm every model, then watch the repository.

        The real server opens its port before this runs (service/server.py), so that liveness
        answers while models load and readiness says "loading".
        """
        self._heartbeat_task = asyncio.create_task(self._beat(), name="heartbeat")
        threading.Thread(target=self._watch_heartbeat, name="loop-watchdog", daemon=True).start()
        registry, settings = self.registry, self.settings
        # Off the loop, so that probes and the heartbeat go on while models load.
        await asyncio.to_thread(registry.load_all)
        registry.start()
        # What start-up made (modules, the app, sessions, models' metadata) lives as long as the process:
        # frozen out of the collector's sight, a full collection under load scans only what requests
        # made. Unfrozen, one took 30 to 60 ms here, a stall every connection waiting on the loop shares.
        gc.collect()
        gc.freeze()
        if self.phase == "loading":
            self.phase = "serving"
        ready = sum(m.state == "ready" for m in registry.all())
        log.info("serving %d of %d model versions from %s", ready, len(registry.all()), settings.repository)
        if settings.watch_interval_s > 0:
            self._watch_task = asyncio.create_task(registry.watch(settings.watch_interval_s), name="repository-watch")

    async def _beat(self) -> None:
        while True:
            self.heartbeat = time.monotonic()
            await asyncio.sleep(HEARTBEAT_S)

    def _watch_heartbeat(self) -> None:
        """Log once per stall when the event loop stops running: nothing else can say so while it is stuck."""
        stalled = False
        while not self._watchdog_stop.wait(HEARTBEAT_S):
            age = time.monotonic() - self.heartbeat
            if age > STALL_S and not stalled:
                log.error("the event loop has not run for %.1f s: requests and probes are not answered", age)
            elif age <= STALL_S and stalled:
                log.warning("the event loop runs again")
            stalled = age > STALL_S

    def begin_drain(self) -> None:
        """Answer not-ready from now on; safe to call from a signal handler."""
        self.phase = "draining"

    async def stop(self) -> None:
        """Stop loading and watching, then finish every queued image and stop the batchers."""
        for task in (self._watch_task, self._heartbeat_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._watchdog_stop.set()
        await self.registry.close()


class ModelStateCollector(Collector):
    """`kos_model_versions{model,state}` and `kos_ready`, read from the registry at each scrape."""

    def __init__(self, lifecycle: Lifecycle):
        self.lifecycle = lifecycle

    def collect(self) -> Iterator[GaugeMetricFamily]:
        versions = GaugeMetricFamily(
            "kos_model_versions", "Model versions by state (a failed one is also in GET /health).", labels=["model", "state"]
        )
        counts: dict[tuple[str, str], int] = {}
        for m in self.lifecycle.registry.all():
            counts[(m.name, m.state)] = counts.get((m.name, m.state), 0) + 1
        for (name, state), count in sorted(counts.items()):
            versions.add_metric([name, state], count)
        yield versions
        ready = GaugeMetricFamily("kos_ready", "1 when GET /health answers ready, else 0.")
        ready.add_metric([], 1.0 if self.lifecycle.readiness()[0] else 0.0)
        yield ready
