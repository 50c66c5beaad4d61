"""The served models: scan the repository, load, check and warm each version, keep its state."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from .artifact import INPUT_NAME, OUTPUT_NAME, ModelMetadata, list_models, model_path
from .errors import ModelNotFound, ModelNotReady
from .runtime import DeviceUnavailable, create_session
from .settings import Settings

log = logging.getLogger(__name__)

State = Literal["loading", "ready", "failed"]


@dataclass
class ServedModel:
    name: str
    version: int
    path: Path
    state: State = "loading"
    error: str | None = None
    metadata: ModelMetadata | None = None
    session: ort.InferenceSession | None = field(default=None, repr=False)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers() if self.session is not None else []

    def run(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities for a uint8 NHWC batch; blocking, call it off the event loop."""
        assert self.session is not None
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]


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
        raise ValueError(f"input shape {image.shape} does not match the metadata's [batch, {metadata.height}, {metadata.width}, {metadata.channels}]")
    classes = outputs[OUTPUT_NAME].shape[-1]
    if isinstance(classes, int) and classes != len(metadata.labels):
        raise ValueError(f"the graph has {classes} classes but the metadata lists {len(metadata.labels)} labels")


def load_model(name: str, version: int, path: Path, settings: Settings) -> ServedModel:
    """Load, check and warm one model version; a failure is recorded in the returned state."""
    served = ServedModel(name=name, version=version, path=path)
    try:
        session = create_session(path, settings)
        metadata = ModelMetadata.from_metadata_props(session.get_modelmeta().custom_metadata_map)
        check_signature(session, metadata)
        served.session, served.metadata = session, metadata
        served.run(np.zeros((1, *metadata.input_shape), dtype=np.uint8))
        served.state = "ready"
        log.info("loaded %s v%d from %s on %s", name, version, path, served.providers)
    except DeviceUnavailable:
        raise  # the operator asked for CUDA: starting on CPU would hide the problem
    except Exception as exc:  # one broken model must not stop the others
        served.state, served.error, served.session = "failed", f"{type(exc).__name__}: {exc}", None
        log.error("could not load %s v%d from %s: %s", name, version, path, served.error)
    return served


class Registry:
    """Every model version in the repository, by name and version."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.models: dict[str, dict[int, ServedModel]] = {}

    def load_all(self) -> None:
        repository = self.settings.repository
        if not repository.is_dir():
            log.warning("model repository %s does not exist: no models to serve", repository)
        for name, versions in list_models(repository).items():
            self.models[name] = {
                v: load_model(name, v, model_path(repository, name, v), self.settings) for v in versions
            }

    def versions(self, name: str) -> list[ServedModel]:
        """Every version of `name`, ascending, whatever its state; 404 if the name is unknown."""
        if name not in self.models:
            known = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFound(f"model {name!r} is not served (served models: {known})")
        return [self.models[name][v] for v in sorted(self.models[name])]

    def get(self, name: str, version: int | None = None) -> ServedModel:
        """The requested version (default: the highest) ready to run, or a 404/503 ServiceError."""
        versions = {m.version: m for m in self.versions(name)}
        if version is None:
            version = max(versions)
        if version not in versions:
            raise ModelNotFound(f"model {name!r} has no version {version} (versions: {sorted(versions)})")
        served = versions[version]
        if served.state != "ready":
            raise ModelNotReady(f"model {name!r} version {version} is {served.state}: {served.error or 'not ready yet'}")
        return served

    def all(self) -> list[ServedModel]:
        return [m for versions in self.models.values() for m in versions.values()]
