"""Settings: one class, every field a flag and an environment variable, all in the README's table."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from service.__main__ import build_parser
from service.settings import ENV_PREFIX, Settings
from tests.conftest import ROOT


def _readme_settings_rows() -> dict[str, tuple[str, str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Service settings") :]
    section = section[: section.index("\n## ", 3)]
    rows = {}
    for match in re.finditer(r"^\| `--([\w-]+)` \| `(\w+)` \| `([^`]*)` \| (.+) \|$", section, re.MULTILINE):
        flag, env, default, meaning = match.groups()
        rows[flag] = (env, default, meaning)
    return rows


def _shown(default: object) -> str:
    return "(none)" if default is None else "(empty)" if default == "" else str(default)


def test_every_setting_is_in_the_readme_table_with_its_env_and_default():
    rows = _readme_settings_rows()
    fields = {name.replace("_", "-"): field for name, field in Settings.model_fields.items()}
    assert set(rows) == set(fields), f"README lacks {set(fields) - set(rows)}, lists unknown {set(rows) - set(fields)}"
    for flag, field in fields.items():
        env, default, meaning = rows[flag]
        assert env == ENV_PREFIX + flag.replace("-", "_").upper()
        assert default == _shown(field.default), flag
        assert meaning.strip() == field.description, flag


def test_every_setting_is_a_flag_that_reaches_the_settings():
    parser = build_parser()
    values = {
        "host": "0.0.0.0",
        "port": "9",
        "grpc_port": "10",
        "grpc_max_message_bytes": "2000",
        "repository": "elsewhere",
        "model_name": "flowers",
        "device": "cpu",
        "precision": "int8",
        "max_batch_size": "7",
        "max_batch_delay_ms": "1.5",
        "queue_size": "99",
        "request_timeout_s": "3",
        "max_upload_bytes": "1000",
        "max_files_per_request": "9",
        "max_image_pixels": "100",
        "max_request_pixels": "1000",
        "intra_op_threads": "2",
        "inter_op_threads": "1",
        "intra_op_spinning": "true",
        "inference_workers": "2",
        "lone_request_threads": "4",
        "inference_nice": "7",
        "decode_workers": "3",
        "frontends": "2",
        "api_key": "k",
        "cors_origins": "https://a.example, https://b.example",
        "watch_interval_s": "0",
        "readiness_policy": "strict",
        "drain_delay_s": "2.5",
        "shutdown_timeout_s": "5",
        "access_log": "true",
        "log_level": "debug",
        "log_format": "json",
    }
    assert set(values) == set(Settings.model_fields), "a new setting needs a value in this test"
    argv = [arg for name, value in values.items() for arg in ("--" + name.replace("_", "-"), value)]
    settings = Settings(**vars(parser.parse_args(argv)))
    for name, value in values.items():
        assert str(getattr(settings, name)) == str(type(getattr(settings, name))(value)), name
    assert settings.cors_origin_list == ["https://a.example", "https://b.example"]


def test_environment_variables_set_settings_and_bad_values_are_refused(monkeypatch):
    monkeypatch.setenv("KOS_MAX_BATCH_SIZE", "12")
    monkeypatch.setenv("KOS_DEVICE", "cpu")
    settings = Settings()
    assert settings.max_batch_size == 12 and settings.device == "cpu"
    with pytest.raises(ValueError):
        Settings(device="tpu")
    with pytest.raises(ValueError, match="--queue-size"):
        Settings(queue_size=4, max_files_per_request=8)


def _refusal(*argv: str, env: dict[str, str] | None = None) -> str:
    """What `python -m service` says when it refuses to start with these flags and environment."""
    result = subprocess.run(
        [sys.executable, "-m", "service", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode != 0, result.stderr
    return result.stderr


def test_settings_that_constrain_each_other_name_both_and_the_fix():
    message = _refusal("--queue-size", "8")
    assert "--max-files-per-request (64) must not exceed --queue-size (8)" in message
    assert "raise --queue-size (KOS_QUEUE_SIZE) to at least 64" in message
    assert "lower --max-files-per-request (KOS_MAX_FILES_PER_REQUEST) to at most 8" in message
    assert "Traceback" not in message and "input_value" not in message
    rows = _readme_settings_rows()
    assert "At least --max-files-per-request" in rows["queue-size"][2]
    assert "at most --queue-size" in rows["max-files-per-request"][2]


def test_an_empty_api_key_refuses_to_start_and_never_echoes_the_settings():
    message = _refusal(env={"KOS_API_KEY": ""})
    assert "--api-key (KOS_API_KEY) is set but empty, which would serve without authentication" in message
    assert "unset it to serve without one" in message
    with pytest.raises(ValueError, match="set but empty"):
        Settings(api_key="   ")
    # A bad value elsewhere is reported by its flag, without the other values (the key among them).
    message = _refusal("--port", "99999", env={"KOS_API_KEY": "s3cret"})
    assert "--port:" in message and "s3cret" not in message
    assert "Set but empty, the service refuses to start." in _readme_settings_rows()["api-key"][2]


def test_an_empty_model_name_is_refused():
    with pytest.raises(ValueError, match="model-name"):
        Settings(model_name="")
    with pytest.raises(ValueError, match="model-name"):
        Settings(model_name="a/b")
