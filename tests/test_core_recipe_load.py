"""Recipe loading: extends, precedence, --set literals, ${VAR} expansion, defaults."""

from __future__ import annotations

import textwrap

import pytest
import tomli_w

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
