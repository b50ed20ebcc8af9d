"""FLUX config: flavors give defaults, recipes override, errors name the field."""

import pytest

from minfm_core.config import structure
from minfm_core.errors import RecipeError
from minfm_core.registry import get_registry
from minfm_plugins.flux.config import FLAVORS, FluxConfig


def test_flavor_fills_unset_fields_and_overrides_win():
    cfg = structure({"flavor": "flux-tiny", "d_img": 12, "guidance_embed": True}, FluxConfig, "model.denoiser")
    assert (cfg.d_model, cfg.d_head, cfg.n_heads, cfg.rope_axes) == (1024, 64, 16, (8, 28, 28))
    assert (cfg.d_img, cfg.guidance_embed, cfg.d_txt, cfg.d_vec) == (12, True, 768, 768)


def test_every_flavor_is_complete_and_consistent():
    for name, values in FLAVORS.items():
        cfg = FluxConfig(flavor=name)
        assert sum(cfg.rope_axes) == cfg.d_head, name
        assert {k: getattr(cfg, k) for k in values} == values


def test_no_flavor_means_every_dimension_is_required():
    full = dict(FLAVORS["flux-debug"])
    assert FluxConfig(**full).d_model == 128
    full.pop("d_txt")
    with pytest.raises(RecipeError, match="model.denoiser: no flavor given, so these must be set: d_txt"):
        structure({k: list(v) if isinstance(v, tuple) else v for k, v in full.items()}, FluxConfig, "model.denoiser")


@pytest.mark.parametrize(
    "table,message",
    [
        ({"flavor": "flux-tny"}, "model.denoiser.flavor: expected one of 'flux-debug', 'flux-tiny', 'flux-dev', got 'flux-tny' (did you mean 'flux-tiny'?)"),
        ({"flavor": "flux-tiny", "d_hed": 64}, "model.denoiser: unknown key 'd_hed' (did you mean 'd_head'?)"),
        ({"flavor": "flux-tiny", "d_head": "64"}, "model.denoiser.d_head: expected int, got '64'"),
        ({"flavor": "flux-tiny", "d_head": 60}, "model.denoiser: d_model 1024 is not a multiple of d_head 60"),
        ({"flavor": "flux-tiny", "rope_axes": [8, 28, 27]}, "rope_axes (8, 28, 27) must be 3 positive even numbers"),
    ],
)
def test_errors_name_the_field(table, message):
    with pytest.raises(RecipeError) as err:
        structure(table, FluxConfig, "model.denoiser")
    assert message in str(err.value)


def test_registered_with_config_and_attention_backends():
    reg = get_registry()
    comp = reg.get("denoiser", "flux")
    assert comp.config is FluxConfig and comp.plugin == "flux"
    assert reg.get("attention", "auto").plugin == "attention"
