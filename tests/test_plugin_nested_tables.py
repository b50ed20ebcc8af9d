"""A nested component table (``field(..., component=kind)``, as a mix's sources or a wrapper
denoiser's inner model) is resolved as a recipe slot is, in `minfm check` and before every run:
its name, and its options against that component's config, strictly, each problem by its
full path and under the recipe's name. Only ``name`` was checked (while file references were
mapped, without the recipe's name), so an unknown key or a wrong type passed the check and
crashed the run inside the plugin. A plugin builds the component with the documented
``get_registry().resolve_table(kind, table, path)``.
"""

from __future__ import annotations

import attrs
import pytest
import torch

from minfm_core import config, field, get_registry, hookimpl, protocols
from minfm_core.errors import RecipeError
from minfm_core.plugins import plugin
from minfm_core.validators import Range


@config
class MlpConfig:
    """A per-token linear map."""

    width: int = field(12, doc="token width", validator=Range(1, 64))


@config
class ScaledConfig:
    """Another denoiser, its velocity scaled."""

    inner: dict = field(attrs.Factory(lambda: {"name": "probe_mlp"}), doc="the wrapped denoiser's table",
                        component="denoiser")
    scale: float = field(1.0, doc="the scale", validator=Range(0, 10))


class Mlp(torch.nn.Module, protocols.Denoiser):
    def __init__(self, cfg):
        super().__init__()
        self.lin = torch.nn.Linear(cfg.width, cfg.width)

    def init_weights(self):
        pass

    def forward(self, img, img_pos, img_lens, txt, txt_lens, t, vec=None, guidance=None):
        return self.lin(img)


class Scaled(torch.nn.Module, protocols.Denoiser):
    def __init__(self, inner, scale):
        super().__init__()
        self.inner, self.scale = inner, scale

    def init_weights(self):
        self.inner.init_weights()

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs) * self.scale


def build_scaled(cfg, *, load_weights=True, attention=None, balancer=None):
    # the documented way (docs/plugins.md): the table as the recipe wrote it -> the component
    inner = get_registry().resolve_table("denoiser", cfg.inner, "model.denoiser.inner")
    return Scaled(inner.build(load_weights=load_weights, attention=attention, balancer=balancer), cfg.scale)


class Probe:
    @hookimpl
    def register_denoisers(self, register):
        register("probe_mlp", lambda cfg, *, load_weights=True, attention=None, balancer=None: Mlp(cfg), MlpConfig)
        register("probe_scaled", build_scaled, ScaledConfig)


def _load(denoiser: str):
    from engine_helpers import TINY
    from minfm_core.recipe import load_recipe

    return load_recipe(TINY, [f"model.denoiser={denoiser}"])


@pytest.mark.parametrize("inner, problem", [
    ('{name = "probe_mlp", widht = 8}', "model.denoiser.inner: unknown key 'widht' (did you mean 'width'?)"),
    ('{name = "probe_mlp", width = "8"}', "model.denoiser.inner.width: expected int, got '8'"),
    ('{name = "probe_mlp", width = 0}', "model.denoiser.inner.width: must be in [1, 64], got 0"),
    ('{width = 8}', "model.denoiser.inner.name: a denoiser table needs name = '<denoiser>', got nothing"),
    ('{name = "probe_mpl"}', "model.denoiser.inner.name: unknown denoiser 'probe_mpl' (did you mean 'probe_mlp'?)"),
    ('{name = "probe_scaled", inner = {name = "probe_mlp", widht = 8}}',
     "model.denoiser.inner.inner: unknown key 'widht' (did you mean 'width'?)"),
], ids=["unknown-key", "wrong-type", "out-of-range", "no-name", "unknown-name", "nested-twice"])
def test_a_bad_nested_table_is_a_recipe_error_by_its_full_path(inner, problem):
    from engine_helpers import TINY

    with plugin(Probe(), "probe"), pytest.raises(RecipeError) as info:
        _load(f'{{name = "probe_scaled", inner = {inner}}}')
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith(problem), info.value.problems
    assert str(info.value).startswith(f"{TINY}: model.denoiser.inner")  # under the recipe's name


def test_a_good_nested_table_builds_through_resolve_table():
    with plugin(Probe(), "probe"):
        resolved = _load('{name = "probe_scaled", scale = 0.5, inner = {name = "probe_mlp", width = 12}}')
        inner = get_registry().resolve_table("denoiser", resolved.config("model.denoiser").inner, "x")
        assert inner.component.name == "probe_mlp" and inner.config == MlpConfig(width=12) and inner.path == "x"
        model = resolved.build("model.denoiser", load_weights=False)
    assert isinstance(model, Scaled) and model.inner.lin.in_features == 12
    assert resolved.to_dict()["model"]["denoiser"]["inner"] == {"name": "probe_mlp", "width": 12}  # as written


def test_resolve_table_refuses_what_is_not_a_table():
    with pytest.raises(RecipeError, match=r"^data.sources\[0\].dataset: expected a dataset table"):
        get_registry().resolve_table("dataset", "shapes", "data.sources[0].dataset")
