"""Devices: the real onnxruntime-gpu here lists CUDA but cannot start it (no CUDA libraries, no GPU)."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from service.runtime import (
    CPU,
    CUDA,
    Device,
    DeviceUnavailable,
    gpu_present,
    pad_size,
    padded_sizes,
    resolve_device,
    warmup_batch_sizes,
)


def test_auto_falls_back_to_cpu_and_says_why(no_working_cuda):
    device = resolve_device("auto")
    assert device.providers == (CPU,)
    assert "serving on CPU because" in device.reason and "CUDA" in device.reason


def test_auto_on_a_machine_without_a_gpu_says_why_at_info_level(no_working_cuda, monkeypatch, caplog):
    from service.settings import Settings
    from service.startup import prepare_process

    assert not gpu_present(), "this test pins down a machine without an NVIDIA GPU"
    device = resolve_device("auto")
    assert not device.worrying and "no NVIDIA GPU" in device.reason and "CUDA" in device.reason
    monkeypatch.setattr("service.startup.resolve_device", lambda _: device)
    with caplog.at_level("INFO", logger="service.startup"):
        prepare_process(Settings(watch_interval_s=0))
    said = [r for r in caplog.records if "serving on CPU because" in r.getMessage()]
    assert [r.levelname for r in said] == ["INFO"]
    # Which decoder serves plain JPEGs, checked before the first request.
    assert "plain JPEGs decode with libjpeg-turbo through simplejpeg" in caplog.text


def test_auto_with_a_gpu_that_cuda_cannot_use_warns(no_working_cuda, monkeypatch, caplog, tmp_path):
    from service.settings import Settings
    from service.startup import prepare_process

    (tmp_path / "nvidia0").touch()
    assert gpu_present(tmp_path)
    monkeypatch.setattr("service.runtime.gpu_present", lambda: True)  # a GPU node, as a broken driver leaves it
    device = resolve_device("auto")
    assert device.worrying and "no NVIDIA GPU" not in device.reason
    monkeypatch.setattr("service.startup.resolve_device", lambda _: device)
    with caplog.at_level("INFO", logger="service.startup"):
        prepare_process(Settings(watch_interval_s=0))
    said = [r for r in caplog.records if "serving on CPU because" in r.getMessage()]
    assert [r.levelname for r in said] == ["WARNING"]


def test_cuda_is_refused_when_a_session_cannot_really_run_on_it(no_working_cuda):
    assert CUDA in ort.get_available_providers()  # listed, yet unusable: the silent fall-back case
    with pytest.raises(DeviceUnavailable, match="device=cuda but onnxruntime could not start CUDA"):
        resolve_device("cuda")


def test_cpu_never_probes_cuda():
    assert resolve_device("cpu") == Device((CPU,), "device=cpu")


def test_on_cuda_every_padded_batch_size_is_warmed_and_on_cpu_the_smallest_and_largest():
    # A GPU cannot exist here: these Device values stand in for what resolve_device returns on one.
    cuda = Device((CUDA, CPU), "device=cuda: CUDA works")
    cpu = Device((CPU,), "device=cpu")
    assert padded_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert padded_sizes(24) == [1, 2, 4, 8, 16, 24]
    assert warmup_batch_sizes(24, cuda) == [1, 2, 4, 8, 16, 24]
    assert warmup_batch_sizes(24, cpu) == [1, 24]
    assert [pad_size(n, 24) for n in (1, 3, 5, 16, 17, 24)] == [1, 4, 8, 16, 24, 24]


def test_a_lone_request_session_gets_its_own_thread_count_and_gives_the_same_answers():
    import numpy as np

    from kos_core.layout import model_path
    from service.registry import load_model
    from service.settings import Settings
    from tests.conftest import BUNDLED_REPOSITORY

    path = model_path(BUNDLED_REPOSITORY, "digits", 1)
    cpu = Device((CPU,), "device=cpu")
    served = load_model("digits", 1, path, Settings(intra_op_threads=1, lone_request_threads=2), cpu)
    assert served.state == "ready", served.error
    assert served.session.get_session_options().intra_op_num_threads == 1
    assert served.lone_session.get_session_options().intra_op_num_threads == 2
    one = np.random.default_rng(0).integers(0, 200, (1, 8, 8, 1), dtype=np.uint8)
    np.testing.assert_allclose(served.run_lone(one), served.run(one), atol=1e-6)

    plain = load_model("digits", 1, path, Settings(intra_op_threads=1), cpu)
    assert plain.lone_session is None
    np.testing.assert_allclose(plain.run_lone(one), served.run(one), atol=1e-6)
