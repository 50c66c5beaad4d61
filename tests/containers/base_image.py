"""The base image the test builds on: the Dockerfile's default where a registry answers, else a stand-in.

The stand-in is Debian bookworm from the Debian mirror apt already uses (debootstrap), with
Debian's Python 3.11 and its venv module: what `python:3.11-slim-bookworm` offers the Dockerfile.
Its root file system is cached as a tar file (about 150 MB, about a minute to make), in
$KOS_TEST_CACHE or ~/.cache/keras-onnx-serve, so that only a machine's first run pays for it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from .engine import Engine, EngineUnavailable, run, unmount_under

OFFICIAL = "python:3.11-slim-bookworm"
STANDIN = "localhost/kos-python-standin:3.11-bookworm"
SUITE = "bookworm"
PACKAGES = "python3,python3-venv,ca-certificates"
# Bump when the recipe changes, so that an old cached file is not reused.
RECIPE = f"1-{SUITE}-{PACKAGES.replace(',', '+')}"
# What a slim image leaves out too: package caches, docs, translations.
TRIM = ["var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info"]


def cache_dir() -> Path:
    if os.environ.get("KOS_TEST_CACHE"):
        return Path(os.environ["KOS_TEST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "keras-onnx-serve"


def base_image(engine: Engine) -> str:
    """A Python 3.11 base image present in the engine: the official one if it can be had, else the stand-in."""
    if engine.name == "docker":
        if engine("image", "inspect", OFFICIAL, check=False).returncode == 0:
            return OFFICIAL
        if engine("pull", OFFICIAL, check=False, timeout=300).returncode == 0:
            return OFFICIAL
    archive = standin_rootfs()
    engine("import", "--change", 'CMD ["/bin/bash"]', str(archive), STANDIN, timeout=300)
    return STANDIN


def standin_rootfs() -> Path:
    """The cached stand-in root file system as a tar file, made with debootstrap when missing."""
    archive = cache_dir() / f"python-standin-{RECIPE}.tar"
    if archive.is_file():
        return archive
    if shutil.which("debootstrap") is None:
        raise EngineUnavailable(
            "no registry answers for the base image and debootstrap, which makes a stand-in, is not installed "
            "(scripts/install-container-tools.sh installs it)"
        )
    if os.geteuid() != 0:
        raise EngineUnavailable("no registry answers for the base image and debootstrap needs root to make a stand-in")
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kos-standin-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        try:
            run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE, str(rootfs), debian_mirror()], timeout=900)
        finally:
            unmount_under(rootfs)
        for path in TRIM:
            shutil.rmtree(rootfs / path, ignore_errors=True)
        partial = archive.with_suffix(".tar.partial")
        run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(partial), "."], timeout=600)
        partial.replace(archive)  # atomic: a run killed half-way leaves no broken cache behind
    return archive


def debian_mirror() -> str:
    """The Debian mirror apt uses here ($KOS_TEST_DEBIAN_MIRROR wins)."""
    if os.environ.get("KOS_TEST_DEBIAN_MIRROR"):
        return os.environ["KOS_TEST_DEBIAN_MIRROR"]
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources")) + [Path("/etc/apt/sources.list")]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        for match in re.finditer(r"^(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", text, re.MULTILINE):
            uri = match.group(1)
            if "security" not in uri:
                return uri
    return "http://deb.debian.org/debian"
