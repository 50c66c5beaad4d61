"""The dynamic batcher: one per served model version, gathering images from concurrent requests.

The batcher owns the policy: `infer()` runs a lone request on an idle model at once, in one trip
to an inference thread (decode and run together), and otherwise decodes the request's images in
the decode pool and queues them to be gathered into batches with other requests' images.

Each queued image is an item with its own future, created before the item is queued. A batch
closes at `max_batch_size` images or `max_delay_s` after its first image was queued (waiting only
while more images are known to be on their way), and runs in a bounded thread pool off the event
loop when one of its `workers` slots is free; lone runs take a slot too, so nothing is marked
started before it really runs. The queue is bounded by the images still waiting for an answer:
images of a request that already gave up (deadline, disconnect) no longer count. Images whose
deadline passed are answered 504 and never run. An exception fails the futures of its batch only.
The gathering task is supervised: if it dies, every waiting image fails at once with the cause
logged, and it starts again.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import DeadlineExceeded, InferenceFailed, QueueFull
from .metrics import Metrics

log = logging.getLogger(__name__)

Clock = Callable[[], float]
# What a request hands the batcher: a ready uint8 NHWC array, or one decoder per image (each
# returning H x W x C), run in the decode pool or, for a lone request, on the inference thread.
Work = np.ndarray | Sequence[Callable[[], np.ndarray]]
# What releases the queue places the request being handled was given before its body was read
# (DataPlane.hold); a batcher in another process calls it once the request's images reached it.
HELD: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("held", default=None)


def _nothing() -> None:
    pass


async def decode_all(pool: Executor | None, decoders: Sequence[Callable[[], np.ndarray]]) -> list[np.ndarray]:
    """Run every decoder in the decode pool; the first failure cancels the decodes not yet started."""
    loop = asyncio.get_running_loop()
    futures = [loop.run_in_executor(pool, decode) for decode in decoders]
    try:
        return list(await asyncio.gather(*futures))
    except BaseException:
        for future in futures:
            future.cancel()
        raise


class BatcherClosed(RuntimeError):
    """The batcher stopped taking work (shutdown, or its model version was replaced)."""


class _ModelRaised(Exception):
    """The model itself raised while running a request alone (as opposed to a bad image)."""


@dataclass(eq=False)
class _Item:
    image: np.ndarray
    future: asyncio.Future[np.ndarray]
    deadline: float
    enqueued: float
    protocol: str = ""
    started: bool = False
    settled: bool = False  # no longer counted as waiting: started, or its request is answered or gone


class _Stop:
    """The mark that tells the gathering loop to end, queued behind the last item."""


_STOP = _Stop()
_ANNOUNCED_WAIT_S = 10.0


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
            self.batcher._incoming_changed()


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
        decode_pool: Executor | None = None,
        thread_setup: Callable[[], None] | None = None,
        clock: Clock = time.monotonic,
    ):
        self._run_batch = run
        self._run_lone = run_lone or run
        self.name, self.version = name, version
        self.max_batch_size, self.max_delay_s, self.queue_size = max_batch_size, max_delay_s, queue_size
        self.workers = workers
        self._metrics = metrics
        self._pad_to = pad_to
        self._decode_pool = decode_pool
        self._clock = clock
        self._queue: asyncio.Queue[_Item | _Stop] = (
            asyncio.Queue()
        )  # bounded by `queue_size` in submit(), so the stop mark always fits
        # `thread_setup` runs first on each inference thread (the service lowers their priority there).
        self._executor = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix=f"infer-{name}-{version}", initializer=thread_setup
        )
        self._slots = asyncio.Semaphore(workers)  # batches and lone runs alike: one per inference thread
        self._waiting = 0  # queued images not started and not given up
        self._incoming = 0  # announced images still being decoded
        self._no_incoming = asyncio.Event()
        self._no_incoming.set()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Future[Any]] = set()
        self._alone = 0  # requests on the lone path right now
        self._seconds_per_image = 0.01  # running estimate, for Retry-After
        self._closed_series = False

    @property
    def depth(self) -> int:
        """Images waiting to run whose requests still wait for them."""
        return self._waiting

    @property
    def healthy(self) -> bool:
        """False only when the gathering task has stopped while the batcher is open (a liveness failure)."""
        return self._closing or (self._task is not None and not self._task.done())

    def start(self) -> None:
        """Start gathering batches; call from the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._supervise(), name=f"batcher-{self.name}-{self.version}")

    # -- admission -------------------------------------------------------------------------------

    def check_room(self, count: int) -> None:
        """Raise QueueFull (or BatcherClosed) when `count` more images would not fit now; reserves nothing."""
        if self._closing or self._task is None:
            raise BatcherClosed(f"the batcher of {self.name} v{self.version} is closed")
        if self.depth + self._incoming + count > self.queue_size:
            raise self._queue_full()

    def hold(self, count: int) -> Callable[[], None]:
        """check_room(count), for a request whose body is still to be read; what releases the hold.

        Here the queue's state is live and announce() reserves places once the images are known,
        so a hold reserves nothing; a front end's stand-in (service/mirror.py) does.
        """
        self.check_room(count)
        return _nothing

    def announce(self, count: int) -> Announcement:
        """Say that `count` images are being decoded for this batcher, so a forming batch may wait for them.

        Raises QueueFull at once, before any decoding, when the waiting and announced images
        leave no room for `count` more; BatcherClosed once the batcher is closing.
        """
        self.check_room(count)
        self._incoming += count
        self._incoming_changed()
        return Announcement(self, count)

    def _incoming_changed(self) -> None:
        if self._incoming <= 0:
            self._no_incoming.set()
        else:
            self._no_incoming.clear()

    def _queue_full(self) -> QueueFull:
        return QueueFull(
            f"model {self.name!r} version {self.version} is busy: {self.depth + self._incoming} of its "
            f"{self.queue_size} queue places are taken; retry after {self.retry_after()} s",
            retry_after=self.retry_after(),
        )

    def retry_after(self) -> int:
        """Seconds until the waiting images have likely run, for a 503's Retry-After."""
        return max(1, min(60, math.ceil((self.depth + self._incoming) * self._seconds_per_image / self.workers)))

    def idle(self) -> bool:
        """Nothing waiting, announced, gathering or running: a new request would run alone at once."""
        return (
            not self._closing
            and self._task is not None
            and self.depth == 0
            and self._incoming <= 0
            and not self._running
            and self._alone == 0
        )

    # -- the entry point ---------------------------------------------------------------------------

    async def infer(self, work: Work, deadline: float, protocol: str = "") -> np.ndarray:
        """Rows for every image of one request, in order; the batcher chooses the lone path or a batch.

        `protocol` (multipart, v2-rest, v2-grpc) is what the request came by, for the batch metric.

        Raises QueueFull (503), DeadlineExceeded (504), InferenceFailed (500), BatcherClosed
        (the version is being replaced: ask the registry again), and whatever a decoder raises.
        """
        count = len(work)
        if self._clock() > deadline:
            self._count_expired(count)
            raise DeadlineExceeded(self._deadline_detail())
        if count == 1 and self.idle():
            prepare = (lambda: work) if isinstance(work, np.ndarray) else (lambda: work[0]()[None])
            return await self._run_alone(prepare, deadline, protocol)
        if isinstance(work, np.ndarray):
            return await self.submit(work, deadline, protocol=protocol)
        announcement = self.announce(count)
        try:
            images = await self._decode(work)
            return await self.submit(np.stack(images), deadline, announcement, protocol)
        finally:
            announcement.withdraw()

    async def _decode(self, decoders: Sequence[Callable[[], np.ndarray]]) -> list[np.ndarray]:
        return await decode_all(self._decode_pool, decoders)

    async def submit(
        self, images: np.ndarray, deadline: float, announcement: Announcement | None = None, protocol: str = ""
    ) -> np.ndarray:
        """Queue every image of one request and return their output rows in order.

        `deadline` is on the batcher's clock. Raises QueueFull (503) at once when the images do not
        fit, DeadlineExceeded (504) when the deadline passes before they run, InferenceFailed (500)
        when their batch raised, BatcherClosed after close(). An announced request is taken while
        the batcher closes: close() waits for it, so a swap never decodes a request twice.
        """
        try:
            if self._task is None or (self._closing and announcement is None):
                raise BatcherClosed(f"the batcher of {self.name} v{self.version} is closed")
            count = len(images)
            if self.depth + count > self.queue_size:
                raise self._queue_full()
            loop = asyncio.get_running_loop()
            now = self._clock()
            items = [_Item(images[i], loop.create_future(), deadline, now, protocol) for i in range(count)]
            for item in items:
                item.future.add_done_callback(self._settle_callback(item))
                self._queue.put_nowait(item)
            self._waiting += count
        finally:
            if announcement is not None:
                announcement.withdraw()
        self._update_depth()
        try:
            return await self._wait(items, deadline)
        except BaseException as error:
            dropped = 0
            for item in items:
                if not item.started:
                    dropped += item.future.cancel()  # the batcher skips it: nothing runs for a request that is gone
                    self._settle(item)
            if isinstance(error, DeadlineExceeded):
                # The gatherer expired one of this request's images (and counted it); the siblings it had not
                # reached yet will never run either, for the same deadline.
                self._count_expired(dropped)
            raise

    def _slot_freed(self, future: asyncio.Future[Any]) -> None:
        self._running.discard(future)
        self._slots.release()

    def _settle_callback(self, item: _Item) -> Callable[[asyncio.Future[np.ndarray]], None]:
        def settled(future: asyncio.Future[np.ndarray]) -> None:
            if not future.cancelled():
                future.exception()  # a future resolved after its request gave up must not log "never retrieved"
            self._settle(item)

        return settled

    def _settle(self, item: _Item) -> None:
        if not item.settled:
            item.settled = True
            self._waiting -= 1
            self._update_depth()

    async def _wait(self, items: list[_Item], deadline: float) -> np.ndarray:
        pending = {item.future for item in items}
        while pending:
            remaining: float | None = deadline - self._clock()
            if remaining is not None and remaining <= 0:
                unstarted = [item for item in items if not item.started and not item.future.done()]
                if unstarted:
                    self._count_expired(len(unstarted))
                    for item in unstarted:
                        item.future.cancel()
                        self._settle(item)  # now: its done-callback runs only on the next loop turn
                    raise DeadlineExceeded(self._deadline_detail())
                # Every image is already running or answered: its answer comes when the batch ends.
                remaining = None
            done, pending = await asyncio.wait(pending, timeout=remaining, return_when=asyncio.FIRST_EXCEPTION)
            for future in done:
                if future.cancelled():
                    continue
                error = future.exception()
                if error is not None:
                    raise error
        return np.stack([item.future.result() for item in items])

    def _deadline_detail(self) -> str:
        return (
            f"the request's deadline passed before its images ran on model {self.name!r} version {self.version}; nothing was run"
        )

    def _count_expired(self, count: int) -> None:
        if self._metrics and count:
            self._metrics.expired.labels(self.name).inc(count)

    # -- the lone path ---------------------------------------------------------------------------

    async def _run_alone(self, prepare: Callable[[], np.ndarray], deadline: float, protocol: str = "") -> np.ndarray:
        """Prepare (decode) and run one request's images in a single trip to an inference thread.

        The low-load path: when the batcher is idle there is nothing to batch with, and one thread
        hop instead of two (decode pool, then inference pool) keeps a lone request's latency at that
        of a plain one-request-one-run endpoint. It runs on `run_lone` (a session that may use more
        threads than the batch one, since nothing else is running) and holds a worker slot like a
        batch. Errors from `prepare` (a bad image) pass through unchanged; an inference error is an
        InferenceFailed like a batch's.
        """
        self._alone += 1
        try:
            await self._slots.acquire()
            try:
                if self._clock() > deadline:
                    self._count_expired(1)
                    raise DeadlineExceeded(self._deadline_detail())
                future = asyncio.get_running_loop().run_in_executor(self._executor, self._prepare_and_run, prepare)
            except BaseException:
                self._slots.release()
                raise
            # The slot is the thread's: it is given back when the run ends, even if the request is gone before.
            self._running.add(future)
            future.add_done_callback(self._slot_freed)
            images, rows, elapsed = await asyncio.shield(future)
        except _ModelRaised as failure:
            log.error("inference failed for %s v%d on one request run alone", self.name, self.version, exc_info=failure.__cause__)
            if self._metrics:
                self._metrics.batch_failures.labels(self.name).inc()
            raise self._inference_failed() from None
        finally:
            self._alone -= 1
        self._record(len(images), elapsed, {protocol})
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

    def _inference_failed(self) -> InferenceFailed:
        return InferenceFailed(
            f"inference failed for model {self.name!r} version {self.version}; the cause is in the service log"
        )

    # -- gathering and running batches -------------------------------------------------------------

    async def close(self) -> None:
        """Stop taking new work, take what was announced, finish every queued image and lone run, then stop."""
        if self._closing:
            return
        self._closing = True
        if self._task is not None:
            # Announced requests are decoding and will submit; a decode takes well under this.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._no_incoming.wait(), _ANNOUNCED_WAIT_S)
            self._queue.put_nowait(_STOP)
            # A gathering task that died (liveness reports it) must not stop the close: what it
            # raised was logged by the supervisor, and the waiting images fail below.
            await asyncio.gather(self._task, return_exceptions=True)
            for item in self._drain_queue():
                if not item.future.done():
                    item.future.set_exception(self._inference_failed())
        while self._running:
            await asyncio.gather(*list(self._running), return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def _supervise(self) -> None:
        """Run the gathering loop; if it dies, fail what waits (the cause logged) and start it again."""
        while True:
            in_hand: list[_Item] = []
            try:
                await self._gather_loop(in_hand)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception(
                    "the batcher of %s v%d stopped gathering; failing its waiting images and restarting", self.name, self.version
                )
                for item in in_hand + self._drain_queue():
                    if not item.future.done():
                        item.future.set_exception(self._inference_failed())
                await asyncio.sleep(0.05)

    def _drain_queue(self) -> list[_Item]:
        items: list[_Item] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return items
            if isinstance(item, _Stop):
                self._queue.put_nowait(_STOP)  # keep the stop mark for the restarted loop
                return items
            items.append(item)

    async def _next_live(self, wait_s: float | None) -> _Item | _Stop | None:
        """The next queued item whose request still waits, the stop mark, or None at the timeout."""
        while True:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                if wait_s is not None and wait_s <= 0:
                    return None
                try:
                    item = await asyncio.wait_for(self._queue.get(), wait_s) if wait_s is not None else await self._queue.get()
                except TimeoutError:
                    return None
            if isinstance(item, _Stop) or not item.future.done():
                return item

    async def _gather_loop(self, batch: list[_Item]) -> None:
        while True:
            first = await self._next_live(None)
            if not isinstance(first, _Item):
                return
            batch.append(first)
            await self._slots.acquire()
            stopping = False
            try:
                # The delay counts from when the first image was queued, not from when it was taken;
                # while every slot was busy, images gathered in the queue and join at once.
                close_at = first.enqueued + self.max_delay_s
                while len(batch) < self.max_batch_size:
                    remaining = close_at - self._clock()
                    may_wait = remaining > 0 and self._incoming > 0
                    item = await self._next_live(remaining if may_wait else 0)
                    if item is None:
                        break
                    if isinstance(item, _Stop):
                        stopping = True
                        break
                    batch.append(item)
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.get_running_loop().create_task(self._run(list(batch)))
            batch.clear()
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            if stopping:
                return

    async def _run(self, batch: list[_Item]) -> None:
        try:
            now = self._clock()
            live = []
            expired = 0
            for item in batch:
                if item.future.done():
                    continue  # its request gave up (deadline or disconnect); it was counted there
                if now > item.deadline:
                    item.future.set_exception(DeadlineExceeded(self._deadline_detail()))
                    expired += 1
                    continue
                item.started = True
                self._settle(item)
                live.append(item)
                if self._metrics:
                    self._metrics.queue_wait.labels(self.name).observe(now - item.enqueued)
            self._count_expired(expired)
            if live:
                await self._infer(live)
        finally:
            self._slots.release()

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
                    item.future.set_exception(self._inference_failed())
            return
        self._record(size, time.perf_counter() - started, {item.protocol for item in live})
        for item, row in zip(live, rows):
            if not item.future.done():
                item.future.set_result(row)

    def _record(self, size: int, elapsed: float, protocols: set[str]) -> None:
        self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * elapsed / size
        if self._metrics:
            self._metrics.batches.labels(self.name, "+".join(sorted(p for p in protocols if p)) or "none").inc()
            self._metrics.batch_size.labels(self.name).observe(size)
            self._metrics.inference.labels(self.name).observe(elapsed)
            self._metrics.images.labels(self.name).inc(size)

    def _update_depth(self) -> None:
        if self._metrics and not self._closed_series:
            self._metrics.queue_depth.labels(self.name, str(self.version)).set(self.depth)

    def forget_metrics(self) -> None:
        """Drop this version's own metric series (after close), so an unloaded version leaves none behind."""
        self._closed_series = True
        if self._metrics:
            with contextlib.suppress(KeyError):
                self._metrics.queue_depth.remove(self.name, str(self.version))
