"""The served models: scan the repository, load, check and warm each version, keep its state.

Models can be added or replaced while the service runs: `refresh()` (called by `watch()` every
few seconds) loads a new or changed file beside the version being served, warms it, and only
then swaps it in; the old version's batcher finishes what it has queued.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from kos_core.artifact import INPUT_NAME, OUTPUT_NAME, PRECISION_FILENAMES, ModelMetadata
from kos_core.cpus import available_cpus
from kos_core.layout import (
    list_models,
    list_versions,
    model_folder_problems,
    model_path,
    model_settings_path,
    repository_problems,
    served_file,
)

from .auto_settings import choose, first_threads, has_auto, ms_per_image
from .batcher import Batcher
from .errors import ModelFailed, ModelNotFound, ModelNotReady
from .metrics import Metrics
from .model_settings import ModelSettingsError, model_settings, read_overrides
from .runtime import Device, DeviceUnavailable, create_session, inference_thread_setup, pad_size, warmup_batch_sizes
from .settings import AUTO, Settings

log = logging.getLogger(__name__)

State = Literal["loading", "ready", "failed", "closed"]
Stamp = tuple[int, int, int]
# The stamps of every file a version may be served from (its variant and model.onnx): any of them
# appearing, changing or disappearing reloads the version.
Fingerprint = tuple[Stamp | None, ...]


@dataclass(eq=False)
class ServedModel:
    name: str
    version: int
    path: Path
    state: State = "loading"
    error: str | None = None
    metadata: ModelMetadata | None = None
    session: ort.InferenceSession | None = field(default=None, repr=False)
    # CPU only, when lone_request_threads is set: a session with more intra-op threads for a
    # request that arrives at an idle model (the batch session may use fewer, to run batches side by side).
    lone_session: ort.InferenceSession | None = field(default=None, repr=False)
    fingerprint: Fingerprint | None = None
    batcher: Batcher | None = field(default=None, repr=False)
    # Loaded at start-up (True), or added to a running service by a repository scan (False).
    at_start: bool = True
    # The service settings with this model's own settings file applied and every "auto" resolved:
    # what its sessions and batcher run with.
    settings: Settings | None = field(default=None, repr=False)
    # Milliseconds one image took on the first session at load, when "auto" settings were resolved from it.
    ms_per_image: float | None = None
    # The keys the model's settings file set.
    overrides: dict[str, object] = field(default_factory=dict)

    @property
    def precision(self) -> str | None:
        return self.metadata.precision if self.metadata else None

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers() if self.session is not None else []

    def run(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities for a uint8 NHWC batch; blocking, call it off the event loop."""
        assert self.session is not None
        probabilities: np.ndarray = self.session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
        return probabilities

    def run_lone(self, images: np.ndarray) -> np.ndarray:
        """Like `run`, on the lone-request session when there is one."""
        session = self.lone_session or self.session
        assert session is not None
        probabilities: np.ndarray = session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
        return probabilities

    async def close(self) -> None:
        """Drain the batcher (queued images and lone runs finish), then release the sessions at once.

        The batcher holds this version's bound `run`, so the two form a reference cycle; breaking it
        here frees the sessions (and on CUDA their device memory) now rather than whenever the cyclic
        garbage collector runs, so repeated swaps cannot exhaust a GPU.
        """
        batcher, self.batcher = self.batcher, None
        if batcher is not None:
            await batcher.close()
            batcher.forget_metrics()
            batcher._run_batch = batcher._run_lone = _closed
        self.session = self.lone_session = None
        if self.state == "ready":
            self.state = "closed"


def _closed(images: np.ndarray) -> np.ndarray:
    raise RuntimeError("this model version is closed")


def stamp(path: Path) -> Stamp | None:
    """What changes when a model file is written or replaced (export renames a new folder into place)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def check_signature(session: ort.InferenceSession, metadata: ModelMetadata) -> None:
    """Refuse a model whose graph does not match the artifact contract or its own metadata."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
        raise ValueError(f"graph must take {INPUT_NAME!r} and return {OUTPUT_NAME!r}; it has {list(inputs)} -> {list(outputs)}")
    image = inputs[INPUT_NAME]
    if image.type != "tensor(uint8)":
        raise ValueError(f"input {INPUT_NAME!r} must be uint8, not {image.type}")
    if len(image.shape) != 4 or tuple(image.shape[1:]) != metadata.input_shape:
        raise ValueError(
            f"input shape {image.shape} does not match the metadata's [batch, {metadata.height}, {metadata.width}, {metadata.channels}]"
        )
    if isinstance(image.shape[0], int):
        raise ValueError(f"input {INPUT_NAME!r} has a fixed batch size {image.shape[0]}; the batcher needs a dynamic one")
    classes = outputs[OUTPUT_NAME].shape[-1]
    if isinstance(classes, int) and classes != len(metadata.labels):
        raise ValueError(f"the graph has {classes} classes but the metadata lists {len(metadata.labels)} labels")


def warm_up(run: Callable[[np.ndarray], np.ndarray], size: int, metadata: ModelMetadata) -> None:
    probabilities = run(np.zeros((size, *metadata.input_shape), dtype=np.uint8))
    if probabilities.shape != (size, len(metadata.labels)):
        raise ValueError(f"warm-up on {size} images gave shape {probabilities.shape}, not ({size}, {len(metadata.labels)})")


def attach_lone_session(served: ServedModel, settings: Settings, device: Device) -> None:
    """Give a loaded version its lone-request session; without one (it failed) the batch session serves lone requests too."""
    try:
        # Its threads may spin: it runs only while the model is otherwise idle, so the cores are free, and
        # a sleeping thread would have to be woken at every parallel step of the graph.
        served.lone_session = create_session(
            served.path, settings, device, intra_op_threads=settings.lone_request_threads, spinning=True
        )
        assert served.metadata is not None, "attached after the batch session loaded"
        warm_up(served.run_lone, 1, served.metadata)
    except Exception as exc:
        served.lone_session = None
        log.warning(
            "%s v%d: no lone-request session (%s: %s); lone requests run on the batch session",
            served.name,
            served.version,
            type(exc).__name__,
            exc,
        )


def load_model(name: str, version: int, path: Path, settings: Settings, device: Device) -> ServedModel:
    """Load, check and warm one model version (blocking); a failure is recorded in the returned state.

    Runtime settings left at "auto" are resolved here, from the machine and the model's cost measured
    on its first session (service/auto_settings.py); the version's `settings` hold the numbers.
    """
    served = ServedModel(name=name, version=version, path=path, settings=settings)
    try:
        cpus = available_cpus()
        threads = first_threads(settings, cpus)
        session = create_session(path, settings, device)  # "auto" threads: every core, as `first_threads` says
        metadata = ModelMetadata.from_metadata_props(session.get_modelmeta().custom_metadata_map)
        if metadata.name != name:
            log.info("%s: metadata names the model %r; it is served as %r, its folder name", path, metadata.name, name)
        check_signature(session, metadata)
        served.session, served.metadata = session, metadata
        if has_auto(settings):
            warm_up(served.run, 1, metadata)
            choice = choose(settings, cpus, device.is_cuda, ms_per_image(served.run, metadata.input_shape))
            settings = served.settings = choice.settings
            served.ms_per_image = choice.ms_per_image
            log.info(
                "%s v%d: automatic settings from %s: intra_op_threads %s, inference_workers %s, lone_request_threads %s",
                name,
                version,
                choice.reason,
                settings.intra_op_threads,
                settings.inference_workers,
                settings.lone_request_threads,
            )
            if settings.intra_op_threads != threads:
                served.session = create_session(path, settings, device)
        for size in warmup_batch_sizes(settings.max_batch_size, device):
            warm_up(served.run, size, metadata)
        if settings.lone_request_threads and not device.is_cuda:
            attach_lone_session(served, settings, device)
        served.state = "ready"
        lone = f", lone requests on a second session with {settings.lone_request_threads} threads" if served.lone_session else ""
        log.info("loaded %s v%d from %s on %s%s", name, version, path, served.providers, lone)
    except DeviceUnavailable:
        raise  # the operator asked for CUDA: starting on CPU would hide the problem
    except Exception as exc:  # one broken model must not stop the others
        log.error("could not load %s v%d from %s: %s: %s", name, version, path, type(exc).__name__, exc)
        # /health shows the cause to operators, with the file named inside the repository rather than
        # by its path on the server.
        cause = str(exc).replace(str(path), f"{name}/{version}/{path.name}")
        served.state, served.error = "failed", f"{type(exc).__name__}: {cause}"
        served.session = served.lone_session = None
    return served


class Registry:
    """Every model version in the repository, by name and version, each with its batcher."""

    def __init__(self, settings: Settings, device: Device, metrics: Metrics, decode_pool: Executor | None = None):
        self.settings = settings
        self.device = device
        self.metrics = metrics
        self.decode_pool = decode_pool
        self.models: dict[str, dict[int, ServedModel]] = {}
        self._missing: dict[tuple[str, int], int] = {}
        self._refused: dict[tuple[str, int], Fingerprint | None] = {}
        self._lock = asyncio.Lock()
        self._reported: set[str] = set()
        # True until the start-up load is done: a request for a model not loaded yet gets 503, not 404.
        self.loading = True
        if settings.lone_request_threads not in (0, AUTO) and device.is_cuda:
            log.info("lone_request_threads applies on CPU only; on CUDA every request runs on the one session")
        if settings.precision == "int8" and device.is_cuda:
            log.warning("precision=int8 on CUDA: int8 files are quantised for CPUs and may run slower on a GPU than float16")

    def _where(self, name: str) -> tuple[Path, str]:
        """The (repository, folder) that kos_core.layout's paths take for `name`.

        With --model-name the repository folder is that model's own folder, holding its versions.
        """
        if self.settings.model_name is None:
            return self.settings.repository, name
        folder = self.settings.repository.resolve()
        return folder.parent, folder.name

    def _list(self) -> dict[str, list[int]]:
        """Every model name with its versions, in whichever layout the settings ask for."""
        if self.settings.model_name is None:
            return list_models(self.settings.repository)
        versions = list_versions(*self._where(self.settings.model_name))
        return {self.settings.model_name: versions} if versions else {}

    def _fingerprint(self, name: str, version: int) -> Fingerprint:
        (repository, folder), precision = self._where(name), self.settings.precision
        # The model's settings file first: it may change which file `precision` serves.
        files = dict.fromkeys(
            [
                model_settings_path(repository, folder),
                model_path(repository, folder, version, precision),
                model_path(repository, folder, version),
            ]
        )
        return tuple(stamp(f) for f in files)

    def _load(self, name: str, version: int) -> ServedModel:
        """Load the file `precision` asks for; a missing or broken variant falls back to model.onnx, with a warning."""
        fp = self._fingerprint(name, version)
        repository, folder = self._where(name)
        settings_file = model_settings_path(repository, folder)
        try:
            overrides = read_overrides(settings_file)
            settings = model_settings(self.settings, overrides, f"{folder}/{settings_file.name}")
        except ModelSettingsError as exc:
            log.error("could not load %s v%d: %s", name, version, exc)
            served = ServedModel(name, version, model_path(repository, folder, version), state="failed", error=str(exc))
            served.fingerprint = fp
            self.metrics.model_loads.labels(name, served.state).inc()
            return served
        if overrides:
            log.info("%s v%d: settings from %s/%s: %s", name, version, folder, settings_file.name, overrides)
        precision = settings.precision
        path = served_file(repository, folder, version, precision)
        if precision != "float32" and path.name != PRECISION_FILENAMES[precision]:
            log.warning("%s v%d has no %s variant: serving %s", name, version, precision, path.name)
        served = load_model(name, version, path, settings, self.device)
        fallback = model_path(repository, folder, version)
        if served.state == "failed" and path != fallback and fallback.is_file():
            log.warning(
                "%s v%d: the %s variant failed to load (%s); serving %s", name, version, precision, served.error, fallback.name
            )
            served = load_model(name, version, fallback, settings, self.device)
        served.fingerprint, served.overrides = fp, overrides
        self.metrics.model_loads.labels(name, served.state).inc()
        return served

    def load_all(self) -> None:
        """Load every model version in the repository (blocking; batchers start in `start()`)."""
        repository = self.settings.repository
        if not repository.is_dir():
            log.warning("model repository %s does not exist: no models to serve", repository)
        self._report_problems()
        for name, versions in self._list().items():
            self.models[name] = {v: self._load(name, v) for v in versions}
        self.loading = False

    def start(self) -> None:
        """Give every ready version its batcher; call from the running event loop."""
        for served in self.all():
            self._attach_batcher(served)

    def _attach_batcher(self, served: ServedModel) -> None:
        if served.state != "ready" or served.batcher is not None:
            return
        settings = served.settings or self.settings
        max_batch = settings.max_batch_size
        served.batcher = Batcher(
            served.run,
            run_lone=served.run_lone,
            name=served.name,
            version=served.version,
            max_batch_size=max_batch,
            max_delay_s=settings.max_batch_delay_ms / 1000,
            queue_size=settings.queue_size,
            # Resolved at load (load_model); "auto" is only left where no model was loaded.
            workers=settings.inference_workers if isinstance(settings.inference_workers, int) else 1,
            metrics=self.metrics,
            pad_to=(lambda n: pad_size(n, max_batch)) if self.device.is_cuda else None,
            decode_pool=self.decode_pool,
            thread_setup=functools.partial(inference_thread_setup, settings.inference_nice),
        )
        served.batcher.start()

    async def refresh(self) -> list[str]:
        """Load added or changed model files, swap them in when warm, drop removed ones; what changed."""
        async with self._lock:
            found = await asyncio.to_thread(self._scan)
            changes = []
            for (name, version), fp in found.items():
                self._missing.pop((name, version), None)
                current = self.models.get(name, {}).get(version)
                if current is not None and current.fingerprint == fp:
                    continue
                if (name, version) in self._refused and self._refused[(name, version)] == fp:
                    continue  # this very file already failed to load beside a working version
                if current is None:
                    # Visible while it loads: /health and /models list it as loading.
                    self.models.setdefault(name, {})[version] = ServedModel(
                        name,
                        version,
                        served_file(*self._where(name), version, self.settings.precision),
                        at_start=False,
                    )
                new = await asyncio.to_thread(self._load, name, version)
                new.at_start = current.at_start if current is not None else False
                if new.state != "ready" and current is not None and current.state == "ready":
                    # Keep serving the working file; the failure is logged and counted in kos_model_loads.
                    self._refused[(name, version)] = fp
                    changes.append(f"{name} v{version}: replacement refused ({new.error})")
                    continue
                self._refused.pop((name, version), None)
                self._attach_batcher(new)
                self.models.setdefault(name, {})[version] = new
                changes.append(f"{name} v{version}: {'replaced' if current else 'added'} ({new.state})")
                if current is not None:
                    await current.close()  # finishes the images it already holds, then frees its sessions
            for name, versions in list(self.models.items()):
                for version in list(versions):
                    if (name, version) in found:
                        continue
                    # A file is replaced by renaming folders: require two scans in a row without it.
                    misses = self._missing[(name, version)] = self._missing.get((name, version), 0) + 1
                    if misses < 2:
                        continue
                    gone = versions.pop(version)
                    self._missing.pop((name, version), None)
                    changes.append(f"{name} v{version}: removed")
                    await gone.close()
                if not versions:
                    del self.models[name]
                    self.metrics.forget_model(name)
            for change in changes:
                log.info("repository change: %s", change)
            return changes

    def _report_problems(self) -> None:
        """Log each misplaced file or folder in the repository once, rather than ignoring it in silence."""
        repository = self.settings.repository
        if self.settings.model_name is None:
            problems = repository_problems(repository)
        else:
            problems = model_folder_problems(repository) if repository.is_dir() else []
        for problem in problems:
            if problem not in self._reported:
                self._reported.add(problem)
                log.warning("model repository %s: %s", self.settings.repository, problem)

    def _scan(self) -> dict[tuple[str, int], Fingerprint | None]:
        self._report_problems()
        return {(name, v): self._fingerprint(name, v) for name, versions in self._list().items() for v in versions}

    async def watch(self, interval_s: float) -> None:
        """Refresh every `interval_s` seconds until cancelled; a failed scan is logged and retried."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scanning the model repository %s failed", self.settings.repository)

    async def close(self) -> None:
        """Finish every queued image of every model, then stop the batchers and free the sessions."""
        await asyncio.gather(*(m.close() for m in self.all()))

    def unready_names(self, strict: bool = False) -> tuple[list[str], list[str]]:
        """(names that keep the node out, names reported but not counted): model names with no ready version.

        Readiness is per name: a new version that is loading or failed while an older one serves
        does not take the node out of a load balancer. Unless `strict`, a name first seen by a scan
        of the running service does not count until it is ready, so one bad file dropped into a
        shared repository does not take every replica out.
        """
        models = self.all()
        serving = {m.name for m in models if m.state == "ready"}
        missing = sorted({m.name for m in models} - serving)
        counted = {m.name for m in models if m.at_start or strict}
        return [n for n in missing if n in counted], [n for n in missing if n not in counted]

    def unavailable(self) -> str | None:
        """Why predictions may be refused although the models are ready, or None (always None in one process).

        With front ends, a front end not connected to the owner (service/mirror.py).
        """
        return None

    def ready(self, strict: bool = False) -> bool:
        """Ready when some model serves and no model name that counts (see `unready_names`) lacks a ready version."""
        return any(m.state == "ready" for m in self.all()) and not self.unready_names(strict)[0]

    def versions(self, name: str) -> list[ServedModel]:
        """Every version of `name`, ascending, whatever its state; 404 if the name is unknown."""
        if name not in self.models and self.loading:
            raise ModelNotReady(f"model {name!r} is not loaded yet: the service is loading its models", retry_after=5)
        if name not in self.models:
            known = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFound(f"model {name!r} is not served (served models: {known})")
        return [self.models[name][v] for v in sorted(self.models[name])]

    def get(self, name: str, version: int | None = None) -> ServedModel:
        """The requested version, or the highest ready one, ready to run; else a 404/503 ServiceError."""
        # Every prediction asks this several times, so it reads the registry's own mapping rather than
        # sorting a list of versions; `versions` gives the answer for a name not served.
        if name not in self.models:
            self.versions(name)  # raises the 404, or the 503 while the service loads its models
        versions = self.models[name]
        if version is None:
            ready = [v for v, m in versions.items() if m.state == "ready"]
            version = max(ready) if ready else max(versions)
        served = versions.get(version)
        if served is None:
            raise ModelNotFound(f"model {name!r} has no version {version} (versions: {sorted(versions)})")
        if served.state == "failed":
            raise ModelFailed(
                f"model {name!r} version {version} failed to load: an operator must fix or replace its file (GET /health says why)"
            )
        if served.state != "ready" or served.batcher is None:
            raise ModelNotReady(f"model {name!r} version {version} is {served.state}: not ready yet", retry_after=2)
        return served

    def all(self) -> list[ServedModel]:
        return [m for name in sorted(self.models) for _, m in sorted(self.models[name].items())]
