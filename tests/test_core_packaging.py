"""Packaging rules: namespaced import names, every package listed, core imports no plugin."""

from __future__ import annotations

import ast
from pathlib import Path

from minfm_core.recipe.toml import tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
FOLDERS = {"minfm_core": "minfm_core", "minfm_plugins": "plugins", "minfm_hub": "hub", "minfm_apps": "apps",
           "minfm_recipes": "recipes"}


def test_package_dir_mapping():
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == FOLDERS


def test_every_package_folder_is_listed():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = set()
    for name, folder in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    assert found == listed


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_bare_generic_imports():
    for folder in ("minfm_core", "plugins", "hub", "apps", "tests", "bench"):
        for py in (ROOT / folder).rglob("*.py"):
            for name in _imports(py):
                top = name.split(".")[0]
                assert top not in {"plugins", "hub", "apps"}, f"{py}: imports {name}"


def test_core_never_imports_plugins_hub_or_apps():
    for py in (ROOT / "minfm_core").rglob("*.py"):
        for name in _imports(py):
            assert name.split(".")[0] not in {"minfm_plugins", "minfm_hub", "minfm_apps"}, f"{py}: imports {name}"


def test_builtin_plugins_are_entry_points():
    eps = PYPROJECT["project"]["entry-points"]["minfm"]
    for name, module in eps.items():
        top = module.split(".")[0]
        assert top in {"minfm_plugins", "minfm_hub", "minfm_apps"}, (name, module)
