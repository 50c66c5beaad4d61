"""`python -m service`: serve every model in the repository."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import uvicorn

from .app import create_app
from .settings import ENV_PREFIX, Settings


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


def main(argv: list[str] | None = None) -> None:
    overrides = vars(build_parser().parse_args(argv))
    try:
        settings = Settings(**overrides)
    except Exception as exc:
        sys.exit(f"invalid settings: {exc}")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)


if __name__ == "__main__":
    main()
