"""The `vae` plugin's registrations, the identity VAE, and building from a recipe table."""

from __future__ import annotations

import pytest
import torch

from minfm_core.config import structure
from minfm_core.errors import MinfmError, RecipeError
from minfm_core.registry import get_registry


def test_registered_with_documented_configs():
    reg = get_registry()
    assert {"flux_ae", "identity"} <= set(reg.names("vae"))
    for name in ("flux_ae", "identity"):
        comp = reg.get("vae", name)
        assert comp.plugin == "vae" and comp.doc
        import attrs

        assert all(a.metadata.get("doc") for a in attrs.fields(comp.config))


def test_identity_vae():
    comp = get_registry().get("vae", "identity")
    cfg = structure({"channels": 1}, comp.config)
    assert cfg.latent_channels == 1 and cfg.compression == (1, 1, 1)
    vae = comp.build(cfg)
    assert sum(p.numel() for p in vae.parameters()) == 0
    xs = [torch.rand(1, 1, 8, 12) * 2 - 1, torch.rand(1, 2, 4, 4) * 2 - 1]
    zs = vae.encode(xs)
    assert all(torch.equal(x, z) for x, z in zip(xs, zs))
    assert all(torch.equal(x, y) for x, y in zip(xs, vae.decode(zs)))
    with pytest.raises(MinfmError, match="expected \\(1, F, H, W\\)"):
        vae.encode([torch.zeros(3, 1, 4, 4)])


def test_flux_ae_config_is_strict():
    comp = get_registry().get("vae", "flux_ae")
    with pytest.raises(RecipeError, match="norm_num_groups: 32 does not divide block_out_channels \\[8, 16\\]"):
        structure({"block_out_channels": [8, 16]}, comp.config, path="model.vae")
    with pytest.raises(RecipeError, match="model.vae: unknown key 'latent_channel' \\(did you mean 'latent_channels'"):
        structure({"latent_channel": 4}, comp.config, path="model.vae")


@pytest.mark.parametrize("name", ["flux_ae", "wan"])
def test_resolution_levels_are_bounded(name):
    """Each level halves H and W: 9 levels (256x) or none is no VAE anyone has."""
    comp = get_registry().get("vae", name)
    field = "block_out_channels" if name == "flux_ae" else "dim_mult"
    for levels in ([], [1] * 9):
        with pytest.raises(RecipeError, match=f"model.vae.{field}: expected 1 to 8 levels, got {len(levels)}"):
            structure({field: levels, "pretrained": None}, comp.config, path="model.vae")


def test_flux_ae_builds_from_registry_on_meta_without_files():
    comp = get_registry().get("vae", "flux_ae")
    cfg = structure({"pretrained": "someone/uncached-repo/vae"}, comp.config)
    with torch.device("meta"):
        vae = comp.build(cfg, load_weights=False)
    assert vae.latent_channels == 16 and vae.compression == (1, 8, 8)
