"""Recipes: named TOML files that `python -m training train --recipe` runs, overridable, kept in the records."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from training import recipe as recipes
from training.__main__ import _config, _parse_train, main
from training.errors import TrainingError

PROMISED = {"digits", "mnist", "cifar10", "cifar100", "weather-densenet201", "weather-efficientnetb7", "fingers", "generated"}

# A user's own recipe: a tiny scratch model on the generated set, trained in seconds.
OWN_RECIPE = """\
# My first recipe.
[recipe]
description = "digits_cnn on three generated classes"
known_figure = "none yet"
figure_source = "none known"

[train]
model = "digits_cnn"
dataset = "generated"
image-size = "8x8"
color-mode = "grayscale"
generated-classes = 3
generated-per-class = 10
epochs = 3
batch-size = 4
"""


def test_the_issue_s_recipes_are_bundled_and_each_states_its_figure_and_where_it_comes_from():
    bundled = recipes.bundled()
    assert PROMISED <= set(bundled)
    for found in bundled.values():
        assert found.description and found.figure_source, found.name
        if found.measured_here:
            assert found.known_figure and found.figure_source.startswith("measured here"), found.name
        else:
            assert not found.figure_source.startswith("measured here"), found.name
    assert "90 %" in bundled["cifar10"].known_figure and "0.99" in bundled["cifar10"].known_figure
    assert bundled["cifar10"].train["learning-rate"] == 0.002 and bundled["cifar10"].train["batch-size"] == 128
    assert "62 %" in bundled["cifar100"].known_figure
    assert "84 %" in bundled["weather-densenet201"].known_figure and "76 %" in bundled["weather-efficientnetb7"].known_figure
    assert "99" in bundled["mnist"].known_figure


@pytest.mark.parametrize("name", sorted(PROMISED))
def test_every_bundled_recipe_is_a_valid_set_of_train_options(name):
    args, record = _parse_train(["train", "--recipe", name])
    config = _config(args)
    config.check()
    assert record["name"] == name and record["overridden"] == {}
    assert config.model == recipes.bundled()[name].train["model"]


def test_the_recipes_command_lists_them_and_prints_one_in_full(capsys):
    main(["recipes"])
    listing = capsys.readouterr().out
    for name in PROMISED:
        assert f"  {name} " in listing
    assert "known figure: about 90 % test accuracy, AUC 0.99 (not measured here)" in listing
    assert "--recipe path/to/recipe.toml" in listing
    main(["recipes", "cifar10"])
    assert "learning-rate = 0.002" in capsys.readouterr().out


def test_command_line_options_override_the_recipe_and_the_record_says_which():
    args, record = _parse_train(["train", "--recipe", "cifar10", "--epochs", "3", "--flip", "none"])
    assert args.epochs == 3 and args.flip == "none" and args.learning_rate == 0.002 and args.batch_size == 128
    assert record["overridden"] == {"epochs": 3, "flip": "none"}
    assert record["content"] == (ROOT / "training" / "recipes" / "cifar10.toml").read_text()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[train]\nmodel = 'digits_cnn'\nwings = 3\n", r"recipe bad \(.*bad.toml\): unrecognized arguments: --wings"),
        ("[train]\nepochs = 'many'\n", r"recipe bad .*--epochs: invalid int value: 'many'"),
        ("[train\nepochs = 1\n", r"recipe bad .* is not valid TOML"),
        ("[recipe]\ndescription = 'no options'\n", r"recipe bad .* has no \[train\] table"),
        ("[train]\nrecipe = 'digits'\n", r"'recipe' cannot be set inside a recipe"),
    ],
    ids=["unknown-option", "bad-value", "bad-toml", "no-train-table", "nested-recipe"],
)
def test_a_bad_recipe_file_is_refused_naming_the_recipe(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(TrainingError, match=message):
        _parse_train(["train", "--recipe", str(path)])


def test_an_unknown_recipe_names_the_bundled_ones(tmp_path):
    with pytest.raises(TrainingError, match=r"unknown recipe 'cifar11'; bundled recipes: .*cifar10"):
        recipes.load("cifar11")
    with pytest.raises(TrainingError, match="recipe file .*missing.toml does not exist"):
        recipes.load(str(tmp_path / "missing.toml"))


def test_a_users_own_recipe_trains_with_overrides_and_run_json_and_the_log_keep_it(tmp_path):
    own = tmp_path / "mine.toml"
    own.write_text(OWN_RECIPE)
    run_dir, ledger = tmp_path / "run", tmp_path / "ledger.csv"
    result = subprocess.run(
        [sys.executable, "-m", "training", "train", "--recipe", str(own), "--epochs", "1", "--run-dir", str(run_dir),
         "--ledger", str(ledger)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = result.stdout.splitlines()[:2]
    assert first == f"recipe mine ({own.resolve()}), the command line overriding epochs=1"
    assert second.startswith("digits_cnn on generated, plan: up to 1 epochs")
    record = json.loads((run_dir / "run.json").read_text())
    assert record["recipe"]["name"] == "mine" and record["recipe"]["content"] == OWN_RECIPE
    assert record["recipe"]["overridden"] == {"epochs": 1} and record["recipe"]["options"]["epochs"] == 3
    assert record["epochs_run"] == 1 and record["input_shape"] == [8, 8, 1] and record["labels"] == ["class0", "class1", "class2"]
    with open(ledger) as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["recipe"] == "mine (overridden: epochs=1)" and "generated-classes=3" in row["recipe_content"]
