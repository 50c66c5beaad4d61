"""The whole path on a real server: PNG uploads of held-out digits to a uvicorn on a free port."""

from __future__ import annotations

import httpx
import numpy as np

from kos_core.layout import model_path
from tests.conftest import onnx_predict


def _upload(paths):
    return [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]


def test_server_labels_every_held_out_digit_png_like_the_model_does(
    bundled_server, digit_pngs, digits_test_split, bundled_repository
):
    expected = onnx_predict(model_path(bundled_repository, "digits", 1), digits_test_split.x).argmax(1)
    got = []
    for start in range(0, len(digit_pngs), 50):
        chunk = digit_pngs[start : start + 50]
        r = httpx.post(f"{bundled_server.url}/predict/digits", files=_upload(p for p, _ in chunk), timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "digits" and body["version"] == 1
        # Answers come back in upload order, one per file.
        assert [p["filename"] for p in body["predictions"]] == [p.name for p, _ in chunk]
        got += [int(p["label"]) for p in body["predictions"]]
    truth = np.array([label for _, label in digit_pngs])
    assert np.array_equal(np.array(got), expected)
    assert (np.array(got) == truth).mean() >= 0.97


def test_prediction_has_top_k_sorted_and_capped_at_the_number_of_classes(bundled_server, digit_pngs):
    path, label = digit_pngs[0]
    r = httpx.post(f"{bundled_server.url}/predict/digits?top_k=50", files=_upload([path]), timeout=30)
    assert r.status_code == 200, r.text
    (prediction,) = r.json()["predictions"]
    top = prediction["top_k"]
    assert len(top) == 10
    assert [t["probability"] for t in top] == sorted((t["probability"] for t in top), reverse=True)
    assert prediction["label"] == top[0]["label"] == str(top[0]["index"])
    assert abs(sum(t["probability"] for t in top) - 1) < 1e-4
    r = httpx.post(f"{bundled_server.url}/predict/digits?top_k=2", files=_upload([path]), timeout=30)
    assert len(r.json()["predictions"][0]["top_k"]) == 2


def test_health_says_ready_and_names_the_provider_it_runs_on(bundled_server):
    r = httpx.get(f"{bundled_server.url}/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ready"
    (model,) = body["models"]
    assert model["name"] == "digits" and model["version"] == 1 and model["state"] == "ready"
    assert model["providers"] == ["CPUExecutionProvider"]  # no GPU on this machine: the fall-back is visible
    assert httpx.head(f"{bundled_server.url}/health").status_code == 200


def test_swagger_ui_and_openapi_document_the_routes(bundled_server):
    docs = httpx.get(f"{bundled_server.url}/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text.lower()
    spec = httpx.get(f"{bundled_server.url}/openapi.json").json()
    assert {"/predict/{model}", "/health", "/models", "/models/{model}"} <= set(spec["paths"])
    assert {"404", "415", "422"} <= set(spec["paths"]["/predict/{model}"]["post"]["responses"])


def test_models_lists_the_bundled_model_with_its_labels(bundled_server):
    body = httpx.get(f"{bundled_server.url}/models").json()
    (info,) = body["models"]
    assert info["name"] == "digits" and info["input_shape"] == [8, 8, 1] and len(info["labels"]) == 10
    assert info["metrics"]["test_accuracy"] >= 0.97


def test_bad_requests_get_json_4xx_and_leave_the_service_healthy(bundled_server, digit_pngs):
    png, _ = digit_pngs[0]
    url = bundled_server.url
    r = httpx.post(f"{url}/predict/cats", files=_upload([png]))
    assert r.status_code == 404 and "cats" in r.json()["detail"]
    r = httpx.post(f"{url}/predict/digits?version=7", files=_upload([png]))
    assert r.status_code == 404 and "version 7" in r.json()["detail"]
    r = httpx.post(f"{url}/predict/digits", files=[("files", ("notes.txt", b"not an image", "text/plain"))])
    assert r.status_code == 415 and "notes.txt" in r.json()["detail"]
    r = httpx.post(f"{url}/predict/digits", data={"x": "1"})
    assert r.status_code == 422 and r.json()["detail"]
    r = httpx.post(f"{url}/predict/digits?top_k=0", files=_upload([png]))
    assert r.status_code == 422
    r = httpx.post(f"{url}/predict/digits", files=[("files", (None, png.read_bytes()))])  # a part with no filename
    assert r.status_code == 422 and "is a text field, not a file" in r.json()["detail"]
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.post(f"{url}/predict/digits", files=_upload([png])).status_code == 200


def test_the_readme_example_images_are_classified_as_their_names_say(bundled_server):
    from tests.conftest import ROOT

    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    paths = [ROOT / "examples" / "digits" / f"{name}.png" for name in names]
    r = httpx.post(f"{bundled_server.url}/predict/digits?top_k=3", files=_upload(paths), timeout=30)
    assert r.status_code == 200, r.text
    assert [p["label"] for p in r.json()["predictions"]] == [str(i) for i in range(10)]
