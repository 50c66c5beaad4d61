"""Per-model settings: a settings.toml beside a model's versions overrides the service's defaults for that model."""

from __future__ import annotations

import os

import httpx
import pytest

from service.app import create_app
from service.metrics import Metrics
from service.model_settings import MODEL_FIELDS, ModelSettingsError, model_settings, read_overrides
from service.registry import Registry
from service.runtime import resolve_device
from service.settings import Settings
from tests.service.conftest import make_repository, metric_value, png_bytes


def _write(path, text: str) -> None:
    # Written beside and renamed into place, as an operator's tooling should, so a scan never reads half a file.
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    os.replace(partial, path)


async def test_a_models_settings_file_sets_its_batches_and_deadline_and_models_shows_them(tmp_path, exported, digits_test_split):
    repository = make_repository(tmp_path, {"digits": exported["digits"], "rgb": exported["rgb"]})
    _write(repository / "digits" / "settings.toml", "max_batch_size = 2\nrequest_timeout_s = 7.5\nqueue_size = 128\n")
    settings = Settings(repository=repository, max_batch_size=16, watch_interval_s=0, max_files_per_request=10)
    app = create_app(settings, resolve_device("cpu"))
    files = [("files", (f"d{i}.png", png_bytes(image[:, :, 0]), "image/png")) for i, image in enumerate(digits_test_split.x[:6])]
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            models = {m["name"]: m for m in (await client.get("/models")).json()["models"]}
            r = await client.post("/predict/digits?top_k=1", files=files)
            assert r.status_code == 200, r.text
            metrics = (await client.get("/metrics")).text
        digits = app.state.registry.get("digits")
        assert digits.batcher.max_batch_size == 2 and digits.batcher.queue_size == 128
        assert app.state.registry.get("rgb").batcher.max_batch_size == 16, "another model keeps the service's setting"
    assert models["digits"]["settings"]["max_batch_size"] == 2
    assert models["digits"]["settings"]["request_timeout_s"] == 7.5
    assert models["digits"]["settings_from_file"] == ["max_batch_size", "queue_size", "request_timeout_s"]
    assert models["rgb"]["settings"]["max_batch_size"] == 16 and models["rgb"]["settings_from_file"] == []
    # Six images with batches of at most two: at least three batches ran.
    assert metric_value(metrics, "kos_batch_size_count", model="digits") >= 3


async def test_an_invalid_settings_file_fails_that_model_alone_with_a_message_naming_the_file(tmp_path, exported):
    repository = make_repository(tmp_path, {"digits": exported["digits"], "rgb": exported["rgb"]})
    _write(repository / "rgb" / "settings.toml", "max_batch_sise = 8\n")
    registry = Registry(Settings(repository=repository, watch_interval_s=0), resolve_device("cpu"), Metrics())
    registry.load_all()
    registry.start()
    failed = registry.models["rgb"][1]
    assert failed.state == "failed"
    assert "rgb/settings.toml" in failed.error and "max_batch_sise" in failed.error and "max_batch_size" in failed.error
    assert registry.get("digits").state == "ready", "the other models are served"
    await registry.close()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("max_batch_size = 0\n", "max_batch_size"),
        ("max_batch_size = 'many'\n", "max_batch_size"),
        ("queue_size = 8\n", "max_files_per_request (64) must not exceed queue_size (8)"),
        ("precision = 'int4'\n", "precision"),
        ("max_batch_size = \n", "not valid TOML"),
    ],
)
def test_values_the_service_would_refuse_are_refused_per_model_with_the_same_rules(tmp_path, text, expected):
    path = tmp_path / "digits" / "settings.toml"
    path.parent.mkdir()
    path.write_text(text)
    with pytest.raises(ModelSettingsError, match="digits/settings.toml") as caught:
        model_settings(Settings(), read_overrides(path), "digits/settings.toml")
    assert expected in str(caught.value)


def test_no_settings_file_means_the_services_settings_and_every_model_field_is_a_service_setting(tmp_path):
    settings = Settings()
    assert read_overrides(tmp_path / "absent.toml") == {}
    assert model_settings(settings, {}, "x") is settings
    assert set(MODEL_FIELDS) <= set(Settings.model_fields)


async def test_a_changed_settings_file_reloads_the_model_while_it_serves(tmp_path, exported):
    repository = make_repository(tmp_path, {"digits": exported["digits"]})
    registry = Registry(Settings(repository=repository, watch_interval_s=0), resolve_device("cpu"), Metrics())
    registry.load_all()
    registry.start()
    assert registry.get("digits").batcher.max_batch_size == 32
    _write(repository / "digits" / "settings.toml", "max_batch_size = 4\n")
    assert await registry.refresh() == ["digits v1: replaced (ready)"]
    assert registry.get("digits").batcher.max_batch_size == 4
    # A broken edit while it serves is refused; the working settings go on serving.
    _write(repository / "digits" / "settings.toml", "max_batch_size = -1\n")
    changes = await registry.refresh()
    assert len(changes) == 1 and "replacement refused" in changes[0] and "max_batch_size" in changes[0]
    assert registry.get("digits").batcher.max_batch_size == 4
    (repository / "digits" / "settings.toml").unlink()
    assert await registry.refresh() == ["digits v1: replaced (ready)"]
    assert registry.get("digits").batcher.max_batch_size == 32, "without the file the service's setting is back"
    await registry.close()


def test_a_clients_own_deadline_can_only_shorten_the_models_timeout():
    from service.dataplane import Deadline

    assert Deadline(100.0).at(7.5) == 107.5, "the model's timeout from the request's arrival"
    assert Deadline(100.0, client=101.0).at(60.0) == 101.0, "a longer model timeout does not stretch the client's"
    assert Deadline(100.0, client=200.0).at(5.0) == 105.0, "nor does a client's longer one stretch the model's"
