"""The deployment: Dockerfiles, docker-compose.yml, and the serving image built, run and used for real.

The static checks (Compose Specification schema, hadolint, the compose wiring) always run. The
smoke tests build the CPU serving image, run it and classify real PNG digits through its published
loopback port, then bring the compose file's CPU service up and down the same way. They use a
running Docker engine, else rootful podman (scripts/install-container-tools.sh installs it), and
skip, saying why, where neither can run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from kos_core.layout import list_versions, model_path
from service.settings import Settings
from tests.conftest import onnx_predict
from tests.containers.base_image import base_image
from tests.containers.engine import VENV_BIN, Engine, EngineUnavailable, find_engine, run, wait_for

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile*"))
PLACEHOLDER_CA = ROOT / "docker" / "no-proxy-ca.pem"
HOST_CA_BUNDLES = ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"]


def tool(name: str) -> str:
    found = VENV_BIN / name
    path = str(found) if found.exists() else shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: it comes with the `dev` extra (pip install -e '.[dev]')")
    return path


def compose_config() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


# ---------------------------------------------------------------------------------------------
# Static checks: no engine needed.


def test_compose_file_validates_against_the_compose_specification():
    result = run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)], check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_rejects_a_broken_file(tmp_path):
    # The check above is only worth something if the checker really rejects what the spec forbids.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  api:\n    image: x\n    restart: sometimes\n    portz: ['8000:8000']\n")
    result = run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(broken)], check=False)
    assert result.returncode != 0


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    # No configuration file: hadolint's defaults, failing on every finding down to `info`.
    result = run([tool("hadolint"), "--no-color", str(dockerfile)], check=False, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_hadolint_ignore_is_justified_by_the_comment_above_it(dockerfile):
    lines = dockerfile.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore" in line:
            above = lines[number - 1].strip() if number else ""
            assert above.startswith("#") and "hadolint" not in above, (
                f"{dockerfile.name}:{number + 1} ignores a rule without saying why"
            )
    assert not (ROOT / ".hadolint.yaml").exists() and not (ROOT / ".hadolint.yml").exists(), (
        "rules are ignored inline, with reasons"
    )


def test_dockerfiles_take_the_base_image_as_a_build_argument_defaulting_to_official_python_slim():
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        default = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.MULTILINE)
        assert default and re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", default.group(1)), dockerfile.name
        froms = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
        assert froms and all(f in ("${BASE_IMAGE}", "deps") for f in froms), (dockerfile.name, froms)


def test_requirements_give_the_cpu_image_plain_onnxruntime_and_the_gpu_image_its_cuda_libraries():
    spec = importlib.util.spec_from_file_location("docker_requirements", ROOT / "docker" / "requirements.py")
    requirements = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(requirements)
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = lambda reqs: {re.split(r"[\[<>=~!; ]", r, maxsplit=1)[0].lower() for r in reqs}  # noqa: E731

    serve_gpu = requirements.requirements(project, "serve", "gpu")
    serve_cpu = requirements.requirements(project, "serve", "cpu")
    train_cpu = requirements.requirements(project, "train", "cpu")
    assert any(r.startswith("onnxruntime-gpu[cuda,cudnn]") for r in serve_gpu)
    assert "onnxruntime" in names(serve_cpu) and "onnxruntime-gpu" not in names(serve_cpu)
    for serve in (serve_gpu, serve_cpu):
        assert not names(serve) & {"tensorflow", "tensorflow-cpu", "tf2onnx", "keras"}
    assert {"tensorflow-cpu", "tf2onnx", "onnxruntime"} <= names(train_cpu)
    # Everything else is the project's own list, version specifiers included.
    assert [r for r in serve_cpu if not r.startswith("onnxruntime")] == [
        r for r in project["dependencies"] if not r.startswith("onnxruntime")
    ]


def test_compose_runs_the_gpu_service_by_default_and_the_cpu_variant_under_its_profile():
    services = compose_config()["services"]
    api, cpu = services["api"], services["api-cpu"]
    assert "profiles" not in api  # `docker compose up` starts it
    (device,) = api["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert api["build"]["args"]["FLAVOR"] == "gpu"
    assert cpu["profiles"] == ["cpu"] and "deploy" not in cpu
    assert cpu["build"]["args"]["FLAVOR"] == "cpu"
    assert cpu["environment"]["KOS_DEVICE"] == "cpu"
    assert "api" in cpu["networks"]["default"]["aliases"]  # Prometheus finds either as `api`
    for service in (api, cpu):
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
        assert service["build"]["secrets"] == ["ca"]
        assert service["restart"] in ("always", "unless-stopped")
        assert service["healthcheck"]["test"] == ["CMD", "python", "/opt/kos/healthcheck.py"]
        assert any(p.endswith(":8000") for p in service["ports"])
        assert any(v.endswith(":/models:ro") for v in service["volumes"])


def test_compose_training_job_writes_into_the_volume_the_service_reads():
    config = compose_config()
    services = config["services"]
    train = services["train"]
    assert train["profiles"] == ["train"]
    assert train["build"]["dockerfile"] == "docker/Dockerfile.train"
    assert train["command"][0] == "train-and-export"
    served = next(v for v in services["api"]["volumes"] if ":/models" in v).split(":/models")[0]
    written = next(v for v in train["volumes"] if ":/models" in v)
    assert written == f"{served}:/models"  # same source, writable
    assert services["prometheus"]["profiles"] == ["monitoring"]
    prometheus = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["api:8000"]
    assert set(config["volumes"]) >= {"models", "runs"}
    assert config["secrets"]["ca"]["file"].endswith("docker/no-proxy-ca.pem}")


def test_compose_settings_are_service_settings_with_valid_defaults():
    services = compose_config()["services"]
    fields = set(Settings.model_fields)
    for name in ("api", "api-cpu"):
        values = {}
        for variable, value in services[name]["environment"].items():
            assert variable.startswith("KOS_"), variable
            field = variable.removeprefix("KOS_").lower()
            assert field in fields, f"{name}: {variable} is not a setting of python -m service"
            assert field not in ("host", "port", "repository"), f"{name}: {variable} is fixed by the image"
            if value is None:
                continue  # passed through from the environment when set, absent otherwise: no default to check
            default = re.fullmatch(r"\$\{" + re.escape(variable) + r":-(.*)\}", str(value))
            values[field] = default.group(1) if default else str(value)
        Settings(**values)  # every default is one the service accepts


# ---------------------------------------------------------------------------------------------
# Smoke tests on a real engine.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ca_bundle() -> Path:
    """The host's CA bundle, which trusts a TLS-intercepting proxy where there is one."""
    for candidate in [os.environ.get("KOS_TEST_CA_BUNDLE", ""), *HOST_CA_BUNDLES]:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return PLACEHOLDER_CA


@pytest.fixture(scope="module")
def engine():
    try:
        engine = find_engine()
    except EngineUnavailable as exc:
        pytest.skip(f"no container engine can run here: {exc}")
    try:
        yield engine
    finally:
        try:
            engine.close()
            leftovers = engine.host_state.leftovers() if engine.host_state is not None else []
        finally:
            engine.release()
        assert not leftovers, f"the container tests left these on the host: {leftovers}"


@pytest.fixture(scope="module")
def base(engine: Engine):
    try:
        image = base_image(engine)
    except EngineUnavailable as exc:
        pytest.skip(str(exc))
    # An engine that answers but cannot start a container (no overlay, no network namespaces) is
    # this machine's limit, found before anything of the project is involved.
    probe = engine("run", "--rm", image, "true", check=False, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"{engine.name} cannot run containers here: {probe.stderr.strip()[-500:]}")
    yield image
    if engine.name == "docker" and image.startswith("localhost/"):
        engine("rmi", "--force", image, check=False)


@pytest.fixture(scope="module")
def names():
    """Unique names for this run's images, compose project and containers."""
    run_id = uuid.uuid4().hex[:8]
    return {"repository": f"localhost/kos-test-{run_id}", "project": f"kos-test-{run_id}", "container": f"kos-test-{run_id}"}


@pytest.fixture(scope="module")
def serving_image(engine: Engine, base: str, names):
    """The CPU serving image, built as a user builds it, with the proxy CA as a build secret."""
    tag = f"{names['repository']}:cpu"
    started = time.monotonic()
    try:
        engine(*build_command(engine, tag, base), cwd=ROOT, timeout=900)
        print(f"built {tag} on {base} with {engine.name} in {time.monotonic() - started:.0f}s")
        yield tag
    finally:
        engine("rmi", "--force", tag, check=False)


def build_command(engine: Engine, tag: str, base: str) -> list[str]:
    # The same build arguments as docker-compose.yml's api-cpu passes, so the compose build reuses the layers.
    command = ["build", "--file", "docker/Dockerfile", "--tag", tag, "--secret", f"id=ca,src={ca_bundle()}"]
    command += ["--build-arg", f"BASE_IMAGE={base}", "--build-arg", "PIP_INDEX_URL=https://pypi.org/simple"]
    command += ["--build-arg", "FLAVOR=cpu"]
    return [*command, "."]


@pytest.fixture(scope="module")
def container(engine: Engine, serving_image: str, names):
    """The serving image run as `docker run -d -p 127.0.0.1:PORT:8000 IMAGE`; yields its base URL."""
    port = free_port()
    name = names["container"]
    extra = ["--health-interval", "2s"] if engine.name == "docker" else []  # podman: `healthcheck run` by hand
    try:
        engine("run", "--detach", "--name", name, "--publish", f"127.0.0.1:{port}:8000", *extra, serving_image)
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(engine, name, url)
        yield {"name": name, "url": url}
    finally:
        engine("rm", "--force", "--volumes", name, check=False, timeout=120)


def wait_until_ready(engine: Engine, container: str, url: str, timeout: float = 120) -> None:
    try:
        wait_for(lambda: httpx.get(url + "/health", timeout=2).status_code == 200, timeout, what=f"{url}/health answering 200")
    except TimeoutError:
        logs = engine("logs", container, check=False)
        raise AssertionError(f"the service never became ready; its log:\n{logs.stdout[-4000:]}{logs.stderr[-4000:]}") from None


def inspect(engine: Engine, kind: str, name: str) -> dict:
    return json.loads(engine(kind, "inspect", name).stdout)[0]


def upload(paths: list[Path]):
    return [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]


def served_version() -> int:
    return max(list_versions(ROOT / "models", "digits"))


def assert_classifies_digits_like_the_bundled_model(url: str, digit_pngs, digits_test_split, count: int) -> None:
    version = served_version()
    paths = [p for p, _ in digit_pngs[:count]]
    answer = httpx.post(f"{url}/predict/digits", files=upload(paths), timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"] == "digits" and body["version"] == version
    assert [p["filename"] for p in body["predictions"]] == [p.name for p in paths]
    got = np.array([int(p["label"]) for p in body["predictions"]])
    expected = onnx_predict(model_path(ROOT / "models", "digits", version), digits_test_split.x[:count])
    assert np.array_equal(got, expected.argmax(1))  # the same answers as the model file run here
    truth = np.array([label for _, label in digit_pngs[:count]])
    assert (got == truth).mean() >= 0.9
    probabilities = np.array([p["probability"] for p in body["predictions"]])
    assert np.allclose(probabilities, expected.max(1), atol=1e-4)


def test_serving_image_is_small_unprivileged_and_carries_no_training_stack(engine: Engine, serving_image: str, base: str):
    image = inspect(engine, "image", serving_image)
    config = image["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["python", "-m", "service"]
    healthcheck = config.get("Healthcheck") or image.get("Healthcheck") or image.get("HealthCheck")  # docker, podman
    assert healthcheck and healthcheck["Test"] == ["CMD", "python", "/opt/kos/healthcheck.py"], (sorted(image), sorted(config))
    assert "/models" in (config.get("Volumes") or {})
    assert "8000/tcp" in (config.get("ExposedPorts") or {})
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["KOS_REPOSITORY"] == "/models" and env["KOS_HOST"] == "0.0.0.0"
    assert not {"PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"} & set(env)  # the build secret stayed in the build
    added = image["Size"] - inspect(engine, "image", base)["Size"]
    print(f"{serving_image}: {image['Size'] / 1e6:.0f} MB, {added / 1e6:.0f} MB over its base {base}")
    assert added < 300e6, f"the CPU image adds {added / 1e6:.0f} MB to its base"
    inside = engine("run", "--rm", "--entrypoint", "python", serving_image, "-c", PROBE).stdout
    facts = json.loads(inside.strip().splitlines()[-1])
    assert facts["modules"] == [], f"the serving image carries {facts['modules']}"
    assert facts["uid"] == 10001 and not facts["ca_secret"]
    assert f"digits/{served_version()}/model.onnx" in facts["models"]


# Run inside the serving image: what it carries, and who runs it.
PROBE = """
import importlib.util, json, os, pathlib
print(json.dumps({
    "modules": [m for m in ("tensorflow", "keras", "tf2onnx", "pip", "setuptools") if importlib.util.find_spec(m)],
    "uid": os.getuid(),
    "ca_secret": pathlib.Path("/run/secrets/ca").exists(),
    "models": sorted(str(p.relative_to("/models")) for p in pathlib.Path("/models").rglob("model.onnx")),
}))
"""


def test_cpu_image_classifies_real_digit_pngs_through_the_published_loopback_port(container, digit_pngs, digits_test_split):
    assert_classifies_digits_like_the_bundled_model(container["url"], digit_pngs, digits_test_split, count=40)
    health = httpx.get(container["url"] + "/health", timeout=5).json()
    assert health["status"] == "ready"
    assert all(m["providers"] == ["CPUExecutionProvider"] for m in health["models"])


def test_image_healthcheck_needs_no_extra_tools_and_reports_healthy(engine: Engine, container):
    if engine.name == "podman":
        # No systemd here to schedule health checks: run the image's own check by hand.
        result = engine("healthcheck", "run", container["name"], check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        status = inspect(engine, "container", container["name"])["State"]["Health"]["Status"]
    else:
        status = wait_for(
            lambda: (s := inspect(engine, "container", container["name"])["State"]["Health"]["Status"]) == "healthy" and s,
            timeout=60, what="docker reporting the container healthy",
        )  # fmt: skip
    assert status == "healthy"


def test_healthcheck_fails_while_nothing_answers(engine: Engine, serving_image: str):
    # The same check in a container whose service never started must report unhealthy, not pass.
    result = engine("run", "--rm", "--entrypoint", "python", serving_image, "/opt/kos/healthcheck.py", check=False)
    assert result.returncode == 1 and "unhealthy" in result.stderr


def test_container_stops_cleanly_and_promptly_on_sigterm(engine: Engine, container):
    started = time.monotonic()
    engine("stop", "--time", "30", container["name"], timeout=60)
    assert time.monotonic() - started < 20
    state = inspect(engine, "container", container["name"])["State"]
    assert state["ExitCode"] == 0, state


@pytest.fixture
def compose_project(engine: Engine, serving_image: str, base: str, names):
    """Environment for docker-compose.yml pointing at this run's image names, a free loopback port and the CA."""
    if engine.compose_cli is None:
        pytest.skip(f"{engine.name} has no compose CLI here")
    port = free_port()
    env = {
        "KOS_IMAGE": names["repository"],
        "KOS_PUBLISH": f"127.0.0.1:{port}",
        "KOS_BASE_IMAGE": base,
        "KOS_CA_BUNDLE": str(ca_bundle()),
        "KOS_LOG_LEVEL": "info",
    }
    project = names["project"]
    args = ["-p", project, "-f", str(COMPOSE_FILE), "--profile", "cpu"]
    try:
        yield {"args": args, "env": env, "url": f"http://127.0.0.1:{port}", "project": project}
    finally:
        engine.compose(*args, "down", "--volumes", "--timeout", "5", env=env, check=False, timeout=180)
        for kind in ("container", "volume", "network"):
            found = engine(kind, "ls", "--quiet", "--filter", f"label=com.docker.compose.project={project}", check=False)
            for item in found.stdout.split():
                engine(kind, "rm", "--force", item, check=False)


def project_items(engine: Engine, kind: str, project: str) -> list[str]:
    extra = ["--all"] if kind == "container" else []
    found = engine(kind, "ls", *extra, "--quiet", "--filter", f"label=com.docker.compose.project={project}")
    return found.stdout.split()


def test_compose_cpu_service_builds_comes_up_serves_and_goes_down(engine: Engine, compose_project, digit_pngs, digits_test_split):
    args, env, project = compose_project["args"], compose_project["env"], compose_project["project"]
    # Builds through the compose file's own build section and CA secret (the layers are cached).
    engine.compose(*args, "build", "api-cpu", env=env, timeout=900)
    engine.compose(*args, "up", "--detach", "api-cpu", env=env, timeout=300)
    (container,) = project_items(engine, "container", project)
    wait_until_ready(engine, container, compose_project["url"])
    assert_classifies_digits_like_the_bundled_model(compose_project["url"], digit_pngs, digits_test_split, count=10)

    details = inspect(engine, "container", container)
    assert details["Config"]["Env"] and "KOS_DEVICE=cpu" in details["Config"]["Env"]
    (models,) = [m for m in details["Mounts"] if m["Destination"] == "/models"]
    assert models["Type"] == "volume" and models["RW"] is False
    if engine.name == "podman":
        result = engine("healthcheck", "run", container, check=False)
        assert result.returncode == 0, result.stdout + result.stderr

    engine.compose(*args, "down", "--volumes", "--timeout", "5", env=env, check=False, timeout=180)
    for kind in ("container", "volume", "network"):
        assert project_items(engine, kind, project) == [], f"{kind}s of {project} are left after `down`"
    with pytest.raises(httpx.TransportError):
        httpx.get(compose_project["url"] + "/health", timeout=2)


@pytest.mark.skipif(
    os.environ.get("KOS_TEST_TRAINING_IMAGE") != "1",
    reason="builds the training image (TensorFlow, about 1 GB, several minutes): set KOS_TEST_TRAINING_IMAGE=1",
)
def test_compose_training_job_exports_a_version_the_running_service_then_serves(engine: Engine, compose_project, digit_pngs):
    args, env, project = compose_project["args"], compose_project["env"], compose_project["project"]
    train_args = [*args, "--profile", "train"]
    engine.compose(*train_args, "build", "api-cpu", "train", env=env, timeout=1800)
    engine.compose(*args, "up", "--detach", "api-cpu", env=env, timeout=300)
    (container,) = project_items(engine, "container", project)
    url = compose_project["url"]
    wait_until_ready(engine, container, url)
    before = served_version()
    assert max(m["version"] for m in httpx.get(url + "/models/digits", timeout=5).json()["models"]) == before

    # The whole loop: one command trains and exports into the shared volume ...
    engine.compose(
        *train_args, "run", "--rm", "train",
        "train-and-export", "digits", "--model", "digits_cnn", "--dataset", "digits", "--epochs", "3",
        env=env, timeout=1200,
    )  # fmt: skip
    # ... and the running service serves the new version without a restart.
    wait_for(
        lambda: max(m["version"] for m in httpx.get(url + "/models/digits", timeout=5).json()["models"]) == before + 1,
        timeout=60, what=f"digits version {before + 1} being served",
    )  # fmt: skip
    answer = httpx.post(f"{url}/predict/digits", files=upload([digit_pngs[0][0]]), timeout=30)
    assert answer.status_code == 200 and answer.json()["version"] == before + 1, answer.text
    assert httpx.get(url + "/health", timeout=5).status_code == 200
