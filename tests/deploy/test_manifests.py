"""The Kubernetes and KServe manifests in deploy/: rendered as a user applies them, validated
against the Kubernetes and KServe schemas with unknown fields refused, and consistent with the
service's settings, routes and shutdown (docs/deployment.md, "Kubernetes and KServe")."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest

from service.settings import Settings
from tests.deploy.manifests import (
    DEPLOY,
    KSERVE_GROUP,
    KUBERNETES_VERSIONS,
    Manifest,
    image_tag,
    load_file,
    one,
    render,
    renderer,
    validate,
    validate_builtin,
    validate_kserve,
)

OVERLAYS = ("cpu", "gpu", "object-storage")
KSERVE_EXAMPLES = sorted((DEPLOY / "kserve" / "examples").glob("*.yaml"))
IMAGE = "ghcr.io/keras-onnx-serve/keras-onnx-serve"
LIVENESS_ROUTES = {"/livez", "/v2/health/live"}
READINESS_ROUTES = {"/health", "/v2/health/ready"}

needs_renderer = pytest.mark.skipif(
    renderer() is None, reason="no kustomize v5 (kubectl kustomize): run scripts/install-kustomize.sh"
)


@pytest.fixture(scope="module")
def overlays() -> dict[str, list[Manifest]]:
    if renderer() is None:
        pytest.skip("no kustomize v5 (kubectl kustomize): run scripts/install-kustomize.sh")
    return {name: render(DEPLOY / "kubernetes" / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(scope="module")
def runtimes() -> list[Manifest]:
    if renderer() is None:
        pytest.skip("no kustomize v5 (kubectl kustomize): run scripts/install-kustomize.sh")
    return render(DEPLOY / "kserve" / "runtimes")


def examples() -> list[Manifest]:
    return [doc for path in KSERVE_EXAMPLES for doc in load_file(path)]


def container(pod_spec: dict, name: str) -> dict:
    found = [c for c in pod_spec["containers"] if c["name"] == name]
    assert len(found) == 1, f"no container {name}"
    return found[0]


def settings_env(manifests: list[Manifest]) -> dict[str, str]:
    deployment = one(manifests, "Deployment", "keras-onnx-serve")
    service = container(deployment["spec"]["template"]["spec"], "keras-onnx-serve")
    (ref,) = [source["configMapRef"]["name"] for source in service["envFrom"]]
    return one(manifests, "ConfigMap", ref)["data"]


def runtime_env(runtime: Manifest) -> dict[str, str]:
    kserve = container(runtime["spec"], "kserve-container")
    env = {item["name"]: item["value"] for item in kserve.get("env", [])}
    for arg in kserve["args"]:
        flag, _, value = arg.removeprefix("--").partition("=")
        env["KOS_" + flag.replace("-", "_").upper()] = value
    return env


# --- everything is rendered and validated --------------------------------------------------------


def test_every_kustomization_under_deploy_is_rendered_by_these_tests():
    folders = {path.parent.relative_to(DEPLOY) for path in DEPLOY.rglob("kustomization.yaml")}
    covered = {Path("kubernetes/base"), Path("kserve/runtimes")} | {Path("kubernetes/overlays") / o for o in OVERLAYS}
    assert folders == covered


@needs_renderer
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_renders_to_built_in_kinds_that_validate_strictly(overlays, overlay):
    kinds = sorted(m["kind"] for m in overlays[overlay])
    expected = {"ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"}
    assert expected <= set(kinds)
    for manifest in overlays[overlay]:
        assert manifest["apiVersion"].split("/")[0] != KSERVE_GROUP
        validate(manifest)


@needs_renderer
def test_the_serving_runtimes_validate_against_kserves_crd(runtimes):
    assert sorted(m["metadata"]["name"] for m in runtimes) == ["keras-onnx-serve", "keras-onnx-serve-gpu"]
    for runtime in runtimes:
        assert runtime["kind"] == "ClusterServingRuntime"
        validate(runtime)


@pytest.mark.parametrize("path", KSERVE_EXAMPLES, ids=lambda p: p.stem)
def test_each_inference_service_example_validates_against_kserves_crd(path):
    (manifest,) = load_file(path)
    assert manifest["kind"] == "InferenceService"
    validate(manifest)


def test_there_is_an_example_for_each_mode_and_device():
    assert [p.stem for p in KSERVE_EXAMPLES] == ["knative-cpu", "knative-gpu", "standard-cpu", "standard-gpu"]


# --- validation does catch mistakes --------------------------------------------------------------


@needs_renderer
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_a_misspelled_key_in_a_deployment_fails_validation(overlays, version):
    deployment = copy.deepcopy(one(overlays["cpu"], "Deployment"))
    service = deployment["spec"]["template"]["spec"]["containers"][0]
    service["readynessProbe"] = service.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readynessProbe"):
        validate_builtin(deployment, version)


@needs_renderer
def test_a_wrong_type_in_a_pod_disruption_budget_fails_validation(overlays):
    budget = copy.deepcopy(one(overlays["cpu"], "PodDisruptionBudget"))
    budget["spec"]["selector"] = "app=keras-onnx-serve"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_builtin(budget, KUBERNETES_VERSIONS[-1])


def test_a_misspelled_key_in_an_inference_service_fails_only_with_strict_fields():
    (service,) = load_file(DEPLOY / "kserve" / "examples" / "standard-cpu.yaml")
    broken = copy.deepcopy(service)
    broken["spec"]["predictor"]["model"]["storageURI"] = broken["spec"]["predictor"]["model"].pop("storageUri")
    # KServe's CRD as shipped lets it through (the API server would drop it silently) ...
    validate_kserve(broken, strict_fields=False)
    # ... the strict copy refuses it.
    with pytest.raises(jsonschema.ValidationError, match="storageURI"):
        validate_kserve(broken)


@needs_renderer
def test_a_misspelled_key_in_a_serving_runtime_fails_validation(runtimes):
    runtime = copy.deepcopy(one(runtimes, "ClusterServingRuntime", "keras-onnx-serve"))
    kserve = runtime["spec"]["containers"][0]
    kserve["livenesProbe"] = kserve.pop("livenessProbe")
    with pytest.raises(jsonschema.ValidationError, match="livenesProbe"):
        validate_kserve(runtime)


def test_a_misspelled_annotation_key_in_kserve_metadata_fails_validation():
    (service,) = load_file(DEPLOY / "kserve" / "examples" / "knative-cpu.yaml")
    broken = copy.deepcopy(service)
    broken["metadata"]["annotation"] = broken["metadata"].pop("annotations")
    with pytest.raises(jsonschema.ValidationError, match="annotation"):
        validate_kserve(broken)


# --- consistent with the service -----------------------------------------------------------------


def _used_settings(env: dict[str, str]) -> set[str]:
    return {key.removeprefix("KOS_").lower() for key in env if key.startswith("KOS_")}


@needs_renderer
def test_every_setting_the_manifests_give_is_a_setting_of_the_service(overlays, runtimes):
    used = set()
    for manifests in overlays.values():
        used |= _used_settings(settings_env(manifests))
    for runtime in runtimes:
        used |= _used_settings(runtime_env(runtime))
    unknown = used - set(Settings.model_fields)
    assert not unknown, f"not settings of the service: {sorted(unknown)}"


@needs_renderer
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_grace_period_covers_the_drain_delay_and_the_shutdown_timeout(overlays, overlay):
    env = settings_env(overlays[overlay])
    pod = one(overlays[overlay], "Deployment")["spec"]["template"]["spec"]
    needed = float(env["KOS_DRAIN_DELAY_S"]) + float(env["KOS_SHUTDOWN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] >= needed + 5
    # The service drains itself: a preStop hook would only add to the time before SIGTERM.
    assert "lifecycle" not in container(pod, "keras-onnx-serve")


@needs_renderer
def test_kserve_runtimes_drain_within_the_grace_period_kserve_pods_get(runtimes):
    grace = {m["spec"]["predictor"].get("terminationGracePeriodSeconds", 30) for m in examples()}
    for runtime in runtimes:
        env = runtime_env(runtime)
        assert float(env["KOS_DRAIN_DELAY_S"]) + float(env["KOS_SHUTDOWN_TIMEOUT_S"]) + 5 <= min(grace)


def _check_probes(spec: dict, port: int | str, startup_seconds: int) -> None:
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert spec[probe]["httpGet"]["port"] == port, probe
    assert spec["livenessProbe"]["httpGet"]["path"] in LIVENESS_ROUTES
    assert spec["readinessProbe"]["httpGet"]["path"] in READINESS_ROUTES
    # Models load and warm before ready: the startup probe waits on readiness, generously, and
    # liveness (which runs only after it) never restarts a pod for a model still loading.
    startup = spec["startupProbe"]
    assert startup["httpGet"]["path"] == spec["readinessProbe"]["httpGet"]["path"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= startup_seconds


@needs_renderer
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ports_and_scrape_annotations_match_the_service(overlays, overlay):
    manifests = overlays[overlay]
    env = settings_env(manifests)
    template = one(manifests, "Deployment")["spec"]["template"]
    service = container(template["spec"], "keras-onnx-serve")
    ports = {p["name"]: p["containerPort"] for p in service["ports"]}
    assert ports == {"http": int(env["KOS_PORT"]), "grpc": int(env["KOS_GRPC_PORT"])}
    assert env["KOS_HOST"] == "0.0.0.0"
    _check_probes(service, "http", startup_seconds=300 if overlay != "gpu" else 600)
    assert template["metadata"]["annotations"]["prometheus.io/port"] == env["KOS_PORT"]
    assert template["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    targets = {p["targetPort"] for p in one(manifests, "Service")["spec"]["ports"]}
    assert targets == set(ports)


@needs_renderer
def test_kserve_runtimes_listen_where_kserve_expects_and_probe_the_v2_routes(runtimes):
    for runtime in runtimes:
        env = runtime_env(runtime)
        kserve = container(runtime["spec"], "kserve-container")
        assert (env["KOS_PORT"], env["KOS_GRPC_PORT"], env["KOS_HOST"]) == ("8080", "8081", "0.0.0.0")
        assert env["KOS_REPOSITORY"] == "/mnt/models" and env["KOS_MODEL_NAME"] == "{{.Name}}"
        assert kserve["ports"] == [{"name": "http1", "containerPort": 8080, "protocol": "TCP"}]
        _check_probes(kserve, 8080, startup_seconds=300)
        assert kserve["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        assert kserve["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert runtime["spec"]["protocolVersions"] == ["v2"]
        annotations = runtime["spec"]["annotations"]
        assert annotations["prometheus.kserve.io/port"] == env["KOS_PORT"] == annotations["prometheus.io/port"]
        assert kserve["securityContext"]["runAsNonRoot"] and kserve["securityContext"]["runAsUser"] == 10001


@needs_renderer
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_and_references_meet_the_pods(overlays, overlay):
    manifests = overlays[overlay]
    deployment = one(manifests, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert one(manifests, "Service")["spec"]["selector"].items() <= labels.items()
    assert one(manifests, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = one(manifests, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [m["metadata"]["name"] for m in manifests if m["kind"] == "PersistentVolumeClaim"]
    mounts = {m["name"]: m for m in container(pod, "keras-onnx-serve")["volumeMounts"]}
    assert mounts["models"]["mountPath"] == settings_env(manifests)["KOS_REPOSITORY"]
    assert mounts["models"]["readOnly"] is True


@needs_renderer
def test_the_object_storage_variant_copies_models_before_the_service_starts(overlays):
    manifests = overlays["object-storage"]
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    assert not [m for m in manifests if m["kind"] == "PersistentVolumeClaim"]
    (models,) = [v for v in pod["volumes"] if v["name"] == "models"]
    assert set(models) == {"name", "emptyDir"}
    (copier,) = pod["initContainers"]
    assert {m["mountPath"] for m in copier["volumeMounts"] if m["name"] == "models"} == {"/models"}
    assert copier["args"][-1] == "/models"


@needs_renderer
def test_cpu_and_gpu_variants_get_their_image_device_and_resources(overlays, runtimes):
    def check(image: str, device: str, resources: dict, gpu: bool) -> None:
        assert image.startswith(IMAGE + ":")
        assert image_tag(image).endswith("-gpu") is gpu
        assert device == ("cuda" if gpu else "cpu")
        assert ("nvidia.com/gpu" in resources.get("limits", {})) is gpu
        if gpu:
            assert resources["limits"]["nvidia.com/gpu"] == "1"
        assert resources["requests"]["memory"] == resources["limits"]["memory"]
        assert resources["requests"]["cpu"] == resources["limits"]["cpu"]

    for overlay in OVERLAYS:
        pod = one(overlays[overlay], "Deployment")["spec"]["template"]["spec"]
        service = container(pod, "keras-onnx-serve")
        check(service["image"], settings_env(overlays[overlay])["KOS_DEVICE"], service["resources"], overlay == "gpu")
    by_name = {}
    for runtime in runtimes:
        kserve = container(runtime["spec"], "kserve-container")
        gpu = runtime["metadata"]["name"].endswith("-gpu")
        check(kserve["image"], runtime_env(runtime)["KOS_DEVICE"], kserve["resources"], gpu)
        by_name[runtime["metadata"]["name"]] = runtime
    for service in examples():
        model = service["spec"]["predictor"]["model"]
        runtime = by_name[model["runtime"]]
        formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
        assert model["modelFormat"]["name"] in formats
        assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
        gpu = runtime["metadata"]["name"].endswith("-gpu")
        assert service["metadata"]["name"].endswith(("-gpu", "-gpu-standard")) is gpu
        if gpu:
            assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_knative_examples_scale_on_concurrency_and_standard_ones_on_cpu():
    for service in examples():
        mode = service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"]
        predictor = service["spec"]["predictor"]
        if mode == "Knative":
            assert predictor["scaleMetric"] == "concurrency"
            assert 0 < predictor["scaleTarget"] <= predictor["containerConcurrency"]
        else:
            assert mode == "Standard"
            assert service["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "hpa"
            assert predictor["scaleMetric"] == "cpu" and 0 < predictor["scaleTarget"] <= 100
            assert predictor["minReplicas"] >= 1


@needs_renderer
def test_an_images_entry_in_a_users_overlay_replaces_every_image(tmp_path):
    for folder in (DEPLOY / "kubernetes" / "overlays" / "gpu", DEPLOY / "kserve" / "runtimes"):
        overlay = tmp_path / folder.name
        overlay.mkdir()
        (overlay / "kustomization.yaml").write_text(
            f"resources: [{os.path.relpath(folder, overlay)}]\n"
            f"images: [{{name: {IMAGE}, newName: registry.example/ml/kos, newTag: '2.0-gpu'}}]\n"
        )
        manifests = render(overlay)
        images = []
        for manifest in manifests:
            spec = manifest.get("spec", {})
            pod = spec.get("template", {}).get("spec", spec)  # a Deployment's pod, or a runtime's
            images += [c["image"] for c in pod.get("containers", [])]
        assert images and set(images) == {"registry.example/ml/kos:2.0-gpu"}


def _shm_room(pod_spec: dict, container_name: str) -> int:
    """MiB of memory-backed /dev/shm the pod gives the service's container (0: the runtime's default 64 MiB)."""
    mounts = {m["name"] for m in container(pod_spec, container_name).get("volumeMounts", []) if m["mountPath"] == "/dev/shm"}
    for volume in pod_spec.get("volumes", []):
        if volume["name"] in mounts and volume.get("emptyDir", {}).get("medium") == "Memory":
            limit = volume["emptyDir"]["sizeLimit"]
            assert limit.endswith("Mi"), limit
            return int(limit[:-2])
    return 0


@needs_renderer
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_give_front_ends_room_in_dev_shm(overlays, overlay, runtimes):
    # 64 MiB of shared memory per front end at full load (service/shm.py), and the automatic count
    # reaches 8 front ends at most (service/machine.py).
    from service.machine import MAX_AUTOMATIC_FRONTENDS
    from service.shm import ARENA_BYTES

    needed = MAX_AUTOMATIC_FRONTENDS * ARENA_BYTES // 2**20
    pod = one(overlays[overlay], "Deployment")["spec"]["template"]["spec"]
    assert _shm_room(pod, "keras-onnx-serve") >= needed
    for runtime in runtimes:
        assert _shm_room(runtime["spec"], "kserve-container") >= needed


def test_compose_gives_front_ends_room_in_dev_shm():
    import yaml

    compose = yaml.safe_load((DEPLOY.parent / "docker-compose.yml").read_text())
    for name in ("api", "api-cpu"):
        assert compose["services"][name]["shm_size"] == "512m", name
