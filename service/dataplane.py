"""The data plane: the one object every protocol calls to classify images.

Multipart uploads, the Open Inference Protocol over REST and gRPC, and the browser page all parse
their requests and call `classify_files` (encoded images) or `classify_tensor` (uint8 NHWC
arrays). It finds the served version, decodes with the shared core's decoder under the service's
limits, and hands the work to that version's batcher, which decides how it runs. Its errors are
ServiceError subclasses; each protocol maps them to its own answer.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from kos_core import errors as core_errors
from kos_core.artifact import InputSpec
from kos_core.imaging import decode_image, image_pixels

from .batcher import BatcherClosed
from .errors import BadRequest, ImageTooLarge, InferenceFailed, OutOfMemory, UnsupportedImage
from .metrics import Metrics
from .registry import Registry, ServedModel
from .settings import Settings

log = logging.getLogger(__name__)

# A version swapped for a newer file while a request was on its way refuses it; the request then
# goes to the new version. More swaps than this within one request is a repository being rewritten
# in a loop: the request fails rather than chase it.
_SWAP_RETRIES = 3


@dataclass(frozen=True)
class EncodedImage:
    """One uploaded file: JPEG, PNG, WebP, BMP, GIF or TIFF bytes, and the name to report it by."""

    filename: str
    data: bytes


@dataclass(frozen=True)
class Deadline:
    """When a request must have started running: its arrival plus its model's timeout, or the client's own sooner one."""

    arrival: float  # time.monotonic() when the request arrived
    client: float | None = None  # a deadline the client set (gRPC's, or the v2 `timeout` parameter), on the same clock

    def at(self, timeout_s: float) -> float:
        deadline = self.arrival + timeout_s
        return deadline if self.client is None else min(deadline, self.client)


@dataclass(frozen=True)
class Classification:
    """Class probabilities for a request's images, in input order, from one model version."""

    model: str
    version: int
    labels: list[str]
    probabilities: np.ndarray  # float32 [batch, classes], every value finite

    def top_k(self, row: int, k: int) -> list[tuple[int, str, float]]:
        """(index, label, probability) of the `k` likeliest classes of image `row`, likeliest first."""
        probabilities = self.probabilities[row]
        order = np.argsort(-probabilities, kind="stable")[: max(1, min(k, len(self.labels)))]
        return [(int(i), self.labels[i], float(probabilities[i])) for i in order]


def decode(image: EncodedImage, spec: InputSpec, max_pixels: int) -> np.ndarray:
    """decode_image, with the core's errors as the service's (413, 415) and memory as the server's problem."""
    try:
        return decode_image(image.data, image.filename, spec, max_pixels)
    except core_errors.ImageTooLarge as exc:
        raise ImageTooLarge(str(exc)) from None
    except core_errors.UnsupportedImage as exc:
        raise UnsupportedImage(str(exc)) from None
    except MemoryError:
        raise OutOfMemory(f"{image.filename}: the service ran out of memory decoding it; retry later") from None


class DataPlane:
    """Classify images with served models; built once by the app factory and shared by every protocol."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        metrics: Metrics,
        decode_pool: Executor,
        readiness: Callable[[], tuple[bool, str]] | None = None,
        liveness: Callable[[], tuple[bool, str]] | None = None,
    ):
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.decode_pool = decode_pool
        # The service's readiness (lifecycle.py: start-up loading, draining, --readiness-policy); the
        # registry's own view of its models when the data plane is used without a lifecycle.
        self._readiness = readiness or (lambda: (registry.ready(), "by the models' states alone"))
        self._liveness = liveness or (lambda: (True, "live"))

    def served(self, name: str, version: int | None = None) -> ServedModel:
        """The requested version, or the highest ready one; ModelNotFound (404) or a 503 otherwise."""
        return self.registry.get(name, version)

    def admit(self, name: str, version: int | None, count: int) -> ServedModel:
        """Refuse what can be refused before a request's body is read: unknown model, not ready, full queue, too many files."""
        self._check_count(count)
        served = self.served(name, version)
        try:
            served.batcher.check_room(max(1, count))  # type: ignore[union-attr]
        except BatcherClosed:
            pass  # being replaced: the new version takes the request
        return served

    def hold(self, name: str, version: int | None, count: int) -> Callable[[], None]:
        """admit(), for a request whose body is still to be read; what gives back the places it may hold meanwhile."""
        self._check_count(count)
        served = self.served(name, version)
        try:
            return served.batcher.hold(max(1, count))  # type: ignore[union-attr]
        except BatcherClosed:
            return lambda: None  # being replaced: the new version takes the request

    def readiness(self) -> tuple[bool, str]:
        """Whether to send requests here, and why in words: what /health and the v2 readiness route answer."""
        return self._readiness()

    def ready(self) -> bool:
        """The first half of `readiness()`."""
        return self._readiness()[0]

    def liveness(self) -> tuple[bool, str]:
        """Whether the process still works, whatever its models' state: what /livez and the v2 live route answer."""
        return self._liveness()

    def _check_count(self, count: int, what: str = "files") -> None:
        limit = self.settings.max_files_per_request
        if count > limit:
            raise BadRequest(f"{count} {what} is more than the limit of {limit} per request")

    def _check_pixel_budget(self, files: Sequence[EncodedImage]) -> None:
        # Each image is held to max_image_pixels; a request of many highly compressible images could
        # still cost gigabytes to decode, so their sum is held to a budget too, from the headers alone.
        budget = self.settings.max_request_pixels
        total = 0
        for image in files:
            try:
                total += image_pixels(image.data, image.filename)
            except core_errors.ImageTooLarge as exc:
                raise ImageTooLarge(str(exc)) from None
            except core_errors.UnsupportedImage as exc:
                raise UnsupportedImage(str(exc)) from None
            if total > budget:
                raise ImageTooLarge(
                    f"the request's {len(files)} images hold more than the limit of {budget} pixels per request "
                    f"(reached at {image.filename}); send them in several requests"
                )

    async def classify_files(
        self, name: str, version: int | None, files: Sequence[EncodedImage], deadline: Deadline, protocol: str
    ) -> Classification:
        """Decode `files` as training decoded its images, and classify them; raises a ServiceError."""
        if not files:
            raise BadRequest("no images: send at least one")
        self._check_count(len(files))
        if len(files) > 1:
            self._check_pixel_budget(files)
        max_pixels = self.settings.max_image_pixels
        for _ in range(_SWAP_RETRIES):
            served = self.served(name, version)
            spec = served.metadata.input_spec  # type: ignore[union-attr]
            decoders = [functools.partial(decode, image, spec, max_pixels) for image in files]
            try:
                rows = await served.batcher.infer(decoders, self._deadline(served, deadline), protocol)  # type: ignore[union-attr]
            except BatcherClosed:
                continue
            return self._answer(served, rows, [image.filename for image in files])
        raise self._swapping(name)

    async def classify_tensor(
        self, name: str, version: int | None, images: np.ndarray, deadline: Deadline, protocol: str
    ) -> Classification:
        """Classify uint8 images already at the model's input size, [batch, H, W, C]; raises a ServiceError."""
        self._check_count(len(images), "images")
        for _ in range(_SWAP_RETRIES):
            served = self.served(name, version)
            expected = served.metadata.input_shape  # type: ignore[union-attr]
            if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != expected:
                raise BadRequest(
                    f"model {served.name!r} takes uint8 images of shape [batch, {expected[0]}, {expected[1]}, {expected[2]}]; "
                    f"got {images.dtype} {list(images.shape)}"
                )
            if len(images) == 0:
                raise BadRequest("no images: the batch dimension is 0")
            try:
                rows = await served.batcher.infer(images, self._deadline(served, deadline), protocol)  # type: ignore[union-attr]
            except BatcherClosed:
                continue
            return self._answer(served, rows, [f"image {i}" for i in range(len(images))])
        raise self._swapping(name)

    def _deadline(self, served: ServedModel, deadline: Deadline) -> float:
        """The request's deadline by its model's timeout (the service's, unless the model's settings file sets one)."""
        return deadline.at((served.settings or self.settings).request_timeout_s)

    def _swapping(self, name: str) -> InferenceFailed:
        return InferenceFailed(f"model {name!r} was replaced {_SWAP_RETRIES} times while this request waited; retry it")

    def _answer(self, served: ServedModel, rows: np.ndarray, names: list[str]) -> Classification:
        broken = ~np.isfinite(rows).all(axis=1)
        if broken.any():
            # NaN or infinity is the model's failure on these images (an overflow, say), not an answer.
            bad = ", ".join(n for n, b in zip(names, broken) if b)
            log.error("model %s v%d returned non-finite probabilities for %s", served.name, served.version, bad)
            raise InferenceFailed(
                f"model {served.name!r} version {served.version} returned non-finite probabilities (NaN or infinity) for {bad}"
            )
        labels = served.metadata.labels  # type: ignore[union-attr]
        return Classification(served.name, served.version, labels, rows)
