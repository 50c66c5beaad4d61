"""Prints the pip requirements of one image flavour, read from pyproject.toml (the one list of dependencies).

    python requirements.py PYPROJECT serve|train gpu|cpu

serve gpu: the serving stack with onnxruntime-gpu and the CUDA and cuDNN libraries from their pip
           packages (its [cuda,cudnn] extras), so the host needs only the NVIDIA driver.
serve cpu: the serving stack with the plain onnxruntime wheel (same API, about 20 MB instead of
           onnxruntime-gpu's 250 MB plus about 2.5 GB of CUDA libraries that a CPU host never loads).
train cpu: the serving stack (export checks parity with onnxruntime) plus the `train` extra,
           with tensorflow-cpu instead of tensorflow (about 270 MB instead of 620 MB).
train gpu: the same with tensorflow[and-cuda]; onnxruntime stays the CPU wheel (parity checks only).
"""

from __future__ import annotations

import re
import sys
import tomllib

NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?(.*)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def swap(requirement: str, replacements: dict[str, str]) -> str:
    """Replace the project name of a requirement, keeping its version specifier and markers."""
    match = NAME.match(requirement)
    if match is None:
        raise ValueError(f"cannot parse requirement {requirement!r}")
    name, _extras, rest = match.groups()
    new = replacements.get(canonical(name))
    return requirement if new is None else new + rest


def requirements(project: dict, image: str, flavour: str) -> list[str]:
    reqs = list(project["dependencies"])
    if image == "train":
        reqs += project["optional-dependencies"]["train"]
    replacements = {
        ("serve", "gpu"): {"onnxruntime-gpu": "onnxruntime-gpu[cuda,cudnn]"},
        ("serve", "cpu"): {"onnxruntime-gpu": "onnxruntime"},
        ("train", "cpu"): {"onnxruntime-gpu": "onnxruntime", "tensorflow": "tensorflow-cpu"},
        ("train", "gpu"): {"onnxruntime-gpu": "onnxruntime", "tensorflow": "tensorflow[and-cuda]"},
    }[(image, flavour)]
    return [swap(r, replacements) for r in reqs]


def main(argv: list[str]) -> None:
    if len(argv) != 3 or argv[1] not in ("serve", "train") or argv[2] not in ("gpu", "cpu"):
        sys.exit(__doc__)
    with open(argv[0], "rb") as f:
        project = tomllib.load(f)["project"]
    print("\n".join(requirements(project, argv[1], argv[2])))


if __name__ == "__main__":
    main(sys.argv[1:])
