"""A key the original minFM (or an earlier version) named otherwise is answered with its
name here (``former_names``, docs/plugins.md), not with a did-you-mean guess: the seed's
`max_lr` was told "did you mean 'min_lr'?"."""

from __future__ import annotations

import typing

import attrs
import pytest

from minfm_core.cli.main import main
from minfm_core.recipe.schema import Recipe, Spec
from minfm_core.registry import KINDS, get_registry
from test_validation_ranges import RECIPE, SECTIONS


def _owners():
    """(where, config class) for every section and registered component config that renames keys."""
    reg = get_registry()
    owners = [(f"[{name}]", cls) for name, cls in SECTIONS.items()]
    owners += [(f"{kind} {comp.name}", comp.config) for kind in KINDS if kind != "source"
               for comp in reg.components(kind) if comp.config is not None]
    return [(where, cls) for where, cls in owners if getattr(cls, "former_names", None)]


def _reaches_a_key(path: str) -> bool:
    """Whether a whole recipe path leads to a field, or into a component slot (whose keys
    depend on the component chosen)."""
    cls = Recipe
    for part in path.split("."):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return False
        cls = hints[part]
        if cls is Spec or not attrs.has(cls):
            return True  # a component's table, or a value
    return True


OWNERS = _owners()


def test_renames_are_declared_where_the_seeds_keys_went():
    where = {w for w, _ in OWNERS}
    assert {"[train]", "[sample]", "balancer knapformer", "dataset imagenet"} <= where


@pytest.mark.parametrize("where, cls", OWNERS, ids=[w for w, _ in OWNERS])
def test_every_former_name_leads_to_a_key(where, cls):
    fields = attrs.fields_dict(cls)
    for old, new in cls.former_names.items():
        assert old not in fields, f"{where}: {old!r} is a key of its own; a rename would hide it"
        assert new in fields or ("." in new and _reaches_a_key(new)), f"{where}: {old!r} -> {new!r} names no key"


@pytest.mark.parametrize("setting, line", [
    ("train.max_lr=1e-4", "train: unknown key 'max_lr' (now 'lr') (from --set train.max_lr)"),
    ("train.exp_dir=\"x\"", "train: unknown key 'exp_dir' (now 'run.exp_dir') (from --set train.exp_dir)"),
    ("sample.cfg_scale=2.0", "sample: unknown key 'cfg_scale' (now 'sample.guidance.scale') (from --set sample.cfg_scale)"),
    # a plugin's config, as a third party declares it
    ('balancer={name = "knapformer", dit_balancer_specs = "g1n1"}',
     "balancer: unknown key 'dit_balancer_specs' (now 'bags') (from --set balancer)"),
    # where the seed set them: on the default (none) balancer, in [train], in the ImageNet data
    ("balancer.use_dit_balancer=true", "balancer: unknown key 'use_dit_balancer' (now 'balancer.name') "
                                       "(from --set balancer.use_dit_balancer)"),
    ('train.wandb_project="minFM"', "train: unknown key 'wandb_project' (now 'logging.loggers') (from --set train.wandb_project)"),
    # a key never renamed keeps its guess
    ("train.max_lrr=1e-4", "train: unknown key 'max_lrr' (did you mean 'min_lr'?) (from --set train.max_lrr)"),
])
def test_a_former_key_is_answered_with_its_name_here(setting, line, capsys):
    assert main(["check", RECIPE, "--set", setting]) == 2
    assert capsys.readouterr().err.strip() == f"minfm: error: {RECIPE}: {line}"

