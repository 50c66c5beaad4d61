"""Writing versions into the model repository: next version number, metadata, atomic placement."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from kos_core.artifact import MODEL_FILENAME, ModelMetadata
from kos_core.layout import list_versions

from .errors import ExportError

if TYPE_CHECKING:
    import onnx


def attach_metadata(proto: onnx.ModelProto, metadata: ModelMetadata) -> None:
    """Put the metadata into the ONNX file's `metadata_props`, replacing what a key held before."""
    for key, value in metadata.to_metadata_props().items():
        entry = next((p for p in proto.metadata_props if p.key == key), None) or proto.metadata_props.add()
        entry.key, entry.value = key, value


def next_version(repository: Path, name: str) -> int:
    versions = list_versions(repository, name)
    return (max(versions) + 1) if versions else 1


def check_name(name: str) -> None:
    """A model name becomes a folder and a URL segment: keep it to a safe alphabet."""
    if not name or name.startswith(".") or not all(c.isalnum() or c in "-_." for c in name):
        raise ExportError(f"model name {name!r} must be letters, digits, '-', '_' or '.', not starting with '.'")


def check_version_free(repository: Path, name: str, version: int, overwrite: bool) -> None:
    if version < 1:
        raise ExportError(f"version {version} must be a positive integer")
    target = repository / name / str(version)
    if target.exists() and not overwrite:
        raise ExportError(f"{target} already exists: choose another version or pass --overwrite")


def write_atomically(
    files: dict[str, onnx.ModelProto], repository: Path, name: str, version: int, overwrite: bool = False
) -> Path:
    """Write `<repository>/<name>/<version>/` with its files so a watcher never sees a partial model.

    `files` maps file names to ONNX protos and must hold model.onnx. They are written into a hidden
    temporary folder beside the version folders, which is then renamed into place: a rename within
    one file system is atomic, and the service ignores hidden folders.
    """
    if MODEL_FILENAME not in files:
        raise ExportError(f"a version needs its {MODEL_FILENAME}")
    check_name(name)
    check_version_free(repository, name, version, overwrite)
    folder = repository / name
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / str(version)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".tmp", dir=folder))
    try:
        # mkdtemp makes a private folder; a repository is read by the service, often as another user
        # (the container's non-root user), so the version folder must be as readable as any other.
        staging.chmod(0o755)
        # model.onnx last: if anything fails before, no version folder appears at all.
        for filename in sorted(files, key=lambda f: f == MODEL_FILENAME):
            with open(staging / filename, "wb") as f:
                f.write(files[filename].SerializeToString())
                f.flush()
                os.fsync(f.fileno())
        if overwrite and target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{version}.old.", dir=folder))
            os.replace(target, retired / "model")
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            try:
                os.replace(staging, target)
            except OSError:
                if target.exists():  # another export took this version between the check and the rename
                    raise ExportError(
                        f"{target} was written by another export meanwhile: export again for the next version"
                    ) from None
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        # A failed first export leaves no empty model folder behind.
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return target / MODEL_FILENAME
