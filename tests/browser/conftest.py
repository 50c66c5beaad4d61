"""Fixtures for the page's tests: Debian's Chromium driven by Playwright, real servers, a second model."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from kos_core.artifact import MODEL_FILENAME, ModelMetadata
from kos_core.layout import model_path
from tests.conftest import BUNDLED_REPOSITORY

CHROMIUM = Path("/usr/bin/chromium")
# Headless, and nothing that reaches out of the machine (updates, sync, QUIC probes).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


# Module scope: the sync API keeps an event loop running in this thread while it is open, which
# would stop the asyncio tests that run after the browser tests.
@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Debian's Chromium under Playwright; the browser tests skip, saying why, where either is missing."""
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (scripts/install-browser.sh, run by .ci/run)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is missing: pip install -e '.[dev]'")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    """A fresh browser context (own session storage) and page; page errors fail the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.bring_to_front()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    # A Content-Security-Policy violation is reported on the console: the page must cause none.
    tab.on("console", lambda m: errors.append(m.text) if m.type == "error" and "Content Security Policy" in m.text else None)
    yield tab
    context.close()
    assert not errors, f"the page raised or broke its Content-Security-Policy: {errors}"


def _relabelled_digits(repository: Path, name: str) -> Path:
    """The bundled digits model served under another name with its labels spelled out, written as export writes it."""
    import onnx

    from export.repository import attach_metadata, write_atomically

    source = model_path(BUNDLED_REPOSITORY, "digits", 1)
    proto = onnx.load(str(source))
    props = {p.key: p.value for p in proto.metadata_props}
    metadata = ModelMetadata.from_metadata_props(props).model_copy(update={"name": name, "labels": WORDS})
    attach_metadata(proto, metadata)
    return write_atomically({MODEL_FILENAME: proto}, repository, name, 1)


@pytest.fixture(scope="session")
def two_models(tmp_path_factory) -> Path:
    """A repository serving `digits` (the bundled model) and `words` (the same network, labels spelled out)."""
    root = tmp_path_factory.mktemp("two_models")
    target = model_path(root, "digits", 1)
    target.parent.mkdir(parents=True)
    shutil.copyfile(model_path(BUNDLED_REPOSITORY, "digits", 1), target)
    _relabelled_digits(root, "words")
    return root
