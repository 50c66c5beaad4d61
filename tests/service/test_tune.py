"""Automatic runtime settings per model, and `python -m service tune`, which measures a model and writes its settings file."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

import httpx
import pytest

from kos_core.layout import model_path
from service.app import create_app
from service.auto_settings import HEAVY_MS_PER_IMAGE, choose
from service.registry import load_model
from service.runtime import resolve_device
from service.settings import Settings
from tests.conftest import ROOT
from tests.service.conftest import BUNDLED_REPOSITORY, make_repository

CHEAP, COSTLY = HEAVY_MS_PER_IMAGE / 10, HEAVY_MS_PER_IMAGE * 5


def runtime(settings: Settings) -> tuple[object, object, object]:
    return settings.intra_op_threads, settings.inference_workers, settings.lone_request_threads


@pytest.mark.parametrize("cpus", [2, 16])
def test_a_cheap_model_runs_one_batch_at_a_time_on_every_core(cpus):
    choice = choose(Settings(), cpus, cuda=False, cost_ms=CHEAP)
    assert runtime(choice.settings) == (cpus, 1, 0)
    assert "below" in choice.reason


@pytest.mark.parametrize("cpus", [2, 16])
def test_a_costly_model_runs_one_thread_batches_side_by_side_and_lone_requests_on_every_core(cpus):
    assert runtime(choose(Settings(), cpus, cuda=False, cost_ms=COSTLY).settings) == (1, cpus, cpus)


def test_one_core_and_cuda_get_one_session_and_one_batch_at_a_time():
    assert runtime(choose(Settings(), 1, cuda=False, cost_ms=COSTLY).settings) == (1, 1, 0)
    assert runtime(choose(Settings(), 16, cuda=True, cost_ms=COSTLY).settings) == (16, 1, 0)


def test_explicit_values_win_and_the_rest_fits_around_them():
    # Two threads per batch on eight cores: four batches side by side, and a lone session with every core.
    assert runtime(choose(Settings(intra_op_threads=2), 8, cuda=False, cost_ms=COSTLY).settings) == (2, 4, 8)
    assert runtime(choose(Settings(inference_workers=2), 8, cuda=False, cost_ms=COSTLY).settings) == (4, 2, 8)
    assert runtime(choose(Settings(lone_request_threads=0), 8, cuda=False, cost_ms=COSTLY).settings) == (1, 8, 0)
    explicit = Settings(intra_op_threads=3, inference_workers=5, lone_request_threads=7)
    assert runtime(choose(explicit, 8, cuda=False, cost_ms=COSTLY).settings) == (3, 5, 7)


def test_auto_settings_are_resolved_at_load_and_the_numbers_are_what_models_shows(tmp_path):
    settings = Settings(repository=make_repository(tmp_path, {"digits": model_path(BUNDLED_REPOSITORY, "digits", 1)}))
    assert runtime(settings) == ("auto", "auto", "auto")
    served = load_model("digits", 1, model_path(settings.repository, "digits", 1), settings, resolve_device("cpu"))
    assert served.state == "ready" and served.ms_per_image is not None and served.ms_per_image > 0
    threads, workers, lone = runtime(served.settings)
    assert all(isinstance(v, int) for v in (threads, workers, lone))
    assert served.session.get_session_options().intra_op_num_threads == threads
    assert (served.lone_session is not None) == (lone > 0)


def tune(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service", "tune", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)


async def test_tune_writes_the_model_s_settings_file_keeping_other_keys_and_the_service_serves_them(tmp_path):
    repository = make_repository(tmp_path, {"digits": model_path(BUNDLED_REPOSITORY, "digits", 1)})
    settings_file = repository / "digits" / "settings.toml"
    settings_file.write_text("# deadline agreed with the client team\nrequest_timeout_s = 7.5\n")
    result = tune("digits", "--repository", str(repository), "--budget-s", "2", "--latency-ms", "500")
    assert result.returncode == 0, result.stderr
    assert "[1/" in result.stdout and "before" in result.stdout and "after" in result.stdout
    written = tomllib.loads(settings_file.read_text())
    assert "# deadline agreed with the client team" in settings_file.read_text()
    assert written["request_timeout_s"] == 7.5
    tuned = {k: written[k] for k in ("max_batch_size", "intra_op_threads", "inference_workers", "lone_request_threads")}
    assert tuned["max_batch_size"] in (1, 8, 32) and tuned["intra_op_threads"] >= 1 and tuned["inference_workers"] >= 1

    app = create_app(Settings(repository=repository, watch_interval_s=0), resolve_device("cpu"))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            (model,) = (await client.get("/models")).json()["models"]
    assert {k: model["settings"][k] for k in tuned} == tuned
    assert set(model["settings_from_file"]) == {*tuned, "request_timeout_s"}


def test_tune_refuses_an_unknown_model_and_lists_the_known_ones(tmp_path):
    repository = make_repository(tmp_path, {"digits": model_path(BUNDLED_REPOSITORY, "digits", 1)})
    result = tune("cats", "--repository", str(repository), "--budget-s", "1")
    assert result.returncode == 2
    assert "no model 'cats'" in result.stderr and "models there: digits" in result.stderr
    assert "Traceback" not in result.stderr


def test_tune_refuses_a_folder_it_cannot_write_before_measuring(tmp_path):
    folder = make_repository(tmp_path, {"digits": model_path(BUNDLED_REPOSITORY, "digits", 1)}) / "digits"
    if os.geteuid() == 0:
        # Permissions do not hold root back; an immutable folder does.
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("running as root where chattr cannot make a folder immutable")
    else:
        folder.chmod(0o555)
    try:
        result = tune(str(folder), "--budget-s", "1")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)
    assert result.returncode == 2
    assert f"cannot write {folder / 'settings.toml'}" in result.stderr and "[1/" not in result.stdout
    assert not (folder / "settings.toml").exists()
