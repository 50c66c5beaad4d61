"""Where things live on disk: the model repository and a training run folder.

The repository is `<repository>/<name>/<version>/model.onnx` (variants beside it); a run folder
holds what `python -m training` wrote and `python -m export` reads.
"""

from __future__ import annotations

from pathlib import Path

from .artifact import MODEL_FILENAME, PRECISION_FILENAMES

# Files of a training run folder. MODEL_FILE, RUN_FILE and TEST_SPLIT_FILE are read by `export`.
RUN_MODEL_FILE = "model.keras"  # the inference model: uint8 NHWC "image" in, probabilities out, no augmentation
RUN_FILE = "run.json"  # the run record: config, labels, input, metrics, per-class report, history
TEST_SPLIT_FILE = "test_split.npz"  # held-out test images (x uint8 NHWC) and labels (y), for export's parity check
LABELS_FILE = "labels.txt"  # one label per line, line i is output column i
HISTORY_FILE = "history.csv"  # per-epoch metrics, written as training goes
CHECKPOINT_FILE = "checkpoint.keras"  # the best model so far by the monitored metric, written as training goes
# Per-model settings, beside a model's version folders: <repository>/<name>/settings.toml.
MODEL_SETTINGS_FILE = "settings.toml"


def model_path(repository: Path, name: str, version: int, precision: str = "float32") -> Path:
    return repository / name / str(version) / PRECISION_FILENAMES[precision]


def is_version(name: str) -> bool:
    """Whether a folder name is a model version: a positive integer in ASCII digits (not "²", which int() refuses),
    at most 18 of them (int() refuses past 4,300, and no version needs more)."""
    return name.isascii() and name.isdigit() and len(name) <= 18 and int(name) > 0


def model_settings_path(repository: Path, name: str) -> Path:
    """The optional settings file of model `name`, beside its version folders."""
    return repository / name / MODEL_SETTINGS_FILE


def served_file(repository: Path, name: str, version: int, precision: str = "float32") -> Path:
    """The file to serve for `precision`: its variant when the version folder holds one, else model.onnx."""
    preferred = model_path(repository, name, version, precision)
    return preferred if preferred.is_file() else model_path(repository, name, version)


def list_versions(repository: Path, name: str) -> list[int]:
    """Versions of `name` that hold a model file, ascending; temporary folders are ignored.

    A folder that cannot be read holds no versions (`repository_problems` names it).
    """
    folder = repository / name
    try:
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if is_version(p.name) and (p / MODEL_FILENAME).is_file())
    except OSError:
        return []


def list_models(repository: Path) -> dict[str, list[int]]:
    """Every model name in the repository with its versions."""
    if not repository.is_dir():
        return {}
    found = {}
    for p in sorted(repository.iterdir()):
        if p.is_dir() and not p.name.startswith("."):
            versions = list_versions(repository, p.name)
            if versions:
                found[p.name] = versions
    return found


def repository_problems(repository: Path) -> list[str]:
    """Entries of the repository that look meant to be served but are not laid out as NAME/VERSION/model.onnx.

    Hidden entries (export's staging folders among them) are not problems.
    """
    if not repository.is_dir():
        return []
    problems = []
    for entry in sorted(repository.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file():
            if entry.suffix == ".onnx":
                problems.append(f"{entry.name} lies at the top of the repository: put it in NAME/1/{MODEL_FILENAME}")
            continue
        problems.extend(model_folder_problems(entry))
    return problems


def model_folder_problems(folder: Path) -> list[str]:
    """Entries of one model's folder that look meant to be served but are not VERSION/model.onnx."""
    try:
        subs = sorted(folder.iterdir())
    except OSError as exc:
        return [f"{folder.name} cannot be read: {exc.strerror}"]
    problems = []
    for sub in subs:
        where = f"{folder.name}/{sub.name}"
        if sub.name.startswith("."):
            continue
        if sub.is_file():
            if sub.suffix == ".onnx":
                problems.append(f"{where} has no version folder: put it in {folder.name}/1/{MODEL_FILENAME}")
        elif not is_version(sub.name):
            problems.append(f"{where} is not a version folder (a whole number from 1 up): ignored")
        else:
            try:
                if not (sub / MODEL_FILENAME).is_file():
                    problems.append(f"{where} holds no {MODEL_FILENAME}: ignored")
            except OSError as exc:
                problems.append(f"{where} cannot be read: {exc.strerror}")
    return problems
