"""The dynamic batcher: one per served model version, gathering images from concurrent requests.

Each image is an item with its own future, created before the item is queued. A batch closes at
`max_batch_size` images or `max_delay_s` after its first image was queued (waiting only while
more images are known to be on their way), runs in a bounded thread pool off the event loop, and
each future gets its own row back. The queue is bounded: a request that does not fit is refused
at once. Items whose deadline passed are answered 504 and never run. An exception fails the
futures of its batch only.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .errors import DeadlineExceeded, InferenceFailed, QueueFull
from .metrics import Metrics

log = logging.getLogger(__name__)


class BatcherClosed(RuntimeError):
    """The batcher stopped taking work (shutdown, or its model version was replaced)."""


class _ModelRaised(Exception):
    """The model itself raised while running a request alone (as opposed to a bad image)."""


@dataclass(eq=False)
class _Item:
    image: np.ndarray
    future: asyncio.Future
    deadline: float
    enqueued: float
    started: bool = False


_STOP = object()


@dataclass(eq=False)
class Announcement:
    """Images a request is decoding for this batcher; while any are announced the batcher may wait for them."""

    batcher: Batcher
    count: int
    withdrawn: bool = field(default=False)

    def withdraw(self) -> None:
        if not self.withdrawn:
            self.withdrawn = True
            self.batcher._incoming -= self.count


class Batcher:
    """Gathers single images into batches for `run` (a blocking NHWC-batch-to-rows function)."""

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        *,
        name: str,
        version: int,
        max_batch_size: int,
        max_delay_s: float,
        queue_size: int,
        workers: int = 1,
        metrics: Metrics | None = None,
        pad_to: Callable[[int], int] | None = None,
        run_lone: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        self._run_batch = run
        self._run_lone = run_lone or run
        self.name, self.version = name, version
        self.max_batch_size, self.max_delay_s, self.queue_size = max_batch_size, max_delay_s, queue_size
        self._workers = workers
        self._metrics = metrics
        self._pad_to = pad_to
        self._queue: asyncio.Queue = asyncio.Queue()  # bounded by `queue_size` in submit(), so the stop mark always fits
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"infer-{name}-{version}")
        self._incoming = 0
        self._closing = False
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._alone = 0  # requests on the run_alone path right now
        self._seconds_per_image = 0.01  # running estimate, for Retry-After

    @property
    def depth(self) -> int:
        """Images waiting to run."""
        return self._queue.qsize()

    def start(self) -> None:
        """Start gathering batches; call from the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._gather_loop(), name=f"batcher-{self.name}-{self.version}")

    def announce(self, count: int) -> Announcement:
        """Say that `count` images are being decoded for this batcher, so a forming batch may wait for them.

        Raises QueueFull at once, before any decoding, when the queued and announced images
        leave no room for `count` more.
        """
        if self.depth + self._incoming + count > self.queue_size:
            raise self._queue_full()
        self._incoming += count
        return Announcement(self, count)

    def _queue_full(self) -> QueueFull:
        return QueueFull(
            f"model {self.name!r} version {self.version} is busy: its queue holds {self.depth} of "
            f"{self.queue_size} images; retry after {self.retry_after()} s",
            retry_after=self.retry_after(),
        )

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained, for a 503's Retry-After."""
        return max(1, min(60, math.ceil(self.depth * self._seconds_per_image)))

    async def submit(self, images: np.ndarray, deadline: float, announcement: Announcement | None = None) -> np.ndarray:
        """Queue every image of one request and return their output rows in order.

        `deadline` is on the `time.monotonic()` clock. Raises QueueFull (503) at once when the
        images do not fit, DeadlineExceeded (504) when the deadline passes before they run,
        InferenceFailed (500) when their batch raised, BatcherClosed after close().
        """
        try:
            if self._closing or self._task is None:
                raise BatcherClosed(f"the batcher of {self.name} v{self.version} is closed")
            count = len(images)
            if self.depth + count > self.queue_size:
                raise self._queue_full()
            loop = asyncio.get_running_loop()
            now = time.monotonic()
            items = [_Item(images[i], loop.create_future(), deadline, now) for i in range(count)]
            for item in items:
                # A future resolved after its request gave up must not log "exception never retrieved".
                item.future.add_done_callback(_consume)
                self._queue.put_nowait(item)
        finally:
            if announcement is not None:
                announcement.withdraw()
        self._update_depth()
        try:
            return await self._wait(items, deadline)
        except BaseException:
            for item in items:
                if not item.started:
                    item.future.cancel()  # the batcher skips it: nothing runs for a request that is gone
            raise

    def idle(self) -> bool:
        """Nothing queued, announced, gathering or running: a new request would run alone at once."""
        return (
            not self._closing
            and self._task is not None
            and self.depth == 0
            and self._incoming <= 0
            and not self._running
            and self._alone == 0
        )

    async def run_alone(self, prepare: Callable[[], np.ndarray]) -> np.ndarray:
        """Prepare (decode) and run one request's images in a single trip to the inference thread.

        The low-load path: when the batcher is idle there is nothing to batch with, and one thread
        hop instead of two (decode pool, then inference pool) is what keeps a lone request's
        latency at that of a plain one-request-one-run endpoint. It runs on `run_lone` (a session
        that may use more threads than the batch one, since nothing else is running). Errors from `prepare` (a bad
        image) pass through unchanged; an inference error is an InferenceFailed like a batch's.
        """
        if self._closing or self._task is None:
            raise BatcherClosed(f"the batcher of {self.name} v{self.version} is closed")
        self._alone += 1
        try:
            images, rows, elapsed = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._prepare_and_run, prepare
            )
        except _ModelRaised as failure:
            log.error("inference failed for %s v%d on one request run alone", self.name, self.version, exc_info=failure.__cause__)
            if self._metrics:
                self._metrics.batch_failures.labels(self.name).inc()
            raise InferenceFailed(
                f"inference failed for model {self.name!r} version {self.version}; the cause is in the service log"
            ) from None
        finally:
            self._alone -= 1
        self._record(len(images), elapsed)
        if self._metrics:
            self._metrics.queue_wait.labels(self.name).observe(0.0)
        return rows[: len(images)]

    def _prepare_and_run(self, prepare: Callable[[], np.ndarray]) -> tuple[np.ndarray, np.ndarray, float]:
        images = prepare()
        started = time.perf_counter()
        try:
            rows = self._run_lone(images)
            if len(rows) < len(images):
                raise ValueError(f"the model returned {len(rows)} rows for {len(images)} images")
        except Exception as exc:
            raise _ModelRaised() from exc
        return images, rows, time.perf_counter() - started

    def _record(self, size: int, elapsed: float) -> None:
        self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * elapsed / size
        if self._metrics:
            self._metrics.batch_size.labels(self.name).observe(size)
            self._metrics.inference.labels(self.name).observe(elapsed)
            self._metrics.images.labels(self.name).inc(size)

    async def _wait(self, items: list[_Item], deadline: float) -> np.ndarray:
        pending = {item.future for item in items}
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if any(not item.started for item in items):
                    raise DeadlineExceeded(self._deadline_detail())
                # Every image is already running: its answer comes when the batch ends.
                remaining = None
            done, pending = await asyncio.wait(pending, timeout=remaining, return_when=asyncio.FIRST_EXCEPTION)
            for future in done:
                if not future.cancelled() and future.exception() is not None:
                    raise future.exception()
        return np.stack([item.future.result() for item in items])

    def _deadline_detail(self) -> str:
        return (
            f"the request's deadline passed before its images ran on model {self.name!r} version {self.version}; nothing was run"
        )

    async def close(self) -> None:
        """Stop taking work, finish every queued image, then stop."""
        if self._closing:
            return
        self._closing = True
        if self._task is not None:
            self._queue.put_nowait(_STOP)
            await self._task
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        self._executor.shutdown(wait=False)

    async def _gather_loop(self) -> None:
        slots = asyncio.Semaphore(self._workers)
        stopping = False
        while not stopping:
            await slots.acquire()
            first = await self._queue.get()
            if first is _STOP:
                slots.release()
                break
            batch = [first]
            # The delay counts from when the first image was queued, not from when it was taken.
            close_at = first.enqueued + self.max_delay_s
            while len(batch) < self.max_batch_size:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = close_at - time.monotonic()
                    if remaining <= 0 or self._incoming <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), remaining)
                    except TimeoutError:
                        break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            self._update_depth()
            task = asyncio.get_running_loop().create_task(self._run(batch, slots))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[_Item], slots: asyncio.Semaphore) -> None:
        try:
            now = time.monotonic()
            live = []
            for item in batch:
                if item.future.done():
                    continue  # its request gave up (deadline or disconnect)
                if now > item.deadline:
                    item.future.set_exception(DeadlineExceeded(self._deadline_detail()))
                    if self._metrics:
                        self._metrics.expired.labels(self.name).inc()
                    continue
                item.started = True
                live.append(item)
                if self._metrics:
                    self._metrics.queue_wait.labels(self.name).observe(now - item.enqueued)
            if not live:
                return
            await self._infer(live)
        finally:
            slots.release()

    async def _infer(self, live: list[_Item]) -> None:
        size = len(live)
        started = time.perf_counter()
        try:
            images = np.stack([item.image for item in live])
            if self._pad_to is not None and self._pad_to(size) > size:
                # A few fixed batch shapes, each warmed at start-up: a new shape is slow on CUDA.
                padding = np.zeros((self._pad_to(size) - size, *images.shape[1:]), dtype=images.dtype)
                images = np.concatenate([images, padding])
            rows = await asyncio.get_running_loop().run_in_executor(self._executor, self._run_batch, images)
            if len(rows) < size:
                raise ValueError(f"the model returned {len(rows)} rows for {size} images")
        except Exception:
            log.exception("inference failed for %s v%d on a batch of %d images", self.name, self.version, size)
            if self._metrics:
                self._metrics.batch_failures.labels(self.name).inc()
            for item in live:
                if not item.future.done():
                    item.future.set_exception(
                        InferenceFailed(
                            f"inference failed for model {self.name!r} version {self.version}; the cause is in the service log"
                        )
                    )
            return
        self._record(size, time.perf_counter() - started)
        for item, row in zip(live, rows):
            if not item.future.done():
                item.future.set_result(row)

    def _update_depth(self) -> None:
        if self._metrics:
            self._metrics.queue_depth.labels(self.name, str(self.version)).set(self.depth)


def _consume(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
