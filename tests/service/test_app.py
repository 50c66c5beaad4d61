"""The application factory in-process: an app built from its own settings, its lifespan run by the test."""

from __future__ import annotations

import os
import shutil

import httpx
import numpy as np
import pytest

from service.app import create_app
from service.artifact import model_path
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
    served = app.state.registry.get("digits")
    assert served.batcher is not None and served.batcher._closing, "the lifespan's end closes the batchers"
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


async def test_precision_int8_serves_each_versions_int8_file_and_model_onnx_where_there_is_none(
    tmp_path, exported, digits_test_split, caplog
):
    import onnx

    from export.repository import attach_metadata
    from export.variants import make_variant
    from service.artifact import ModelMetadata

    repository = make_repository(tmp_path / "models", {"digits": exported["digits"], "plain": exported["digits"]})
    proto = onnx.load(str(exported["digits"]))
    metadata = ModelMetadata.from_metadata_props({p.key: p.value for p in proto.metadata_props})
    int8 = make_variant("int8", proto, digits_test_split.x[:64])
    attach_metadata(int8, metadata.model_copy(update={"precision": "int8"}))
    onnx.save(int8, str(model_path(repository, "digits", 1, "int8")))

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
