"""The offline tools and the server together: train tiny, export, serve, predict."""

from __future__ import annotations

import subprocess
import sys

import httpx

from kos_core.layout import list_versions
from tests.conftest import ROOT


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_a_run_trained_and_exported_by_the_cli_is_served(tmp_path, start_server, digit_pngs):
    run_dir, repository = tmp_path / "run", tmp_path / "models"
    trained = _run(
        "-m", "training", "train", "--model", "digits_cnn", "--dataset", "digits", "--epochs", "3", "--run-dir", str(run_dir)
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    exported = _run("-m", "export", str(run_dir), "--name", "tiny", "--repository", str(repository))
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "parity" in exported.stdout
    assert list_versions(repository, "tiny") == [1]
    again = _run("-m", "export", str(run_dir), "--name", "tiny", "--repository", str(repository))
    assert again.returncode == 0, again.stderr[-3000:]
    assert list_versions(repository, "tiny") == [1, 2]
    assert not [p for p in (repository / "tiny").iterdir() if p.name.startswith(".")]

    server = start_server(repository)
    png, _ = digit_pngs[0]
    r = httpx.post(f"{server.url}/predict/tiny", files=[("files", (png.name, png.read_bytes(), "image/png"))], timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 2
    r = httpx.post(
        f"{server.url}/predict/tiny?version=1", files=[("files", (png.name, png.read_bytes(), "image/png"))], timeout=30
    )
    assert r.json()["version"] == 1


def test_export_of_a_folder_that_is_not_a_run_is_refused(tmp_path):
    result = _run("-m", "export", str(tmp_path), "--name", "x", "--repository", str(tmp_path / "models"))
    assert result.returncode != 0
    assert "not a training run folder" in result.stderr
    assert not (tmp_path / "models").exists()
