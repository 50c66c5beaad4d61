"""`python -m service`: serve every model in the repository; `python -m service tune MODEL`: measure and set a model's settings."""

from __future__ import annotations

import argparse
import logging.config
import sys
from typing import Any

from pydantic import ValidationError

from .logs import log_config
from .machine import choose_frontends
from .settings import ENV_PREFIX, Settings

log = logging.getLogger("service")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Serve the ONNX image classifiers of a model repository over HTTP. "
        f"Every flag can also be set by an environment variable {ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}PORT); "
        "a flag wins over the environment.",
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = ENV_PREFIX + name.upper()
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "metavar": name.upper()}
        choices = getattr(field.annotation, "__args__", None)
        if choices and all(isinstance(c, str) for c in choices):
            kwargs["choices"] = choices
        parser.add_argument(flag, help=f"{field.description} [env {env}, default {field.default!s}]", **kwargs)
    return parser


def settings_problems(exc: ValidationError) -> str:
    """Each problem on its own line, named by its flag; never the values given (an API key among them)."""
    lines = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        where = ".".join(str(part) for part in error["loc"])
        lines.append(f"  --{where.replace('_', '-')}: {message}" if where else f"  {message}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["tune"]:
        from .tune import main as tune

        sys.exit(tune(argv[1:]))
    overrides = vars(build_parser().parse_args(argv))
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        sys.exit(f"invalid settings:\n{settings_problems(exc)}")
    config = log_config(settings.log_level, settings.log_format)
    logging.config.dictConfig(config)
    frontends, why = choose_frontends(settings.frontends, settings.device)
    if frontends > 1:
        # The supervisor serves nothing itself: it imports neither the web stack nor onnxruntime.
        from .frontends import supervise

        log.info("%d front ends: %s", frontends, why)
        sys.exit(supervise(settings.model_copy(update={"frontends": frontends})))
    log.info("one process: %s", why)
    from .app import create_app
    from .runtime import DeviceUnavailable
    from .server import serve
    from .startup import prepare_process

    try:
        app = create_app(settings, prepare_process(settings))
    except DeviceUnavailable as exc:
        sys.exit(f"cannot start: {exc}")
    # One process per device: several workers would each load every model (and, on a GPU, each
    # hold its own CUDA context and memory arena). Scale out with more processes behind a balancer.
    sys.exit(serve(app, settings, config))


if __name__ == "__main__":
    main()
