"""Per-model settings: `<repository>/<name>/settings.toml` overrides service-wide defaults for one model.

An 8x8 digits model and a MobileNet want different batches, threads and deadlines. The file sits
beside the model's version folders and applies to every version; a key it leaves out keeps the
service's value. A file that cannot be read, names an unknown key or holds a value the service
would refuse is a load error of that model alone; the other models are served.

    # models/mobilenet/settings.toml
    max_batch_size = 16
    max_batch_delay_ms = 2
    inference_workers = 2
    intra_op_threads = 1
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .settings import Settings

# The service settings a model may set for itself: how its batches form and run, and which file serves.
MODEL_FIELDS = (
    "max_batch_size",
    "max_batch_delay_ms",
    "queue_size",
    "request_timeout_s",
    "inference_workers",
    "intra_op_threads",
    "inter_op_threads",
    "intra_op_spinning",
    "lone_request_threads",
    "precision",
)


class ModelSettingsError(ValueError):
    """A per-model settings file that cannot be used; its message names the file and the fix."""


def read_overrides(path: Path) -> dict[str, Any]:
    """The keys of a per-model settings file, checked by name (values are checked by `model_settings`)."""
    where = f"{path.parent.name}/{path.name}"
    try:
        overrides = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelSettingsError(f"{where}: cannot be read ({exc.__class__.__name__}: {exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ModelSettingsError(f"{where}: not valid TOML ({exc})") from None
    unknown = sorted(set(overrides) - set(MODEL_FIELDS))
    if unknown:
        raise ModelSettingsError(f"{where}: unknown setting(s) {', '.join(unknown)}; a model may set {', '.join(MODEL_FIELDS)}")
    return overrides


def model_settings(settings: Settings, overrides: dict[str, Any], where: str) -> Settings:
    """The service settings with a model's overrides applied, checked by the same rules as the service's own."""
    if not overrides:
        return settings
    try:
        # Validated as a whole, so the service's constraints (ranges, a full request fitting the queue) hold per model too.
        return Settings.model_validate({**settings.model_dump(), **overrides})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors())
        raise ModelSettingsError(f"{where}: {problems}") from None


def in_force(settings: Settings) -> dict[str, Any]:
    """The per-model settings a version really runs with, as /models shows them."""
    return {name: getattr(settings, name) for name in MODEL_FIELDS}
