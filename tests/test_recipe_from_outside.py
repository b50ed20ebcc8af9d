"""A recipe lying in a downloaded folder (a Hub snapshot, a ``hub pull --local-dir``, at any
depth below it) is read as data by every command, ``minfm run`` and ``check`` included: no
``${VAR}`` expansion, and it may not choose where a job writes."""

from __future__ import annotations

import json

import pytest

from minfm_core.recipe import load_recipe
from minfm_core.safepath import SOURCE_MARKER, came_from_outside

RECIPE = """extends = "minfm:quickstart.toml"
[run]
exp_dir = "{exp_dir}"
[sample]
prompts = ["${{MINFM_TEST_SECRET}}"]
"""


def pulled(tmp_path, depth: int, exp_dir: str = "experiments/pulled"):
    top = tmp_path / "pulled"
    folder = top.joinpath(*[f"d{i}" for i in range(depth)])
    folder.mkdir(parents=True)
    (top / SOURCE_MARKER).write_text(json.dumps({"repo_id": "org/m", "commit": "0" * 40}))
    recipe = folder / "recipe.toml"
    recipe.write_text(RECIPE.format(exp_dir=exp_dir))
    return recipe


@pytest.mark.parametrize("depth", [0, 1, 4, 9])
def test_a_pulled_recipe_is_never_expanded_at_any_depth(tmp_path, monkeypatch, depth):
    monkeypatch.setenv("MINFM_TEST_SECRET", "hunter2")
    recipe = pulled(tmp_path, depth)
    assert came_from_outside(recipe.parent)
    resolved = load_recipe(recipe)  # no untrusted_root given: found from the marker
    assert resolved.recipe.sample.prompts == ("${MINFM_TEST_SECRET}",)
    assert resolved.outside == str(tmp_path / "pulled" / "/".join(f"d{i}" for i in range(depth))).rstrip("/")


def test_the_users_own_recipe_is_still_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("MINFM_TEST_SECRET", "hunter2")
    recipe = tmp_path / "mine.toml"
    recipe.write_text(RECIPE.format(exp_dir="experiments/mine"))
    resolved = load_recipe(recipe)
    assert resolved.recipe.sample.prompts == ("hunter2",) and resolved.outside is None


@pytest.mark.parametrize("exp_dir", ["/tmp/elsewhere", "~/runs/x", "../../up", "a/../../up"])
def test_check_refuses_a_pulled_recipes_run_folder_outside_the_current_one(tmp_path, monkeypatch, capsys, exp_dir):
    from minfm_core.cli.main import main

    recipe = pulled(tmp_path, 2, exp_dir)
    monkeypatch.chdir(tmp_path)
    assert main(["check", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"run.exp_dir: {exp_dir!r} leaves the current folder" in err and "--set run.exp_dir=DIR" in err
    # the user's own choice is trusted
    assert main(["check", str(recipe), "--set", f"run.exp_dir={json.dumps(str(tmp_path / 'runs'))}"]) == 0, \
        capsys.readouterr().err


@pytest.mark.slow
def test_run_of_a_pulled_recipe_writes_the_reference_not_the_secret(minfm, tmp_path):
    recipe = pulled(tmp_path, 1)
    r = minfm("run", str(recipe), "--set", "train.max_steps=1", "--set", "train.sample_every=0",
              "--set", "train.val_every=0", "--set", "train.ckpt_every=0", "--set", "model.denoiser.compile=false",
              cwd=tmp_path, env={"MINFM_TEST_SECRET": "hunter2"})
    assert r.returncode == 0, r.stderr[-2000:]
    written = (tmp_path / "experiments" / "pulled" / "recipe.toml").read_text()
    assert "${MINFM_TEST_SECRET}" in written and "hunter2" not in written


def test_a_recipe_that_extends_a_pulled_one_reads_that_one_as_from_outside(tmp_path, monkeypatch, capsys):
    """`extends = "pulled/recipe.toml"` in the user's own recipe read the pulled one as the
    user's: its `${SECRET}` was expanded into the run's recipe.toml (which a push publishes),
    its run.exp_dir chose where the run wrote, and its files could lie anywhere. Now only what
    the user's own files (and --set) give is trusted; the rest is held to the rules of
    a recipe from outside, and references in it are the repo's (beside its recipe)."""
    from minfm_core.cli.main import main

    monkeypatch.setenv("MINFM_TEST_SECRET", "hunter2")
    monkeypatch.chdir(tmp_path)
    recipe = pulled(tmp_path, 0, "/tmp/elsewhere")
    (recipe.parent / "prompts.txt").write_text("a red circle\n")
    mine = tmp_path / "mine.toml"
    mine.write_text(f'extends = "{recipe}"\n[run]\n[train]\nmax_steps = 3\n[sample]\nneg_prompt = "${{MINFM_TEST_SECRET}}"\n')
    assert main(["check", str(mine)]) == 2  # (an empty [run] of the user's vouches for none of the repo's run.*)
    assert "run.exp_dir: '/tmp/elsewhere' leaves the current folder" in capsys.readouterr().err
    mine.write_text(mine.read_text().replace("[run]\n", '[run]\nexp_dir = "/tmp/mine"\n'))
    resolved = load_recipe(mine)
    assert resolved.outside == str(recipe.parent)
    assert resolved.recipe.sample.prompts == ("${MINFM_TEST_SECRET}",)  # the repo's: as written
    assert resolved.recipe.sample.neg_prompt == "hunter2"  # the user's own: expanded
    assert resolved.recipe.run.exp_dir == "/tmp/mine" and resolved.recipe.train.max_steps == 3
    # a file the repo names lies beside its recipe (not beside the user's), and may not leave it
    recipe.write_text(recipe.read_text() + 'prompt_file = "prompts.txt"\n')
    assert load_recipe(mine).recipe.sample.prompt_file == str(recipe.parent / "prompts.txt")
    recipe.write_text(recipe.read_text().replace('"prompts.txt"', '"/etc/hostname"'))
    with pytest.raises(Exception, match=r"sample.prompt_file: refusing path '/etc/hostname': it leaves"):
        load_recipe(mine)
