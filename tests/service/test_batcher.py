"""The batcher on its own, in-process, with a request factory over a real onnxruntime session."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
import pytest

from kos_core.layout import model_path
from service.batcher import Batcher, BatcherClosed
from service.errors import DeadlineExceeded, InferenceFailed, QueueFull
from service.metrics import Metrics
from tests.conftest import BUNDLED_REPOSITORY
from tests.service.conftest import metric_value


class DigitsRun:
    """The bundled digits model as a batch function that records the batches it ran and can be slowed or gated."""

    def __init__(self, model_file, delay_s: float = 0.0):
        self.session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
        self.delay_s = delay_s
        self.batches: list[np.ndarray] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.gate.wait(timeout=30)
        time.sleep(self.delay_s)
        self.batches.append(images.copy())
        if (images == 255).all(axis=(1, 2, 3)).any():
            raise RuntimeError("all-white image: this batch fails on purpose")
        return self.session.run(["probabilities"], {"image": images})[0]


@pytest.fixture
def digits_run() -> DigitsRun:
    return DigitsRun(model_path(BUNDLED_REPOSITORY, "digits", 1))


@pytest.fixture
async def make_batcher() -> Callable[..., Batcher]:
    created: list[Batcher] = []

    def make(run: Callable, **options) -> Batcher:
        settings = dict(name="digits", version=1, max_batch_size=8, max_delay_s=0.05, queue_size=64, metrics=Metrics())
        batcher = Batcher(run, **{**settings, **options})
        batcher.start()
        created.append(batcher)
        return batcher

    yield make
    for batcher in created:
        await batcher.close()  # already-closed ones return at once


def images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 200, (count, 8, 8, 1), dtype=np.uint8)


def later(seconds: float) -> float:
    return time.monotonic() + seconds


async def test_concurrent_requests_share_batches_and_each_gets_its_own_rows(make_batcher, digits_run):
    batcher = make_batcher(digits_run)
    requests = [images(1 + i % 3, seed=i) for i in range(12)]
    announcements = [batcher.announce(len(b)) for b in requests]  # all of them are "decoding" when the first arrives
    results = await asyncio.gather(*(batcher.submit(b, later(10), a) for b, a in zip(requests, announcements)))
    expected = digits_run.session.run(["probabilities"], {"image": np.concatenate(requests)})[0]
    np.testing.assert_allclose(np.concatenate(results), expected, atol=1e-5)
    sizes = [len(b) for b in digits_run.batches]
    assert sum(sizes) == sum(len(b) for b in requests)
    assert max(sizes) == 8, f"batches were {sizes}"


async def test_a_request_with_more_images_than_a_batch_spans_batches_in_order(make_batcher, digits_run):
    batcher = make_batcher(digits_run, max_batch_size=4)
    many = images(11)
    result = await batcher.submit(many, later(10))
    np.testing.assert_allclose(result, digits_run.session.run(["probabilities"], {"image": many})[0], atol=1e-5)
    assert [len(b) for b in digits_run.batches] == [4, 4, 3]


async def test_a_lone_request_runs_at_once_without_waiting_for_the_batch_delay(make_batcher, digits_run):
    batcher = make_batcher(digits_run, max_delay_s=5.0)
    started = time.monotonic()
    await batcher.submit(images(1), later(10))
    assert time.monotonic() - started < 2.5, "nothing else was announced, so the batcher must not wait out its delay"


async def test_the_batch_closes_at_the_delay_when_announced_images_do_not_come(make_batcher, digits_run):
    batcher = make_batcher(digits_run, max_delay_s=0.3)
    announcement = batcher.announce(5)  # five images "decoding" that never arrive
    started = time.monotonic()
    await batcher.submit(images(1), later(10))
    waited = time.monotonic() - started
    announcement.withdraw()
    assert 0.25 <= waited < 5, waited


async def test_full_queue_refuses_at_once_with_retry_after(make_batcher, digits_run):
    digits_run.gate.clear()  # the first batch blocks, so everything after it waits in the queue
    batcher = make_batcher(digits_run, max_batch_size=1, queue_size=3)
    first = asyncio.ensure_future(batcher.submit(images(1), later(30)))
    await asyncio.sleep(0.2)
    queued = asyncio.ensure_future(batcher.submit(images(3), later(30)))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    with pytest.raises(QueueFull) as refused:
        await batcher.submit(images(1), later(30))
    assert time.monotonic() - started < 0.5
    assert int(refused.value.headers["Retry-After"]) >= 1
    digits_run.gate.set()
    assert len(await first) == 1 and len(await queued) == 3


async def test_images_whose_deadline_passed_are_answered_504_and_never_run(make_batcher, digits_run):
    digits_run.gate.clear()
    batcher = make_batcher(digits_run, max_batch_size=1)
    blocker = asyncio.ensure_future(batcher.submit(images(1, seed=1), later(30)))
    await asyncio.sleep(0.2)
    late = images(2, seed=2)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(late, later(0.3))
    assert time.monotonic() - started < 5, "the 504 comes at the deadline, not after the blocking batch"
    digits_run.gate.set()
    await blocker
    await batcher.submit(images(1, seed=3), later(10))  # the batcher goes on
    assert not any((batch == image).all(axis=(1, 2, 3)).any() for image in late for batch in digits_run.batches), (
        "an expired image was run"
    )


async def test_an_exception_fails_only_its_own_batch_and_the_batcher_goes_on(make_batcher, digits_run):
    batcher = make_batcher(digits_run, max_batch_size=2, max_delay_s=0.0)
    white = np.full((1, 8, 8, 1), 255, dtype=np.uint8)
    with pytest.raises(InferenceFailed) as failed:
        await batcher.submit(white, later(10))
    assert "RuntimeError" not in failed.value.detail and "all-white" not in failed.value.detail
    good = images(3)
    np.testing.assert_allclose(
        await batcher.submit(good, later(10)), digits_run.session.run(["probabilities"], {"image": good})[0], atol=1e-5
    )
    assert metric_value(batcher._metrics.render().decode(), "kos_batch_failures_total") == 1


async def test_close_finishes_every_queued_image_then_refuses_new_work(make_batcher, digits_run):
    digits_run.delay_s = 0.05
    batcher = make_batcher(digits_run, max_batch_size=2)
    pending = [asyncio.ensure_future(batcher.submit(images(1, seed=i), later(30))) for i in range(7)]
    await asyncio.sleep(0.01)
    await batcher.close()
    assert all(p.done() and len(p.result()) == 1 for p in pending)
    with pytest.raises(BatcherClosed):
        await batcher.submit(images(1), later(10))


async def test_a_cancelled_request_is_not_run(make_batcher, digits_run):
    digits_run.gate.clear()
    batcher = make_batcher(digits_run, max_batch_size=1)
    blocker = asyncio.ensure_future(batcher.submit(images(1, seed=1), later(30)))
    await asyncio.sleep(0.2)
    gone = images(1, seed=9)
    abandoned = asyncio.ensure_future(batcher.submit(gone, later(30)))
    await asyncio.sleep(0.05)
    abandoned.cancel()
    digits_run.gate.set()
    await blocker
    await batcher.submit(images(1, seed=3), later(10))
    assert not any((batch == gone).all(axis=(1, 2, 3)).any() for batch in digits_run.batches)


async def test_batches_are_padded_to_the_warmed_sizes_and_only_real_rows_come_back(make_batcher, digits_run):
    from service.runtime import pad_size

    # What the registry sets up on CUDA; the padding itself runs the same on CPU.
    batcher = make_batcher(digits_run, max_batch_size=8, pad_to=lambda n: pad_size(n, 8))
    three = images(3)
    result = await batcher.submit(three, later(10))
    assert [len(b) for b in digits_run.batches] == [4]
    assert len(result) == 3
    np.testing.assert_allclose(result, digits_run.session.run(["probabilities"], {"image": three})[0], atol=1e-5)


async def test_an_idle_batcher_runs_a_lone_request_in_one_trip_and_keeps_image_errors_apart(make_batcher, digits_run):
    from service.errors import UnsupportedImage

    batcher = make_batcher(digits_run)
    assert batcher.idle()
    one = images(1)
    np.testing.assert_allclose(
        await batcher.infer([lambda: one[0]], later(10)), digits_run.session.run(["probabilities"], {"image": one})[0], atol=1e-5
    )

    def bad_image() -> np.ndarray:
        raise UnsupportedImage("x.png: not a readable image")

    with pytest.raises(UnsupportedImage, match="x.png"):
        await batcher.infer([bad_image], later(10))
    with pytest.raises(InferenceFailed):
        await batcher.infer(np.full((1, 8, 8, 1), 255, np.uint8), later(10))
    text = batcher._metrics.render().decode()
    assert metric_value(text, "kos_batch_failures_total") == 1  # the bad image is not a model failure
    assert metric_value(text, "kos_images_total") == 1
    announcement = batcher.announce(1)
    assert not batcher.idle(), "with images on their way, a request must join the batch instead"
    announcement.withdraw()
    assert batcher.idle()


async def test_a_lone_request_runs_on_the_lone_function_and_batches_on_the_batch_function(make_batcher, digits_run):
    lone = DigitsRun(model_path(BUNDLED_REPOSITORY, "digits", 1))
    batcher = make_batcher(digits_run, run_lone=lone)
    one = images(1)
    await batcher.infer(one, later(10))
    assert len(lone.batches) == 1 and not digits_run.batches
    await batcher.submit(images(2), later(10))
    assert len(lone.batches) == 1 and len(digits_run.batches) == 1


async def test_a_request_is_refused_before_decoding_when_queued_and_announced_images_fill_the_queue(make_batcher, digits_run):
    batcher = make_batcher(digits_run, queue_size=4)
    first = batcher.announce(3)  # three images being decoded by other requests
    with pytest.raises(QueueFull):
        batcher.announce(2)
    second = batcher.announce(1)
    first.withdraw()
    second.withdraw()
    batcher.announce(4).withdraw()


async def test_images_of_requests_that_gave_up_no_longer_count_as_queued(make_batcher, digits_run):
    digits_run.gate.clear()  # the first batch blocks: everything after it waits
    batcher = make_batcher(digits_run, max_batch_size=1, queue_size=4)
    blocker = asyncio.ensure_future(batcher.submit(images(1), later(30)))
    await asyncio.sleep(0.2)
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(images(3, seed=1), later(0.2))
    assert batcher.depth == 0, "answered 504, its images hold no queue places"
    # The queue has room for a full request again, though the gatherer has not reached the dead images.
    waiting = asyncio.ensure_future(batcher.submit(images(4, seed=2), later(30)))
    await asyncio.sleep(0.05)
    assert batcher.depth == 4
    text = batcher._metrics.render().decode()
    assert metric_value(text, "kos_queue_depth", model="digits", version="1") == 4
    digits_run.gate.set()
    assert len(await blocker) == 1 and len(await waiting) == 4


async def test_every_expired_image_is_counted_whichever_side_noticed(make_batcher, digits_run):
    digits_run.gate.clear()
    batcher = make_batcher(digits_run, max_batch_size=1)
    blocker = asyncio.ensure_future(batcher.submit(images(1), later(30)))
    await asyncio.sleep(0.2)
    with pytest.raises(DeadlineExceeded):  # noticed by the waiting request
        await batcher.submit(images(3, seed=1), later(0.2))
    with pytest.raises(DeadlineExceeded):  # already past on arrival
        await batcher.infer(images(2, seed=2), later(-1))
    digits_run.gate.set()
    await blocker
    assert metric_value(batcher._metrics.render().decode(), "kos_deadline_expired_images_total", model="digits") == 5


async def test_a_lone_run_holds_the_only_worker_so_a_batch_formed_meanwhile_can_still_expire(make_batcher, digits_run):
    lone = DigitsRun(model_path(BUNDLED_REPOSITORY, "digits", 1))
    lone.gate.clear()
    batcher = make_batcher(digits_run, run_lone=lone, max_batch_size=4)
    alone = asyncio.ensure_future(batcher.infer(images(1), later(30)))
    await asyncio.sleep(0.1)
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(images(2, seed=1), later(0.3))
    lone.gate.set()
    assert len(await alone) == 1
    assert not digits_run.batches, "the expired batch never ran"


async def test_a_closing_batcher_refuses_new_work_but_takes_what_was_announced(make_batcher, digits_run):
    batcher = make_batcher(digits_run)
    announced = batcher.announce(2)
    closing = asyncio.ensure_future(batcher.close())
    await asyncio.sleep(0.05)
    with pytest.raises(BatcherClosed):
        batcher.announce(1)
    rows = await batcher.submit(images(2), later(10), announced)
    await closing
    assert len(rows) == 2


async def test_a_gatherer_that_dies_fails_what_waits_at_once_and_starts_again(make_batcher, digits_run):
    batcher = make_batcher(digits_run, max_delay_s=0.0)
    real = batcher._next_live
    broken = {"times": 1}

    async def once_broken(wait_s):
        if broken["times"]:
            broken["times"] -= 1
            raise RuntimeError("gatherer bug")
        return await real(wait_s)

    batcher._next_live = once_broken
    started = time.monotonic()
    with pytest.raises(InferenceFailed):
        await batcher.submit(images(2), later(30))
    assert time.monotonic() - started < 5, "failed at once, not at the deadline"
    assert batcher.healthy
    assert len(await batcher.submit(images(2, seed=1), later(10))) == 2


async def test_deadlines_follow_the_injected_clock(make_batcher, digits_run):
    now = [1000.0]
    batcher = make_batcher(digits_run, clock=lambda: now[0])
    with pytest.raises(DeadlineExceeded):
        await batcher.infer(images(1), 999.0)
    assert len(await batcher.infer(images(1), 1001.0)) == 1


async def test_when_the_gatherer_expires_one_image_of_a_request_its_unreached_siblings_are_counted_too(make_batcher, digits_run):
    now = [1000.0]
    digits_run.gate.clear()
    batcher = make_batcher(digits_run, max_batch_size=1, clock=lambda: now[0])
    blocker = asyncio.ensure_future(batcher.submit(images(1), 5000.0))
    await asyncio.sleep(0.2)  # the only worker is taken: the three images below wait in the queue
    request = asyncio.ensure_future(batcher.submit(images(3, seed=1), 1500.0))
    await asyncio.sleep(0.2)
    now[0] = 2000.0  # past the request's deadline on the batcher's clock; its own wait has not timed out
    digits_run.gate.set()
    with pytest.raises(DeadlineExceeded):
        await request
    await blocker
    text = batcher._metrics.render().decode()
    assert metric_value(text, "kos_deadline_expired_images_total", model="digits") == 3
    assert len(digits_run.batches) == 1, "none of the three ran"


class ConcurrencyProbe:
    """A batch function that records how many batches ran at the same time."""

    def __init__(self, run: DigitsRun, seconds: float):
        self.run, self.seconds = run, seconds
        self.lock = threading.Lock()
        self.now = self.most = 0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            time.sleep(self.seconds)
            return self.run(images)
        finally:
            with self.lock:
                self.now -= 1


@pytest.mark.parametrize("workers", [1, 2, 3])
async def test_several_workers_run_that_many_batches_at_once_and_no_more(make_batcher, digits_run, workers):
    probe = ConcurrencyProbe(digits_run, 0.2)
    batcher = make_batcher(probe, max_batch_size=1, workers=workers)
    rows = await asyncio.gather(*(batcher.submit(images(1, seed=i), later(30)) for i in range(6)))
    assert probe.most == workers
    expected = digits_run.session.run(["probabilities"], {"image": np.concatenate([images(1, seed=i) for i in range(6)])})[0]
    np.testing.assert_allclose(np.concatenate(rows), expected, atol=1e-6)


async def test_a_bad_file_cancels_the_decodes_of_its_siblings_not_yet_started():
    from concurrent.futures import ThreadPoolExecutor

    from service.errors import UnsupportedImage

    decoded: list[int] = []

    def bad() -> np.ndarray:
        raise UnsupportedImage("bad.png: not a readable image")

    def slow(i: int) -> Callable[[], np.ndarray]:
        def decode() -> np.ndarray:
            time.sleep(0.05)
            decoded.append(i)
            return images(1, seed=i)[0]

        return decode

    from service.batcher import decode_all

    with ThreadPoolExecutor(max_workers=1) as pool:  # one thread: the siblings wait their turn behind the bad file
        with pytest.raises(UnsupportedImage):
            await decode_all(pool, [slow(0), bad, *(slow(i) for i in range(1, 20))])
        # The cancellations reach the pool on the loop's next turns, as they do in the running service
        # (leaving the `with` at once would block the loop in the pool's shutdown first).
        await asyncio.sleep(0.2)
    assert decoded[:1] == [0] and len(decoded) <= 2, f"siblings after the bad file were decoded: {decoded}"
