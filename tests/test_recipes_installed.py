"""Shipped recipes travel with a real installation: ``pip install .`` puts recipes/ in
site-packages as ``minfm_recipes``, and ``minfm:NAME.toml`` finds them from any folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, site_without_minfm


@pytest.mark.slow
def test_pip_install_ships_the_recipes(tmp_path):
    src = tmp_path / "src"  # built from a copy: the build leaves build/ and *.egg-info behind
    for part in ("minfm_core", "plugins", "hub", "apps", "recipes"):
        shutil.copytree(ROOT / part, src / part, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", str(src), "--no-deps", "--no-build-isolation", "--target", str(target),
         "-q", "--disable-pip-version-check"],
        check=True, capture_output=True, text=True,
    )
    shipped = sorted(p.name for p in (ROOT / "recipes").glob("*.toml"))
    assert sorted(p.name for p in (target / "minfm_recipes").glob("*.toml")) == shipped
    assert (target / "minfm_recipes" / "prompts" / "imagenet_examples.txt").is_file()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "mine.toml").write_text('extends = "minfm:quickstart.toml"\n[train]\nmax_steps = 3\n')
    env = {"PYTHONPATH": f"{target}{os.pathsep}{site_without_minfm(tmp_path)}", "PATH": os.environ["PATH"]}

    def minfm(*args):
        return subprocess.run([sys.executable, "-S", "-m", "minfm_core.cli.main", *args],
                              capture_output=True, text=True, cwd=elsewhere, env=env)

    where = subprocess.run(
        [sys.executable, "-S", "-c", "import minfm_core; from minfm_core.recipe.load import shipped_recipes;"
         "print(minfm_core.__file__); print(shipped_recipes())"],
        capture_output=True, text=True, cwd=elsewhere, env=env, check=True,
    ).stdout.split()
    assert where == [str(target / "minfm_core" / "__init__.py"), str(target / "minfm_recipes")]
    res = minfm("check", "minfm:quickstart.toml")
    assert res.returncode == 0, res.stderr
    assert "minfm:quickstart.toml: ok (job = 'train')" in res.stdout
    res = minfm("check", "mine.toml", "--print")
    assert res.returncode == 0, res.stderr
    assert "max_steps = 3" in res.stdout and 'name = "flux"' in res.stdout
