"""The `wan` VAE (diffusers AutoencoderKLWan) on a tiny random config, against diffusers' own encode/decode."""

from __future__ import annotations

import json

import pytest
import torch

from minfm_core.config import structure
from minfm_core.errors import MinfmError, RecipeError
from minfm_core.registry import get_registry

TINY = {"pretrained": None, "base_dim": 8, "z_dim": 4, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1,
        "temperal_downsample": [False, True, True]}


def build(**kw):
    comp = get_registry().get("vae", "wan")
    torch.manual_seed(0)
    return comp.build(structure({**TINY, **kw}, comp.config, path="model.vae"))


def reference(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers alone: the posterior mean normalised as Wan pipelines do, and the decode of it."""
    m = vae.model
    mean = torch.tensor(m.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(m.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        z = m.encode(x).latent_dist.mode()
        x_rec = m.decode(z).sample.clamp(-1, 1)
    return (z - mean) / std, x_rec


def test_compression_and_latent_channels_follow_the_config():
    comp = get_registry().get("vae", "wan")
    default = structure({}, comp.config)
    assert default.compression == (4, 8, 8) and default.latent_channels == 16
    assert structure({**TINY, "temperal_downsample": [False, False, True]}, comp.config).compression == (2, 8, 8)


def test_clips_and_images_match_diffusers_and_keep_the_first_frame():
    vae = build()
    g = torch.Generator().manual_seed(1)
    clip = torch.rand(3, 9, 16, 24, generator=g) * 2 - 1
    image = torch.rand(3, 1, 16, 16, generator=g) * 2 - 1
    short = torch.rand(3, 5, 16, 16, generator=g) * 2 - 1
    zs = vae.encode([clip, image, short])
    assert [tuple(z.shape) for z in zs] == [(4, 3, 2, 3), (4, 1, 2, 2), (4, 2, 2, 2)]
    outs = vae.decode(zs)
    assert [tuple(o.shape) for o in outs] == [(3, 9, 16, 24), (3, 1, 16, 16), (3, 5, 16, 16)]
    diffs = []
    for x, z, o in zip((clip, image, short), zs, outs):
        z_ref, x_ref = reference(vae, x[None])
        diffs.append((float((z - z_ref[0]).abs().max()), float((o - x_ref[0]).abs().max())))
    assert all(dz < 1e-5 and dx < 1e-5 for dz, dx in diffs), diffs
    # causal: the first latent frame of a clip is the latent of its first frame alone
    first = vae.encode([clip[:, :1]])[0]
    assert torch.allclose(zs[0][:, :1], first, atol=1e-5)


def test_same_shapes_are_batched_and_results_do_not_depend_on_the_batch():
    vae = build()
    g = torch.Generator().manual_seed(2)
    a, b = (torch.rand(3, 5, 16, 16, generator=g) * 2 - 1 for _ in range(2))
    together = vae.encode([a, b])
    assert torch.allclose(together[1], vae.encode([b])[0], atol=1e-5)


def test_posterior_noise_comes_from_each_clips_own_generator():
    vae = build(sample_posterior=True)
    x, y = torch.rand(3, 5, 16, 16) * 2 - 1, torch.rand(3, 5, 16, 16) * 2 - 1
    z1 = vae.encode([x], generators=[torch.Generator().manual_seed(3)])[0]
    z2 = vae.encode([y, x], generators=[torch.Generator().manual_seed(9), torch.Generator().manual_seed(3)])[1]
    z3 = vae.encode([x], generators=[torch.Generator().manual_seed(4)])[0]
    torch.testing.assert_close(z1, z2, rtol=1e-5, atol=1e-5)  # the batch around it changes nothing
    assert not torch.equal(z1, z3)


def test_bad_inputs_are_clear_errors():
    vae = build()
    with pytest.raises(MinfmError, match="6 frames; this VAE needs 1 \\+ 4k frames"):
        vae.encode([torch.zeros(3, 6, 16, 16)])
    with pytest.raises(MinfmError, match="12x16 of item 0 is not a multiple"):
        vae.encode([torch.zeros(3, 1, 12, 16)])
    with pytest.raises(MinfmError, match="expected \\(4, F, H, W\\)"):
        vae.decode([torch.zeros(3, 1, 2, 2)])


def test_config_is_strict_and_names_paths():
    comp = get_registry().get("vae", "wan")
    with pytest.raises(RecipeError, match="model.vae.temperal_downsample: 2 flags for 3 downsampling levels"):
        structure({"temperal_downsample": [True, True]}, comp.config, path="model.vae")
    with pytest.raises(RecipeError, match="model.vae.base_dim: "):
        structure({"base_dim": 0}, comp.config, path="model.vae")


def test_loads_a_saved_diffusers_folder_and_checks_its_architecture(tmp_path):
    vae = build()
    vae.model.save_pretrained(tmp_path / "vae", safe_serialization=True)
    loaded = build(pretrained=str(tmp_path))  # a pipeline folder: its vae/
    x = torch.rand(3, 5, 16, 16) * 2 - 1
    assert torch.allclose(loaded.encode([x])[0], vae.encode([x])[0], atol=1e-6)
    with pytest.raises(MinfmError, match="base_dim = 8 \\(the config says 16\\)"):
        build(pretrained=str(tmp_path / "vae"), base_dim=16)
    cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderKLWan"


def test_meta_build_counts_parameters_without_files():
    comp = get_registry().get("vae", "wan")
    cfg = structure({"pretrained": "someone/uncached-repo"}, comp.config)
    with torch.device("meta"):
        vae = comp.build(cfg, load_weights=False)
    assert vae.latent_channels == 16 and vae.compression == (4, 8, 8)
    assert sum(p.numel() for p in vae.parameters()) > 100_000_000 // 2  # the full Wan 2.1 VAE (~127M)
