"""The `minfm` CLI contract: version, exit codes, one-line errors without tracebacks."""

from __future__ import annotations

import textwrap

import minfm_core


def test_version(minfm):
    res = minfm("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"minfm {minfm_core.__version__}"


def test_missing_recipe_exit_2(minfm, tmp_path):
    res = minfm("check", str(tmp_path / "nope.toml"))
    assert res.returncode == 2
    assert res.stderr.strip() == f"minfm: error: recipe file not found: {tmp_path / 'nope.toml'}"


def test_bad_set_exit_2(minfm, tmp_path):
    p = tmp_path / "r.toml"
    p.write_text("")
    res = minfm("check", str(p), "--set", "train.max_steps")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.strip() == (
        "minfm: error: --set 'train.max_steps': expected KEY=VALUE with a dotted key, e.g. train.max_steps=100"
    )


def test_recipe_errors_exit_2_with_paths(minfm, tmp_path):
    p = tmp_path / "r.toml"
    p.write_text(textwrap.dedent("""
        [model.denoiser]
        name = "flux"
        [train]
        max_step = 3
        lr = "x"
    """))
    res = minfm("check", str(p))
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        f"minfm: error: {p}: 2 problems",
        "  train.lr: expected float, got 'x'",
        "  train: unknown key 'max_step' (did you mean 'max_steps'?)",
    ]


def test_unknown_component_lists_installed(minfm, tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[model.denoiser]\nname = "fluxx"\n')
    res = minfm("check", str(p))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "model.denoiser.name: unknown denoiser 'fluxx'" in res.stderr
    assert "installed: " in res.stderr


def test_usage_error_exit_2(minfm):
    res = minfm("check")
    assert res.returncode == 2
    assert "minfm: error: the following arguments are required: recipe" in res.stderr


def test_unknown_command_exit_2(minfm):
    res = minfm("fly")
    assert res.returncode == 2 and "invalid choice: 'fly'" in res.stderr


def test_nproc_must_be_positive(minfm, tmp_path):
    p = tmp_path / "r.toml"
    p.write_text("")
    res = minfm("run", str(p), "--nproc-per-node", "0")
    assert res.returncode == 2 and "--nproc-per-node: expected a positive integer, got 0" in res.stderr
