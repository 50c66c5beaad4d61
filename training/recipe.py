"""Recipes: named TOML files of `python -m training train` options, with the figure each is known to reach.

A recipe file has two tables. `[recipe]` says what it is for and what it is known to reach:
`description`, `known_figure`, `figure_source` and `measured_here` (whether the figure was
measured by this project's own command, or comes from elsewhere). `[train]` holds train
options by their long names without the dashes (`batch-size = 128`, `flip = "horizontal"`,
`image-size = "224x224"`). Options given on the command line win over the recipe's.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import TrainingError

RECIPE_KEYS = {"description", "known_figure", "figure_source", "measured_here"}
NOT_IN_RECIPES = {"recipe", "help"}


@dataclass(frozen=True)
class Recipe:
    name: str
    path: str  # where it was read from: a bundled file or the user's own
    content: str  # the file's text, kept in run.json as it was
    train: dict[str, object]  # option name (dashes) to value
    description: str = ""
    known_figure: str = ""
    figure_source: str = ""
    measured_here: bool = False

    def argv(self) -> list[str]:
        """The [train] table as command-line options, to be parsed before (so: under) the user's own."""
        args: list[str] = []
        for key, value in self.train.items():
            option = f"--{key}"
            if isinstance(value, bool):
                if value:
                    args.append(option)
            elif isinstance(value, list):
                args += [option, "x".join(str(v) for v in value)]
            else:
                args += [option, str(value)]
        return args

    def settings(self) -> str:
        """The [train] table on one line, for the training log."""
        return "; ".join(f"{key}={value}" for key, value in self.train.items())


def bundled_folder():
    """The recipes that ship with the package."""
    return resources.files("training") / "recipes"


def bundled() -> dict[str, Recipe]:
    """Every bundled recipe by name, sorted."""
    found = {}
    for entry in sorted(bundled_folder().iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            name = entry.name.removesuffix(".toml")
            found[name] = parse(entry.read_text(encoding="utf-8"), name, f"bundled: training/recipes/{entry.name}")
    return found


def load(name_or_path: str) -> Recipe:
    """A bundled recipe by name, or the user's own recipe file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.is_file():
        if not path.is_file():
            raise TrainingError(f"recipe file {path} does not exist")
        return parse(path.read_text(encoding="utf-8"), path.stem, str(path.resolve()))
    recipes = bundled()
    if name_or_path not in recipes:
        raise TrainingError(
            f"unknown recipe {name_or_path!r}; bundled recipes: {', '.join(recipes)} "
            "(`python -m training recipes` lists them), or give the path of your own .toml file"
        )
    return recipes[name_or_path]


def parse(text: str, name: str, path: str) -> Recipe:
    """A recipe from TOML text; its shape is checked here, its option values by the train command's parser."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TrainingError(f"recipe {name} ({path}) is not valid TOML: {exc}") from None
    unknown_tables = sorted(set(data) - {"recipe", "train"})
    if unknown_tables:
        raise TrainingError(f"recipe {name} ({path}) has unknown table(s) {unknown_tables}: a recipe holds [recipe] and [train]")
    about = data.get("recipe", {})
    train = data.get("train")
    if not isinstance(train, dict) or not train:
        raise TrainingError(f"recipe {name} ({path}) has no [train] table of options")
    unknown = sorted(set(about) - RECIPE_KEYS)
    if unknown:
        raise TrainingError(f"recipe {name} ({path}): unknown key(s) {unknown} in [recipe]; it takes {sorted(RECIPE_KEYS)}")
    for key, value in train.items():
        if key in NOT_IN_RECIPES:
            raise TrainingError(f"recipe {name} ({path}): {key!r} cannot be set inside a recipe")
        if isinstance(value, dict) or (isinstance(value, list) and not all(isinstance(v, int) for v in value)):
            raise TrainingError(f"recipe {name} ({path}): {key} = {value!r} is not an option value")
    if not isinstance(about.get("measured_here", False), bool):
        raise TrainingError(f"recipe {name} ({path}): measured_here is true or false")
    return Recipe(
        name=name,
        path=path,
        content=text,
        train=dict(train),
        description=str(about.get("description", "")),
        known_figure=str(about.get("known_figure", "")),
        figure_source=str(about.get("figure_source", "")),
        measured_here=bool(about.get("measured_here", False)),
    )
