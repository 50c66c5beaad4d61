"""Shared fixtures: the bundled repository, real digit images, and a real uvicorn server on a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_REPOSITORY = ROOT / "models"

# The slow tier, by what it needs: containers, a browser, a load balancer, TensorFlow training and
# export, several service processes, floods and rendered manifests. `make test` runs everything;
# `make test-fast` (pytest -m "not slow") the rest, in about a minute.
SLOW_TESTS = (
    "tests/browser/",
    "tests/deploy/",
    "tests/export/",
    "tests/training/",
    "tests/test_containers.py",
    "tests/test_serve_bench.py",
    "tests/test_train_export_serve.py",
    "tests/service/test_frontends.py",
    "tests/service/test_frontend_readiness.py",
    "tests/service/test_lifecycle.py",
    "tests/service/test_rolling.py",
    "tests/service/test_server.py",
    "tests/service/test_v2_load.py",
    "tests/service/test_v2_overload.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        where = item.path.relative_to(ROOT).as_posix()
        if where.startswith(SLOW_TESTS):
            item.add_marker(pytest.mark.slow)


# An app a test builds in-process from Settings() serves no gRPC unless the test asks for a port:
# at the default 8001, two test runs on one machine would fight over it. A flag wins over this.
os.environ.setdefault("KOS_GRPC_PORT", "0")


@pytest.fixture(scope="session")
def bundled_repository() -> Path:
    return BUNDLED_REPOSITORY


@pytest.fixture(scope="session")
def digits_test_split():
    """The held-out split the bundled model never saw in training (same loader and seed as `make models`)."""
    from training.datasets import load_digits

    return load_digits(seed=0).test


@pytest.fixture(scope="session")
def digit_pngs(tmp_path_factory, digits_test_split) -> list[tuple[Path, int]]:
    """The held-out digits rendered as real PNG files, with their true labels."""
    folder = tmp_path_factory.mktemp("digit_pngs")
    files = []
    for i, (image, label) in enumerate(zip(digits_test_split.x, digits_test_split.y)):
        path = folder / f"test{i:03d}_label{label}.png"
        Image.fromarray(image[:, :, 0], mode="L").save(path)
        files.append((path, int(label)))
    return files


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (they are scripts, not a package)."""
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`python -m service` in a subprocess, as a user starts it."""

    def __init__(self, repository: Path, extra_args: list[str], env: dict[str, str] | None = None, port: int | None = None):
        # A given port: a new process in the place of one that exited, as a restarted replica.
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Its own free gRPC port (the Open Inference Protocol); a --grpc-port in extra_args wins.
        self.grpc_port = free_port()
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self._log = tempfile.NamedTemporaryFile(prefix=f"service-{self.port}-", suffix=".log", delete=False)
        self.log_path = Path(self._log.name)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service",
                "--port",
                str(self.port),
                "--grpc-port",
                str(self.grpc_port),
                "--repository",
                str(repository),
                *extra_args,
            ],
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def wait_until_listening(self, timeout: float = 60) -> None:
        """Wait until the port is open and the models found at start-up are loaded (ready or failed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited with {self.process.returncode}:\n{self.log()}")
            try:
                # The port opens before models load; /health says "loading" until they are done.
                if httpx.get(self.url + "/health", timeout=1).json().get("status") != "loading":
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"service did not finish starting within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        self.log_path.unlink(missing_ok=True)
        return self.process.returncode


@pytest.fixture
def start_server(tmp_path) -> Iterator[Callable[..., LiveServer]]:
    """Start a real service on a free loopback port; every one started is stopped after the test."""
    started: list[LiveServer] = []

    def start(repository: Path, *extra_args: str, env: dict[str, str] | None = None) -> LiveServer:
        server = LiveServer(Path(repository), list(extra_args), env)
        started.append(server)
        server.wait_until_listening()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def bundled_server(tmp_path_factory) -> Iterator[LiveServer]:
    """One real service over the bundled repository, shared by a module's tests."""
    server = LiveServer(BUNDLED_REPOSITORY, [])
    try:
        server.wait_until_listening()
        yield server
    finally:
        server.stop()


def onnx_predict(model_file: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"image": images})[0]
