"""The shipped recipes pass `minfm check` and build what they promise (no data, no weights)."""

from __future__ import annotations

import re

import pytest

from conftest import ROOT, minfm_in_process


def params(stdout: str, slot: str) -> int:
    m = re.search(rf"^{re.escape(slot)}\s+.*?\s([\d,]+) \(", stdout, flags=re.M)
    assert m, stdout
    return int(m.group(1).replace(",", ""))


def test_quickstart_checks():
    res = minfm_in_process("check", str(ROOT / "recipes" / "quickstart.toml"))
    assert res.returncode == 0, res.stderr
    assert params(res.stdout, "model.denoiser") == 1_800_844


def test_flux_tiny_imagenet_checks_at_eight_ranks():
    res = minfm_in_process("check", str(ROOT / "recipes" / "flux_tiny_imagenet.toml"), "--world-size", "8")
    assert res.returncode == 0, res.stderr
    assert params(res.stdout, "model.denoiser") == 560_246_848  # the seed's flux-tiny
    assert params(res.stdout, "model.vae") == 83_819_683  # the FLUX autoencoder
    assert "data.root" in res.stderr and "does not exist" in res.stderr  # missing data: a warning only


@pytest.mark.parametrize("recipe", ["quickstart.toml", "flux_tiny_imagenet.toml", "flux_dev_inference.toml"])
def test_print_round_trips(recipe, tmp_path):
    """`--print` gives the fully resolved recipe, which itself checks."""
    res = minfm_in_process("check", str(ROOT / "recipes" / recipe), "--print")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "resolved.toml"
    out.write_text(res.stdout)
    again = minfm_in_process("check", str(out), "--print")
    assert again.returncode == 0, again.stderr
    assert again.stdout == res.stdout


@pytest.mark.parametrize("recipe, compiled", [
    ("recipes/quickstart.toml", True),  # wins end to end, compile time included
    ("recipes/quickstart_video.toml", False),  # half the tokens: the compile outweighs the faster steps
    ("recipes/flux_tiny_imagenet.toml", False),  # unmeasured on a GPU
    ("tests/recipes/tiny.toml", False),  # a few CI steps
])
def test_compile_is_on_only_where_it_wins(recipe, compiled):
    """The table in docs/performance.md ("Compiled blocks") is what the recipes resolve to."""
    from minfm_core.recipe import load_recipe

    assert load_recipe(ROOT / recipe).config("model.denoiser").compile is compiled
    assert f"| {recipe} | {'**on**' if compiled else 'off'} |" in (ROOT / "docs" / "performance.md").read_text()
