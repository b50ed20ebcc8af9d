"""Recipe loading: extends, precedence, --set literals, ${VAR} expansion, defaults."""

from __future__ import annotations

import textwrap

import pytest
import tomli_w

from minfm_core.errors import RecipeError
from minfm_core.recipe import load_recipe_dict, resolve_recipe
from minfm_core.recipe.load import parse_override
from minfm_core.recipe.toml import tomllib


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_extends_deep_merges_child_wins(tmp_path):
    write(tmp_path / "base" / "base.toml", """
        [train]
        max_steps = 10
        lr = 0.1
        [model.denoiser]
        name = "flux"
        d_head = 64
    """)
    child = write(tmp_path / "child.toml", """
        extends = "base/base.toml"
        [train]
        lr = 0.5
    """)
    data = load_recipe_dict(child)
    assert data == {"train": {"max_steps": 10, "lr": 0.5}, "model": {"denoiser": {"name": "flux", "d_head": 64}}}


def test_precedence_cli_over_file_over_extends(tmp_path):
    write(tmp_path / "base.toml", "[train]\nmax_steps = 1\nlr = 1.0\nbatch_size = 1\n")
    child = write(tmp_path / "c.toml", 'extends = "base.toml"\n[train]\nmax_steps = 2\nlr = 2.0\n')
    data = load_recipe_dict(child, ["train.max_steps=3"])
    assert data["train"] == {"max_steps": 3, "lr": 2.0, "batch_size": 1}


@pytest.mark.parametrize(
    ("text", "keys", "value"),
    [
        ("a.b=3", ["a", "b"], 3),
        ("a=1e-4", ["a"], 1e-4),
        ("a=true", ["a"], True),
        ('a="quoted"', ["a"], "quoted"),
        ("a=[1, 2]", ["a"], [1, 2]),
        ("a=experiments/run 1", ["a"], "experiments/run 1"),  # not TOML: a bare string
        ("a.b-c_d=x", ["a", "b-c_d"], "x"),
        ("a={name = 'flux'}", ["a"], {"name": "flux"}),
    ],
)
def test_set_values_are_toml_literals(text, keys, value):
    assert parse_override(text) == (keys, value)


def test_set_creates_tables(tmp_path):
    p = write(tmp_path / "r.toml", "")
    assert load_recipe_dict(p, ["balancer.name=knapformer", "balancer.bags=g1n2"]) == {
        "balancer": {"name": "knapformer", "bags": "g1n2"}
    }


def test_env_expansion(tmp_path, monkeypatch):
    monkeypatch.setenv("MINFM_TEST_DIR", "/data")
    monkeypatch.delenv("MINFM_TEST_NOPE", raising=False)
    p = write(tmp_path / "r.toml", """
        [run]
        exp_dir = "${MINFM_TEST_DIR}/runs/${MINFM_TEST_NOPE:-default}"
    """)
    assert load_recipe_dict(p)["run"]["exp_dir"] == "/data/runs/default"


def test_defaults_and_resolved_round_trip(toy_registry, tmp_path):
    raw = {"model": {"denoiser": {"name": "flux", "d_head": 64}}, "train": {"max_steps": 7}}
    resolved = resolve_recipe(raw, registry=toy_registry)
    assert resolved.recipe.train.max_steps == 7
    assert resolved.recipe.train.adam_betas == (0.9, 0.95)
    assert resolved["flow.time_sampler"].component.name == "logit_normal"
    assert resolved.config("flow.time_sampler").sigma == 1.0
    out = resolved.to_dict()
    assert out["model"]["denoiser"] == {"name": "flux", "d_img": 64, "d_head": 64, "rope_axes": [8, 28, 28], "act": "gelu"}
    # The written recipe reads back to the same resolution.
    again = resolve_recipe(tomllib.loads(tomli_w.dumps(out)), registry=toy_registry)
    assert again.slots == resolved.slots
    assert again.to_dict() == out


def test_shorthand_component_string(toy_registry):
    resolved = resolve_recipe({"model": {"denoiser": "flux"}, "flow": {"time_sampler": "uniform"}}, registry=toy_registry)
    assert resolved["flow.time_sampler"].component.name == "uniform"
    assert resolved["flow.time_sampler"].config is None


def test_loggers_are_component_tables(toy_registry):
    raw = {"model": {"denoiser": "flux"}, "logging": {"loggers": [{"name": "console"}, {"name": "jsonl"}]}}
    resolved = resolve_recipe(raw, registry=toy_registry)
    assert [resolved[f"logging.loggers[{i}]"].component.name for i in range(2)] == ["console", "jsonl"]


def test_renaming_a_component_drops_its_old_options(tmp_path):
    write(tmp_path / "base.toml", '[parallel]\nname = "fsdp2"\nshard_size = 2\n[train]\nlr = 0.1\n')
    child = write(tmp_path / "c.toml", 'extends = "base.toml"\n[parallel]\nname = "none"\n')
    assert load_recipe_dict(child)["parallel"] == {"name": "none"}
    base = tmp_path / "base.toml"
    assert load_recipe_dict(base, ["parallel.name=none"])["parallel"] == {"name": "none"}
    assert load_recipe_dict(base, ["parallel.name=fsdp2"])["parallel"] == {"name": "fsdp2", "shard_size": 2}


# ---- arrays under `extends`: replaced whole, or appended with `key+` ------------------------

BASE_LOGGERS = """
    [[logging.loggers]]
    name = "console"
    [[logging.loggers]]
    name = "jsonl"
"""


def test_child_array_replaces_the_parents(tmp_path):
    write(tmp_path / "base.toml", BASE_LOGGERS)
    child = write(tmp_path / "c.toml", 'extends = "base.toml"\n[[logging.loggers]]\nname = "tensorboard"\n')
    assert load_recipe_dict(child)["logging"] == {"loggers": [{"name": "tensorboard"}]}


def test_plus_key_appends_to_the_parents_array(tmp_path):
    write(tmp_path / "base.toml", BASE_LOGGERS)
    mid = write(tmp_path / "mid.toml", 'extends = "base.toml"\n[[logging."loggers+"]]\nname = "tensorboard"\n')
    child = write(tmp_path / "c.toml", 'extends = "mid.toml"\n[logging]\n"loggers+" = [{name = "wandb"}]\n')
    names = [t["name"] for t in load_recipe_dict(child)["logging"]["loggers"]]
    assert names == ["console", "jsonl", "tensorboard", "wandb"]
    assert "loggers+" not in load_recipe_dict(mid)["logging"]


def test_set_appends_with_plus_equals(tmp_path):
    base = write(tmp_path / "base.toml", BASE_LOGGERS)
    data = load_recipe_dict(base, ['logging.loggers+=[{name = "tensorboard"}]'])
    assert [t["name"] for t in data["logging"]["loggers"]] == ["console", "jsonl", "tensorboard"]


@pytest.mark.parametrize(
    ("parent", "child", "message"),
    [
        ("", '[logging]\n"loggers+" = [{name = "x"}]\n',
         "logging.loggers+: nothing to append to: the recipe so far has no array at logging.loggers"),
        ("[logging]\nloggers = 3\n", '[logging]\n"loggers+" = [{name = "x"}]\n',
         "logging.loggers+: nothing to append to: the recipe so far has int 3, not an array at logging.loggers"),
        (BASE_LOGGERS, '[logging]\n"loggers+" = {name = "x"}\n', "logging.loggers+: expected an array to append, got dict"),
        (BASE_LOGGERS, '[logging]\nloggers = []\n"loggers+" = [{name = "x"}]\n',
         "logging.loggers+: set either 'loggers' (replace) or 'loggers+' (append), not both"),
    ],
)
def test_bad_appends_are_one_line_errors(tmp_path, parent, child, message):
    write(tmp_path / "base.toml", textwrap.dedent(parent))
    path = write(tmp_path / "c.toml", 'extends = "base.toml"\n' + child)
    with pytest.raises(RecipeError) as info:
        load_recipe_dict(path)
    assert str(info.value) == f"{path}: {message}"  # the file whose keys they are


def test_plus_key_without_extends_has_nothing_to_append_to(tmp_path):
    path = write(tmp_path / "alone.toml", '[logging]\n"loggers+" = [{name = "x"}]\n')
    with pytest.raises(RecipeError, match="nothing to append to"):
        load_recipe_dict(path)


# ---- shipped recipes: minfm:NAME.toml ---------------------------------------------------------


def test_extends_a_shipped_recipe_from_anywhere(tmp_path):
    from conftest import ROOT

    child = write(tmp_path / "far" / "away" / "mine.toml", 'extends = "minfm:quickstart.toml"\n[train]\nmax_steps = 7\n')
    data = load_recipe_dict(child)
    shipped = load_recipe_dict(ROOT / "recipes" / "quickstart.toml")
    assert data["train"] == {**shipped["train"], "max_steps": 7}
    assert load_recipe_dict("minfm:quickstart.toml") == shipped


def test_every_shipped_recipe_is_reachable_by_name():
    from conftest import ROOT
    from minfm_core.recipe.load import recipe_file

    names = sorted(p.name for p in (ROOT / "recipes").glob("*.toml"))
    assert names
    for name in names:
        assert recipe_file(f"minfm:{name}") == ROOT / "recipes" / name


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("minfm:quikstart.toml", "minfm:quikstart.toml: no such shipped recipe (did you mean 'quickstart.toml'?); shipped: "),
        ("minfm:../pyproject.toml", "minfm:../pyproject.toml: expected minfm:NAME.toml, a recipe shipped with minFM"),
        ("minfm:", "minfm:: expected minfm:NAME.toml, a recipe shipped with minFM"),
    ],
)
def test_unknown_shipped_recipe_is_a_clean_error(ref, message):
    with pytest.raises(RecipeError) as info:
        load_recipe_dict(ref)
    assert str(info.value).startswith(message)


def test_cli_runs_a_shipped_recipe_by_name(tmp_path):
    from conftest import minfm_in_process as minfm

    res = minfm("check", "minfm:quickstart.toml", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "minfm:quickstart.toml: ok (job = 'train')" in res.stdout
    res = minfm("run", "minfm:quikstart.toml", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "no such shipped recipe (did you mean 'quickstart.toml'?)" in res.stderr


def test_readme_recipe_examples_load(tmp_path):
    """README's two recipe blocks, as written: a child of a shipped recipe, and the append form."""
    import re

    from conftest import ROOT
    from minfm_core.recipe import load_recipe

    text = (ROOT / "README.md").read_text().split("## Recipes", 1)[1]
    child, append = re.findall(r"```toml\n(.*?)```", text, re.S)[:2]
    resolved = load_recipe(write(tmp_path / "child.toml", child))
    assert resolved.recipe.train.max_steps == 1000 and resolved.config("flow.time_sampler").sigma == 1.0
    data = load_recipe_dict(write(tmp_path / "more.toml", 'extends = "minfm:quickstart.toml"\n' + append))
    assert [t["name"] for t in data["logging"]["loggers"]] == ["console", "jsonl", "tensorboard"]


def test_shipped_file_references_work_from_anywhere(tmp_path):
    """``prompt_file = "minfm:prompts/..."`` names a file shipped with the recipes, whatever the cwd."""
    from conftest import ROOT
    from minfm_core.recipe import load_recipe

    child = write(tmp_path / "mine.toml", 'extends = "minfm:flux_tiny_imagenet.toml"\n')
    resolved = load_recipe(child)
    assert resolved.recipe.sample.prompt_file == str(ROOT / "recipes" / "prompts" / "imagenet_examples.txt")
    # A recipe from outside (a pulled repo) may name shipped files too: they are minFM's own.
    repo = tmp_path / "repo"
    write(repo / "recipe.toml", 'extends = "minfm:quickstart.toml"\n[sample]\nprompt_file = "minfm:prompts/parti_prompts.txt"\n')
    resolved = load_recipe(repo / "recipe.toml", untrusted_root=repo)
    assert resolved.recipe.sample.prompt_file == str(ROOT / "recipes" / "prompts" / "parti_prompts.txt")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("minfm:prompts/parti_prompt.txt", "sample.prompt_file: minfm:prompts/parti_prompt.txt: no such shipped file "
                                           "(did you mean 'prompts/parti_prompts.txt'?)"),
        ("minfm:../pyproject.toml", "sample.prompt_file: minfm:../pyproject.toml: expected minfm:NAME, a file shipped"),
        ("minfm:/etc/passwd", "sample.prompt_file: minfm:/etc/passwd: expected minfm:NAME, a file shipped"),
    ],
)
def test_bad_shipped_file_references_are_one_line_errors(tmp_path, value, message):
    from minfm_core.recipe import load_recipe

    child = write(tmp_path / "mine.toml", f'extends = "minfm:quickstart.toml"\n[sample]\nprompt_file = "{value}"\n')
    for kwargs in ({}, {"untrusted_root": tmp_path}):
        with pytest.raises(RecipeError) as info:
            load_recipe(child, **kwargs)
        assert message in str(info.value) and "\n" not in str(info.value)


MIX = """
extends = "minfm:quickstart_video.toml"
[data]
name = "mix"
[[data.sources]]
weight = 1.0
dataset = {{ name = "image_folder", root = "{root}", latents_dir = "{latents}" }}
[[data.sources]]
weight = 1.0
dataset = {{ name = "moving_shapes", frames = 5 }}
"""


def test_file_references_inside_nested_component_tables(tmp_path):
    """A mix's sources are whole dataset tables (field(component="dataset")): their file
    fields are contained in a recipe from outside, and minfm: names resolve in them."""
    from conftest import ROOT
    from minfm_core.recipe import load_recipe

    repo = tmp_path / "repo"
    (repo / "images").mkdir(parents=True)
    write(repo / "recipe.toml", MIX.format(root="/etc", latents="../../outside"))
    src = load_recipe(repo / "recipe.toml", untrusted_root=repo).config("data").sources[0].dataset
    # Training-only references that leave the folder are dropped, as at the top level.
    assert src["root"] == "" and src["latents_dir"] is None
    write(repo / "recipe.toml", MIX.format(root="images", latents="minfm:prompts"))
    src = load_recipe(repo / "recipe.toml", untrusted_root=repo).config("data").sources[0].dataset
    assert src["root"] == str(repo / "images") and src["latents_dir"] == str(ROOT / "recipes" / "prompts")
    # The same recipe trusted: paths stay as written (relative to the cwd), minfm: resolves.
    src = load_recipe(repo / "recipe.toml").config("data").sources[0].dataset
    assert src["root"] == "images" and src["latents_dir"] == str(ROOT / "recipes" / "prompts")


def test_a_bad_shipped_extends_names_the_file_that_says_it(tmp_path):
    path = write(tmp_path / "c.toml", 'extends = "minfm:nope.toml"\n')
    with pytest.raises(RecipeError) as info:
        load_recipe_dict(path)
    assert str(info.value).startswith(f"{path}: extends: minfm:nope.toml: no such shipped recipe")
