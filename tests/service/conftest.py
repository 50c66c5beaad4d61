"""Fixtures for the service tests: small Keras models exported by our own export code, and repositories of them."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from kos_core.artifact import MODEL_FILENAME, ModelMetadata
from kos_core.layout import model_path
from tests.conftest import BUNDLED_REPOSITORY

RGB_LABELS = ["cat", "dog", "fox", "owl"]


def _export(model, name: str, labels: list[str], color_mode: str, repository: Path) -> Path:
    """Convert with export.convert.to_onnx and write with the export's atomic writer, metadata inside."""
    from export.convert import to_onnx
    from export.repository import attach_metadata, write_atomically

    height, width, channels = (int(d) for d in model.inputs[0].shape[1:])
    proto = to_onnx(model)
    metadata = ModelMetadata(
        name=name,
        labels=labels,
        height=height,
        width=width,
        channels=channels,
        color_mode=color_mode,
        architecture=model.name,
        dataset="synthetic",
    )
    attach_metadata(proto, metadata)
    return write_atomically({MODEL_FILENAME: proto}, repository, name, 1)


def _rgb_model():
    """A tiny RGB 32x32 classifier; Flatten keeps it sensitive to where things are (orientation tests)."""
    import keras
    from keras import layers

    inputs = keras.Input((32, 32, 3), dtype="uint8", name="image")
    x = layers.Rescaling(1.0 / 255)(inputs)
    x = layers.Conv2D(4, 3, padding="same", activation="relu")(x)
    x = layers.Flatten()(x)
    outputs = layers.Dense(len(RGB_LABELS), activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="tiny_rgb")


def _fragile_model():
    """An 8x8 greyscale classifier whose graph raises at run time when a batch holds an all-white image,
    and answers NaN probabilities for an all-black one."""
    import keras
    import tensorflow as tf
    from keras import layers

    inputs = keras.Input((8, 8, 1), dtype="uint8", name="image")
    x = layers.Rescaling(1.0 / 255)(inputs)
    x = layers.Flatten()(x)
    probabilities = layers.Dense(10, activation="softmax")(x)

    def break_on_white(args):
        image, p = args
        brightest = tf.reduce_max(tf.cast(image, tf.float32), axis=[1, 2, 3])[:, None]
        p = p * (brightest / brightest)  # 1, or 0/0 = NaN for an all-black image
        whitest = tf.reduce_max(tf.reduce_min(tf.cast(image, tf.int32), axis=[1, 2, 3]))
        poisoned = tf.cast(whitest >= 255, tf.int32)
        # Reshape to one row more than there are when poisoned: onnxruntime raises at run time.
        return tf.reshape(p, tf.stack([tf.shape(p)[0] + poisoned, 10]))

    outputs = layers.Lambda(break_on_white, output_shape=(10,), name="probabilities")([inputs, probabilities])
    return keras.Model(inputs, outputs, name="fragile")


def _slow_model():
    """A 128x128 RGB model of ten full-resolution convolutions: each image takes tens of milliseconds."""
    import keras
    from keras import layers

    inputs = keras.Input((128, 128, 3), dtype="uint8", name="image")
    x = layers.Rescaling(1.0 / 255)(inputs)
    for _ in range(10):
        x = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(2, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="slow")


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> dict[str, Path]:
    """ONNX files of the test models, exported once per session: name -> model.onnx."""
    import keras

    keras.utils.set_random_seed(0)
    store = tmp_path_factory.mktemp("exported")
    return {
        "rgb": _export(_rgb_model(), "rgb", RGB_LABELS, "rgb", store),
        "fragile": _export(_fragile_model(), "fragile", [str(i) for i in range(10)], "grayscale", store),
        "slow": _export(_slow_model(), "slow", ["yes", "no"], "rgb", store),
        "digits": model_path(BUNDLED_REPOSITORY, "digits", 1),
    }


def make_repository(root: Path, models: dict[str, Path]) -> Path:
    """A model repository at `root` holding each file as version 1 of its name."""
    for name, source in models.items():
        target = model_path(root, name, 1)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return root


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus sample's values over series matching `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


async def post_many(url: str, bodies: list[list[tuple]], timeout: float = 120) -> list[httpx.Response]:
    """Send every multipart body at once, each as its own request on its own connection."""
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        return await asyncio.gather(*(client.post(url, files=files) for files in bodies))


@pytest.fixture(scope="session")
def no_working_cuda() -> None:
    """Skip a test that pins down this machine's case: onnxruntime-gpu installed, CUDA unusable."""
    from service.runtime import cuda_problem

    if cuda_problem() is None:
        pytest.skip("CUDA works on this machine; the test is about a machine where it does not")


# The two shapes of the service a test that starts real processes runs against: one process, and
# two front-end processes around one owner of the models (--frontends 2).
SHAPES = pytest.mark.parametrize("frontends", [1, 2], ids=["one-process", "front-ends"])


def shape(frontends: int) -> list[str]:
    """The flags that start the service in that shape."""
    return ["--frontends", str(frontends)]


def children(server) -> dict[str, list[int]]:
    """A --frontends N service's processes below its supervisor, by role, from /proc."""
    pid = server.process.pid
    found: dict[str, list[int]] = {"owner": [], "frontend": []}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"service.frontends" in argv:
            found[argv[argv.index(b"service.frontends") + 1].decode()].append(int(child))
    return found


def acceptors(server, frontends: int) -> list[int]:
    """The processes that accept the service's connections: the process itself, or its front ends."""
    return [server.process.pid] if frontends == 1 else children(server)["frontend"]


def wait_for_processes(server, frontends: int, timeout: float = 60) -> None:
    """Wait until every front end of a --frontends N service runs and has its start-up done (connected to the owner)."""
    import time

    deadline = time.monotonic() + timeout
    while frontends > 1:
        log = server.log()
        started, up = log.count("Waiting for application startup."), log.count("Application startup complete.")
        if len(children(server)["frontend"]) >= frontends and up >= max(started, frontends):
            return
        assert time.monotonic() < deadline, f"the front ends did not start:\n{log}"
        time.sleep(0.05)
