"""How the serving benchmark turns its in-process search (service/measure.py) into the service's flags, and makes its models."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from service.measure import Setting as Ceiling
from service.measure import service_setting
from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("serve_bench", ROOT / "benchmarks" / "serve_bench.py")
serve_bench = importlib.util.module_from_spec(_spec)
sys.modules["serve_bench"] = serve_bench  # its dataclasses look their module up while being defined
_spec.loader.exec_module(serve_bench)


def flags(args: list[str]) -> dict[str, str]:
    return dict(zip(args[::2], args[1::2]))


@pytest.mark.parametrize("cores", [2, 8])
def test_the_service_takes_one_thread_batches_side_by_side_when_they_are_as_fast_as_the_best(cores):
    tried = [
        Ceiling(200.0, 1, cores, True, 1),  # the best, by a noise-sized margin
        Ceiling(194.0, 1, 1, True, 2),
        Ceiling(193.0, 8, 1, False, 2),
        Ceiling(160.0, 32, 1, False, 2),  # too slow: not taken for being the largest batch
    ]
    chosen = flags(service_setting(tried[0], tried, cpus=cores))
    assert chosen["--intra-op-threads"] == "1" and chosen["--inference-workers"] == "2"
    assert chosen["--max-batch-size"] == "8"
    assert "--intra-op-spinning" not in chosen  # the service's default, off
    assert chosen["--lone-request-threads"] == str(cores)


@pytest.mark.parametrize("cores", [2, 8])
def test_a_clearly_best_setting_is_served_as_it_is(cores):
    best = Ceiling(300.0, 32, cores, True, 1)
    tried = [best, Ceiling(200.0, 1, 1, False, 2), Ceiling(250.0, 8, cores, False, 1)]
    chosen = flags(service_setting(best, tried, cpus=cores))
    # Every runtime setting is given, the lone-request session's absence too: the service's default is "auto".
    assert chosen == {
        "--max-batch-size": "32",
        "--intra-op-threads": str(cores),
        "--inference-workers": "1",
        "--lone-request-threads": "0",
    }


@pytest.mark.parametrize(("name", "architecture"), [("mobilenet", "mobilenet_v2"), ("cifar10", "cifar10_cnn")])
def test_the_benchmark_s_zoo_models_are_trained_and_exported_by_the_command_lines(tmp_path, name, architecture):
    from export.card import read_metadata

    path = serve_bench.build_zoo_model(name, tmp_path, side=32)  # the benchmark's own commands, at a test's size
    meta = read_metadata(path)
    assert meta.architecture == architecture and meta.dataset == "generated" and meta.input_shape == (32, 32, 3)
    assert meta.source_run == str(tmp_path / f"{name}-run") and len(meta.labels) == 10
    # Parity-checked like any export: agreement held, and the card's verdict says whether it proved anything.
    assert meta.parity["agreed"] is True and meta.parity["images"] == 30
    assert meta.parity["verdict"] in ("passed", "inconclusive: the model's output does not depend on its input")
    assert meta.parity["passed"] is (meta.parity["verdict"] == "passed"), "passed is the verdict, not the agreement alone"


def test_the_naive_endpoint_answers_alike_with_either_decoder(tmp_path):
    from fastapi.testclient import TestClient

    _naive = importlib.util.spec_from_file_location("naive_server", ROOT / "benchmarks" / "naive_server.py")
    naive_server = importlib.util.module_from_spec(_naive)
    _naive.loader.exec_module(naive_server)
    model = ROOT / "models" / "digits" / "1" / "model.onnx"
    jpegs = serve_bench.make_jpegs("digits", tmp_path, 4)
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in jpegs]
    answers = []
    for pillow in (False, True):
        with TestClient(naive_server.create_naive_app(model, 1, pillow=pillow)) as client:
            response = client.post("/predict/digits", files=files)
            assert response.status_code == 200
            answers.append(response.json()["predictions"])
    assert answers[0] == answers[1] and len(answers[0]) == 4
