"""The package layers hold: import-linter's contracts in pyproject.toml pass, and they do catch a wrong import."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import ROOT

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def test_every_layer_contract_is_kept():
    result = subprocess.run([str(LINT_IMPORTS)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_core_module_that_imports_the_http_stack_breaks_the_contract(tmp_path):
    # A stand-in core package with one wrong import, checked by the same kind of contract.
    package = tmp_path / "fakecore"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "imaging.py").write_text("import fastapi\n")
    config = tmp_path / "contracts.toml"
    config.write_text(
        textwrap.dedent(
            """
            [tool.importlinter]
            root_packages = ["fakecore"]
            include_external_packages = true

            [[tool.importlinter.contracts]]
            name = "core imports no framework"
            type = "forbidden"
            source_modules = ["fakecore"]
            forbidden_modules = ["fastapi"]
            """
        )
    )
    result = subprocess.run(
        [str(LINT_IMPORTS), "--config", str(config), "--no-cache"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0, result.stdout
    assert "fakecore.imaging -> fastapi" in result.stdout
