"""The plugin written from docs/plugins.md alone (tests/plugin_dists/minfm_docs_plugin) installs,
passes the conformance kit, adds its command, and trains 3 steps with and without the
knapformer balancer: on one process, and routing across 2 gloo processes."""

from __future__ import annotations

import ast
import csv
import importlib
import sys
from pathlib import Path

import pytest
from conftest import PLUGIN_DISTS, ROOT

PKG = PLUGIN_DISTS / "minfm_docs_plugin"
TINY = ROOT / "tests" / "recipes" / "tiny.toml"


def recipe(tmp_path: Path, balancer: str | None = None) -> Path:
    text = f"""extends = {str(TINY)!r}

[run]
exp_dir = {str(tmp_path / "exp")!r}

[model.denoiser]
name = "docs_mlp"

[flow.time_sampler]
name = "arcsine"

[train]
max_steps = 3
ckpt_every = 0

[[logging.loggers]]
name = "csv"
"""
    if balancer:
        text += f'\n[balancer]\nname = "{balancer}"\n'
    path = tmp_path / "third_party.toml"
    path.write_text(text)
    return path


def losses(exp: Path) -> list[float]:
    rows = list(csv.reader((exp / "metrics.csv").open()))
    assert [int(r[0]) for r in rows] == [1, 2, 3]
    return [float(r[1]) for r in rows]


def test_written_without_kwargs_catch_alls():
    for path in PKG.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.Lambda)):
                assert node.args.kwarg is None, f"{path.name}: **{node.args.kwarg.arg} in a signature"


@pytest.fixture
def docs_plugin(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN_DISTS))
    yield importlib.import_module("minfm_docs_plugin")
    for name in [m for m in sys.modules if m.startswith("minfm_docs_plugin")]:
        del sys.modules[name]


def test_its_components_pass_the_conformance_kit(docs_plugin, tmp_path):
    from minfm_core import testing

    with testing.isolated_registry(docs_plugin) as reg:
        assert reg.names("denoiser") == ["docs_mlp"] and reg.names("logger") == ["csv"]
        testing.check_time_sampler(reg.get("time_sampler", "arcsine"))
        testing.check_denoiser(reg.get("denoiser", "docs_mlp"))
        testing.check_logger(reg.get("logger", "csv"), run_dir=tmp_path)


def test_checks_lists_and_runs_its_command(minfm, example_plugin_env, tmp_path):
    r = minfm("check", str(recipe(tmp_path, "knapformer")), env=example_plugin_env)
    assert r.returncode == 0, r.stderr
    assert "docs_mlp" in r.stdout and "docs_plugin" in r.stdout
    r = minfm("arcsine-table", "--n", "3", env=example_plugin_env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0.000", "0.000", "0.500", "0.500", "1.000", "1.000"]
    r = minfm("arcsine-table", "--n", "1", env=example_plugin_env)
    assert r.returncode == 2 and "at least 2" in r.stderr and "Traceback" not in r.stderr


def test_trains_with_and_without_the_knapformer_balancer(minfm, example_plugin_env, tmp_path):
    runs = {}
    for balancer in (None, "knapformer"):
        folder = tmp_path / (balancer or "plain")
        folder.mkdir()
        r = minfm("run", str(recipe(folder, balancer)), env=example_plugin_env)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[balancer] = losses(folder / "exp")
        assert (folder / "exp" / "metrics.done").exists()  # close() was called
    # On one process the balancer routes every sample in place: the same run exactly.
    assert runs[None] == runs["knapformer"]


def test_trains_with_knapformer_across_two_processes(minfm, example_plugin_env, tmp_path):
    r = minfm(
        "run", str(recipe(tmp_path, "knapformer")), "--nproc-per-node", "2",
        "--set", "balancer.bags=g1n2", "--set", "parallel.name=fsdp2", env=example_plugin_env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    first, *_, last = losses(tmp_path / "exp")
    assert last < first
