"""The application factory in-process: an app built from its own settings, its lifespan run by the test."""

from __future__ import annotations

import os
import shutil

import httpx
import numpy as np
import pytest

from kos_core.layout import model_path
from service.app import create_app
from service.errors import ModelNotFound
from service.metrics import Metrics
from service.registry import Registry
from service.runtime import resolve_device
from service.settings import Settings
from tests.service.conftest import make_repository, metric_value, png_bytes


async def test_an_app_built_from_its_own_settings_loads_serves_and_drains_in_its_lifespan(tmp_path, exported, digits_test_split):
    repository = make_repository(tmp_path, {"digits": exported["digits"]})
    settings = Settings(repository=repository, max_batch_size=4, watch_interval_s=0, max_files_per_request=10)
    app = create_app(settings, resolve_device("cpu"))
    images = digits_test_split.x[:10]
    files = [("files", (f"d{i}.png", png_bytes(image[:, :, 0]), "image/png")) for i, image in enumerate(images)]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/health")).status_code == 200
            r = await client.post("/predict/digits?top_k=1", files=files)
            assert r.status_code == 200, r.text
            assert [p["filename"] for p in r.json()["predictions"]] == [f"d{i}.png" for i in range(10)]
            metrics = (await client.get("/metrics")).text
    # Ten images with batches of at most four: the request spanned at least three batches.
    assert metric_value(metrics, "kos_batch_size_count", model="digits") >= 3
    assert metric_value(metrics, "kos_images_total", model="digits") == 10
    served = app.state.registry.models["digits"][1]
    assert served.state == "closed" and served.batcher is None and served.session is None, (
        "the lifespan's end drains the batchers and frees the sessions"
    )
    assert np.isfinite([p["probability"] for p in r.json()["predictions"]]).all()


async def test_a_broken_replacement_is_refused_and_a_removed_version_is_unloaded_after_two_scans(tmp_path, exported):
    repository = make_repository(tmp_path / "models", {"digits": exported["digits"]})
    registry = Registry(Settings(repository=repository, watch_interval_s=0), resolve_device("cpu"), Metrics())
    registry.load_all()
    registry.start()
    working = registry.get("digits")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    os.replace(broken, model_path(repository, "digits", 1))  # a new file in place, as a rename does
    changes = await registry.refresh()
    assert len(changes) == 1 and "replacement refused" in changes[0]
    assert registry.get("digits") is working and working.state == "ready"
    assert await registry.refresh() == [], "the same broken file is not retried every scan"
    shutil.rmtree(repository / "digits" / "1")
    assert await registry.refresh() == [], "one scan without the folder may be a replacement in progress"
    assert await registry.refresh() == ["digits v1: removed"]
    with pytest.raises(ModelNotFound):
        registry.get("digits")
    await registry.close()


async def test_a_swapped_out_version_frees_its_session_at_once_not_when_the_garbage_collector_runs(tmp_path, exported):
    import gc
    import weakref

    repository = make_repository(tmp_path / "models", {"digits": exported["digits"]})
    metrics = Metrics()
    registry = Registry(Settings(repository=repository, watch_interval_s=0), resolve_device("cpu"), metrics)
    registry.load_all()
    registry.start()
    old = registry.get("digits")
    session = weakref.ref(old.session)
    replacement = tmp_path / "replacement.onnx"
    shutil.copyfile(model_path(repository, "digits", 1), replacement)
    gc.disable()  # only reference counting may free it
    try:
        os.replace(replacement, model_path(repository, "digits", 1))
        assert await registry.refresh() == ["digits v1: replaced (ready)"]
        assert session() is None, "the old session outlived the swap"
        assert old.state == "closed" and old.batcher is None
    finally:
        gc.enable()
    shutil.rmtree(repository / "digits")
    await registry.refresh()
    await registry.refresh()
    text = metrics.render().decode()
    assert 'model="digits"' not in text, "an unloaded model leaves no metric series behind"
    await registry.close()


async def test_misplaced_files_in_the_repository_are_named_once_in_the_log_not_ignored_in_silence(tmp_path, exported, caplog):
    repository = make_repository(tmp_path / "models", {"digits": exported["digits"]})
    shutil.copyfile(model_path(repository, "digits", 1), repository / "loose.onnx")
    (repository / "flowers").mkdir()
    shutil.copyfile(model_path(repository, "digits", 1), repository / "flowers" / "model.onnx")
    (repository / "digits" / "latest").mkdir()
    (repository / "digits" / "2").mkdir()
    (repository / "digits" / ".3.abc.tmp").mkdir()  # export's staging folder: not a problem
    registry = Registry(Settings(repository=repository, watch_interval_s=0), resolve_device("cpu"), Metrics())
    with caplog.at_level("WARNING", logger="service.registry"):
        registry.load_all()
        registry.start()
        await registry.refresh()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 4, warnings
    text = "\n".join(warnings)
    assert "loose.onnx lies at the top of the repository: put it in NAME/1/model.onnx" in text
    assert "flowers/model.onnx has no version folder: put it in flowers/1/model.onnx" in text
    assert "digits/latest is not a version folder" in text
    assert "digits/2 holds no model.onnx" in text
    assert registry.get("digits").version == 1
    await registry.close()


def write_int8_variant(repository, name: str, calibration: np.ndarray) -> None:
    """model.int8.onnx beside version 1's model.onnx, made and labelled by the export code."""
    import onnx

    from export.repository import attach_metadata
    from export.variants import make_variant
    from kos_core.artifact import ModelMetadata

    proto = onnx.load(str(model_path(repository, name, 1)))
    metadata = ModelMetadata.from_metadata_props({p.key: p.value for p in proto.metadata_props})
    int8 = make_variant("int8", proto, calibration)
    attach_metadata(int8, metadata.model_copy(update={"precision": "int8"}))
    staged = repository / name / "1" / ".int8.tmp"
    onnx.save(int8, str(staged))
    os.replace(staged, model_path(repository, name, 1, "int8"))


async def test_precision_int8_serves_each_versions_int8_file_and_model_onnx_where_there_is_none(
    tmp_path, exported, digits_test_split, caplog
):
    repository = make_repository(tmp_path / "models", {"digits": exported["digits"], "plain": exported["digits"]})
    write_int8_variant(repository, "digits", digits_test_split.x[:64])

    settings = Settings(repository=repository, precision="int8", watch_interval_s=0, max_files_per_request=64)
    app = create_app(settings, resolve_device("cpu"))
    images = digits_test_split.x[:40]
    files = [("files", (f"d{i}.png", png_bytes(image[:, :, 0]), "image/png")) for i, image in enumerate(images)]
    with caplog.at_level("WARNING", logger="service.registry"):
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                served = {m["name"]: m for m in (await client.get("/models")).json()["models"]}
                answers = {}
                for name in ("digits", "plain"):
                    r = await client.post(f"/predict/{name}?top_k=1", files=files)
                    assert r.status_code == 200, r.text
                    answers[name] = [int(p["label"]) for p in r.json()["predictions"]]
    assert (served["digits"]["file"], served["digits"]["precision"]) == ("model.int8.onnx", "int8")
    assert (served["plain"]["file"], served["plain"]["precision"]) == ("model.onnx", "float32")
    assert any("plain v1 has no int8 variant: serving model.onnx" in r.getMessage() for r in caplog.records)
    # The int8 file is a different graph that still classifies: it agrees with float32 and the labels.
    agreement = np.mean(np.array(answers["digits"]) == np.array(answers["plain"]))
    accuracy = np.mean(np.array(answers["digits"]) == digits_test_split.y[:40])
    assert agreement >= 0.9 and accuracy >= 0.9, (agreement, accuracy)


async def test_a_variant_appearing_breaking_or_disappearing_while_serving_is_followed_without_a_reload_loop(
    tmp_path, exported, digits_test_split, caplog
):
    repository = make_repository(tmp_path / "models", {"digits": exported["digits"]})
    registry = Registry(Settings(repository=repository, precision="int8", watch_interval_s=0), resolve_device("cpu"), Metrics())
    registry.load_all()
    registry.start()
    assert registry.get("digits").path.name == "model.onnx"

    write_int8_variant(repository, "digits", digits_test_split.x[:64])
    assert await registry.refresh() == ["digits v1: replaced (ready)"]
    assert (registry.get("digits").path.name, registry.get("digits").precision) == ("model.int8.onnx", "int8")

    broken = repository / "digits" / "1" / ".broken.tmp"
    broken.write_bytes(b"not a model")
    os.replace(broken, model_path(repository, "digits", 1, "int8"))
    with caplog.at_level("WARNING", logger="service.registry"):
        assert await registry.refresh() == ["digits v1: replaced (ready)"]
    assert registry.get("digits").path.name == "model.onnx", "a broken variant falls back to model.onnx"
    assert any("the int8 variant failed to load" in r.getMessage() for r in caplog.records)
    assert await registry.refresh() == [], "the same broken variant is not reloaded every scan"

    model_path(repository, "digits", 1, "int8").unlink()
    assert await registry.refresh() == ["digits v1: replaced (ready)"]
    assert registry.get("digits").path.name == "model.onnx"
    await registry.close()


class CountingSession:
    """An onnxruntime session that counts its runs."""

    def __init__(self, session):
        self.session, self.runs = session, 0

    def run(self, *args, **kwargs):
        self.runs += 1
        return self.session.run(*args, **kwargs)


async def test_a_lone_request_runs_on_the_lone_session_and_a_burst_on_the_batch_session(tmp_path, exported):
    repository = make_repository(tmp_path / "models", {"digits": exported["digits"]})
    settings = Settings(
        repository=repository, intra_op_threads=1, lone_request_threads=2, watch_interval_s=0, max_files_per_request=8
    )
    app = create_app(settings, resolve_device("cpu"))
    async with app.router.lifespan_context(app):
        served = app.state.registry.get("digits")
        lone, batch = CountingSession(served.lone_session), CountingSession(served.session)
        served.lone_session, served.session = lone, batch
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            one = [("files", ("one.png", png_bytes(np.zeros((8, 8), np.uint8)), "image/png"))]
            assert (await client.post("/predict/digits", files=one)).status_code == 200
            assert (lone.runs, batch.runs) == (1, 0)
            assert (await client.post("/predict/digits", files=one * 3)).status_code == 200
            assert lone.runs == 1 and batch.runs >= 1, "several files go through the batcher"


def test_a_lone_session_that_fails_leaves_the_version_serving_on_its_batch_session(monkeypatch, caplog):
    from service import registry as registry_module
    from tests.conftest import BUNDLED_REPOSITORY

    real = registry_module.create_session

    def no_second_session(path, settings, device, intra_op_threads=None, spinning=None):
        if intra_op_threads is not None:
            raise MemoryError("no room for a second session")
        return real(path, settings, device)

    monkeypatch.setattr(registry_module, "create_session", no_second_session)
    settings = Settings(intra_op_threads=1, lone_request_threads=2)
    with caplog.at_level("WARNING", logger="service.registry"):
        served = registry_module.load_model(
            "digits", 1, model_path(BUNDLED_REPOSITORY, "digits", 1), settings, resolve_device("cpu")
        )
    assert served.state == "ready" and served.lone_session is None
    assert "no lone-request session (MemoryError: no room for a second session)" in caplog.text
    one = np.zeros((1, 8, 8, 1), np.uint8)
    np.testing.assert_allclose(served.run_lone(one), served.run(one))


def test_the_openapi_document_shows_the_api_key_schemes_only_when_a_key_is_configured(tmp_path):
    open_app = create_app(Settings(repository=tmp_path), resolve_device("cpu"))
    keyed_app = create_app(Settings(repository=tmp_path, api_key="k"), resolve_device("cpu"))
    assert "securitySchemes" not in open_app.openapi().get("components", {})
    schemes = keyed_app.openapi()["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"apiKey", "http"}
    assert keyed_app.openapi()["paths"]["/predict/{model}"]["post"]["security"]


async def test_a_request_over_its_pixel_budget_is_413_and_a_memory_error_503_and_nothing_runs(tmp_path, exported, monkeypatch):
    repository = make_repository(tmp_path, {"digits": exported["digits"]})
    # Each 100x100 image is within the per-image limit; three of them are over the request's budget.
    settings = Settings(repository=repository, watch_interval_s=0, max_request_pixels=25_000)
    app = create_app(settings, resolve_device("cpu"))
    big = png_bytes(np.zeros((100, 100), np.uint8))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            r = await client.post("/predict/digits", files=[("files", (f"b{i}.png", big, "image/png")) for i in range(3)])
            assert r.status_code == 413 and "25000 pixels per request" in r.json()["detail"], r.text
            import service.dataplane

            def exhausted(*args, **kwargs):
                raise MemoryError

            monkeypatch.setattr(service.dataplane, "decode_image", exhausted)  # what decode_image lets through
            r = await client.post("/predict/digits", files=[("files", ("b.png", big, "image/png"))])
            assert r.status_code == 503 and "ran out of memory" in r.json()["detail"] and "Retry-After" in r.headers
            monkeypatch.undo()
            assert (await client.post("/predict/digits", files=[("files", ("b.png", big, "image/png"))])).status_code == 200
            metrics = (await client.get("/metrics")).text
    assert metric_value(metrics, "kos_images_total", model="digits") == 1, "only the last request ran"


async def test_a_request_that_meets_a_replaced_version_goes_to_the_new_one_and_gives_up_after_three_swaps(
    tmp_path, exported, digits_test_split
):
    import time
    from concurrent.futures import ThreadPoolExecutor

    from service.dataplane import DataPlane, Deadline
    from service.errors import InferenceFailed

    repository = make_repository(tmp_path, {"digits": exported["digits"]})
    settings = Settings(repository=repository, watch_interval_s=0)
    registry = Registry(settings, resolve_device("cpu"), Metrics())
    registry.load_all()
    registry.start()
    fresh = registry.get("digits")
    # A second, real version of the same file whose batcher a swap has closed while a request was on its way.
    replaced = registry._load("digits", 1)
    registry._attach_batcher(replaced)
    await replaced.batcher.close()
    answers = [replaced, fresh]
    registry.get = lambda name, version=None: answers.pop(0) if len(answers) > 1 else answers[0]  # type: ignore[method-assign]
    with ThreadPoolExecutor(2) as pool:
        dataplane = DataPlane(settings, registry, Metrics(), pool)
        images = digits_test_split.x[:3]
        result = await dataplane.classify_tensor("digits", None, images, Deadline(time.monotonic()), "test")
        expected = fresh.run(images)
        np.testing.assert_allclose(result.probabilities, expected, atol=1e-6)
        registry.get = lambda name, version=None: replaced  # type: ignore[method-assign]
        with pytest.raises(InferenceFailed, match="replaced 3 times"):
            await dataplane.classify_tensor("digits", None, images, Deadline(time.monotonic()), "test")
    await replaced.close()
    await registry.close()


async def test_a_failing_repository_scan_is_logged_and_the_next_scan_still_serves_what_was_added(tmp_path, exported, caplog):
    import asyncio
    import contextlib

    repository = make_repository(tmp_path / "models", {"digits": exported["digits"]})
    registry = Registry(Settings(repository=repository, watch_interval_s=0), resolve_device("cpu"), Metrics())
    registry.load_all()
    registry.start()
    real_scan, failures = registry._scan, [OSError("the volume went away for a moment")]

    def flaky_scan():
        if failures:
            raise failures.pop()
        return real_scan()

    registry._scan = flaky_scan  # type: ignore[method-assign]
    make_repository(repository, {"rgb": exported["rgb"]})
    watcher = asyncio.create_task(registry.watch(0.05))
    try:
        for _ in range(200):
            if "rgb" in registry.models and registry.models["rgb"][1].state == "ready":
                break
            await asyncio.sleep(0.05)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    assert "scanning the model repository" in caplog.text and "the volume went away" in caplog.text
    assert registry.get("rgb").state == "ready" and registry.get("digits").state == "ready"
    await registry.close()


def test_fastapis_opentelemetry_is_on_only_where_the_environment_configures_an_exporter(monkeypatch, bundled_repository):
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_LOGS_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(repository=bundled_repository, watch_interval_s=0)
    quiet = create_app(settings, resolve_device("cpu"))
    assert not quiet._native_telemetry.enabled(), "no exporter configured: FastAPI records nothing and asks nothing"
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not create_app(settings, resolve_device("cpu"))._telemetry["tracing"], "'none' configures no exporter"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    traced = create_app(settings, resolve_device("cpu"))
    assert traced._telemetry["tracing"] and traced._telemetry["metrics"] and traced._telemetry["logs"]
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not create_app(settings, resolve_device("cpu"))._telemetry["tracing"], "OTEL_SDK_DISABLED wins"
