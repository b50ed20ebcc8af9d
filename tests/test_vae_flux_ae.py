"""FLUX VAE wrapper: mixed sizes, scale/shift exactly once, equality with diffusers, BFL single file."""

from __future__ import annotations

import re

import pytest
import torch

from minfm_core.errors import MinfmError
from minfm_plugins.vae.configs import FluxAEConfig
from minfm_plugins.vae.flux_ae import build_flux_ae, diffusers_config

TINY = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4, dtype="fp32")


def tiny_cfg(**kw) -> FluxAEConfig:
    return FluxAEConfig(**{"pretrained": None, "sample_posterior": False, **TINY, **kw})


@pytest.fixture(scope="module")
def diffusers_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(**diffusers_config(tiny_cfg())).eval()


@pytest.fixture(scope="module")
def vae_folder(diffusers_vae, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    diffusers_vae.save_pretrained(folder, safe_serialization=True)
    return folder


def images(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(s, generator=g) * 2 - 1 for s in shapes]


MIXED = [(3, 1, 16, 16), (3, 1, 8, 24), (3, 2, 16, 16), (3, 1, 16, 16), (3, 1, 24, 8)]


def test_config_exposes_latent_channels_and_compression():
    cfg = FluxAEConfig()
    assert cfg.latent_channels == 16 and cfg.compression == (1, 8, 8)
    assert (cfg.scale, cfg.shift) == (None, None)  # the weights' own
    vae = build_flux_ae(tiny_cfg())
    assert (vae.scale, vae.shift) == (0.3611, 0.1159)  # no file says otherwise: FLUX's
    assert tiny_cfg().compression == (1, 2, 2)


def test_round_trip_is_shape_exact_for_mixed_sizes(vae_folder):
    vae = build_flux_ae(tiny_cfg(pretrained=str(vae_folder)))
    xs = images(*MIXED)
    zs = vae.encode(xs)
    assert [tuple(z.shape) for z in zs] == [(4, f, h // 2, w // 2) for _, f, h, w in MIXED]
    ys = vae.decode(zs)
    assert [y.shape for y in ys] == [x.shape for x in xs]
    assert all(y.dtype == torch.float32 and y.abs().max() <= 1 for y in ys)


def test_latents_equal_diffusers_called_directly(vae_folder, diffusers_vae):
    cfg = tiny_cfg(pretrained=str(vae_folder))
    vae = build_flux_ae(cfg)
    xs = images(*MIXED, seed=1)
    zs = vae.encode(xs)
    with torch.no_grad():
        for x, z in zip(xs, zs):
            frames = x.permute(1, 0, 2, 3)  # (F, 3, H, W)
            raw = diffusers_vae.encode(frames).latent_dist.mode()
            want = (raw - vae.shift) * vae.scale  # scale and shift exactly once
            torch.testing.assert_close(z, want.permute(1, 0, 2, 3), rtol=1e-5, atol=1e-5)
            dec = diffusers_vae.decode(raw).sample.clamp(-1, 1)
            torch.testing.assert_close(vae.decode([z])[0], dec.permute(1, 0, 2, 3), rtol=1e-4, atol=1e-4)


def _refactored(folder, tmp_path, name, **factors):
    """A copy of the diffusers folder whose config.json records other latent factors."""
    import json
    import shutil

    out = tmp_path / name
    shutil.copytree(folder, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **factors}))
    return out


def test_scale_and_shift_come_from_the_folder_and_apply_once(vae_folder, tmp_path):
    plain = build_flux_ae(tiny_cfg(pretrained=str(_refactored(vae_folder, tmp_path, "plain", scaling_factor=1.0,
                                                                shift_factor=None))))
    other = _refactored(vae_folder, tmp_path, "other", scaling_factor=0.5, shift_factor=0.25)
    scaled = build_flux_ae(tiny_cfg(pretrained=str(other)))
    assert (plain.scale, plain.shift, scaled.scale, scaled.shift) == (1.0, 0.0, 0.5, 0.25)
    xs = images((3, 1, 16, 16))
    raw, z = plain.encode(xs)[0], scaled.encode(xs)[0]
    torch.testing.assert_close(z, (raw - 0.25) * 0.5)
    # decode undoes it: the same pixels from either wrapper
    torch.testing.assert_close(scaled.decode([z])[0], plain.decode([raw])[0], rtol=1e-5, atol=1e-5)
    # a recipe that states the folder's own values agrees with it
    assert build_flux_ae(tiny_cfg(pretrained=str(other), scale=0.5, shift=0.25)).scale == 0.5


def test_a_recipe_factor_the_folder_contradicts_is_a_clean_error(vae_folder, tmp_path):
    other = _refactored(vae_folder, tmp_path, "sd", scaling_factor=0.18215, shift_factor=None)
    with pytest.raises(MinfmError) as info:
        build_flux_ae(tiny_cfg(pretrained=str(other), scale=0.3611, shift=0.1159))
    assert str(info.value) == (
        f"flux_ae: {other} ({other / 'config.json'}): scale = 0.3611 but the weights' config.json says 0.18215; "
        "shift = 0.1159 but the weights' config.json says 0.0; leave them unset to use the weights' own"
    )
    assert "\n" not in str(info.value)


def test_grouping_does_not_change_results(vae_folder):
    vae = build_flux_ae(tiny_cfg(pretrained=str(vae_folder), chunk_size=1))
    xs = images(*MIXED, seed=2)
    together = vae.encode(xs)
    alone = [vae.encode([x])[0] for x in xs]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_posterior_noise_comes_from_each_images_own_generator(vae_folder):
    """One generator per image (protocols.Vae): an image's sample does not depend on the
    batch around it or on how its frames fall into chunks, so a resumed run, another world
    size or micro-batch split encodes alike."""
    vae = build_flux_ae(tiny_cfg(pretrained=str(vae_folder), sample_posterior=True, chunk_size=2))

    def gen(seed):
        return torch.Generator().manual_seed(seed)

    clip, other = images((3, 3, 16, 16), (3, 1, 16, 16))  # 3 frames: chunks of 2 + 1
    a = vae.encode([clip], generators=[gen(3)])[0]
    b = vae.encode([other, clip, other], generators=[gen(7), gen(3), gen(8)])[1]
    c = vae.encode([clip], generators=[gen(4)])[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a - c).abs().max() > 1e-2  # another generator, another sample
    mode = build_flux_ae(tiny_cfg(pretrained=str(vae_folder), sample_posterior=False)).encode([clip], generators=[gen(3)])[0]
    assert (a - mode).abs().max() > 1e-2  # and a sample, not the mean


def test_bad_image_size_is_a_user_error():
    vae = build_flux_ae(tiny_cfg())
    with pytest.raises(MinfmError, match="not a multiple"):
        vae.encode(images((3, 1, 15, 16)))


def test_frozen_and_dtype():
    vae = build_flux_ae(tiny_cfg(dtype="bf16"))
    assert not vae.training and all(not p.requires_grad for p in vae.parameters())
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}
    z = vae.encode(images((3, 1, 8, 8)))[0]
    assert z.dtype == torch.float32  # latents come back in the images' dtype


def test_meta_build_counts_flux_parameters_without_files():
    cfg = FluxAEConfig(pretrained="/nonexistent/ae.safetensors")
    with torch.device("meta"):
        vae = build_flux_ae(cfg, load_weights=False)
    assert all(p.is_meta for p in vae.parameters())
    assert sum(p.numel() for p in vae.parameters()) == 83_819_683  # FLUX.1 VAE


def test_folder_with_other_architecture_is_named(vae_folder):
    with pytest.raises(MinfmError, match="latent_channels = 4 \\(the config says 8\\)"):
        build_flux_ae(tiny_cfg(pretrained=str(vae_folder), latent_channels=8))


# --- original BFL layout ------------------------------------------------------------


def to_bfl_layout(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL names -> the original FLUX ae.safetensors names (test fixture)."""
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in state.items():
        k = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", k)
        k = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k)
        if "mid_block.attentions.0." in k:
            k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
            for new, old in attn.items():
                k = k.replace(f"attn_1.{new}.", f"attn_1.{old}.")
            if value.dim() == 2:  # BFL uses 1x1 convs where diffusers uses linear layers
                value = value[:, :, None, None]
        out[k] = value.clone()
    return out


def test_bfl_single_file_gives_the_same_outputs_as_the_diffusers_folder(diffusers_vae, vae_folder, tmp_path):
    from safetensors.torch import save_file

    bfl = to_bfl_layout(diffusers_vae.state_dict(), levels=2)
    assert "encoder.down.0.block.0.norm1.weight" in bfl and bfl["decoder.mid.attn_1.q.weight"].dim() == 4
    assert not any("down_blocks" in k or "up_blocks" in k for k in bfl)
    save_file(bfl, tmp_path / "ae.safetensors")

    from_file = build_flux_ae(tiny_cfg(pretrained=str(tmp_path / "ae.safetensors")))
    from_folder = build_flux_ae(tiny_cfg(pretrained=str(vae_folder)))
    xs = images(*MIXED, seed=5)
    for a, b in zip(from_file.encode(xs), from_folder.encode(xs)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    zs = from_folder.encode(xs)
    for a, b in zip(from_file.decode(zs), from_folder.decode(zs)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_single_file_of_another_architecture_is_a_user_error(diffusers_vae, tmp_path):
    from safetensors.torch import save_file

    save_file(to_bfl_layout(diffusers_vae.state_dict(), levels=2), tmp_path / "ae.safetensors")
    with pytest.raises(MinfmError, match="does not fit the configured architecture"):
        build_flux_ae(tiny_cfg(pretrained=str(tmp_path / "ae.safetensors"), block_out_channels=(8, 16, 16)))


def test_a_sampling_flux_ae_passes_the_kits_vae_check(vae_folder):
    from minfm_core import testing

    testing.check_vae(build_flux_ae, tiny_cfg(pretrained=str(vae_folder), sample_posterior=True), smoke=True)


def test_loading_a_folder_without_accelerate_says_nothing(vae_folder):
    """diffusers warned on every load that `accelerate` is "strongly recommended" (and went on
    without it): noise in every run's log for a package nothing here needs."""
    import importlib.util
    import logging

    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger("diffusers")  # diffusers' own handler holds whatever stderr was at import
    logger.addHandler(handler)
    try:
        build_flux_ae(tiny_cfg(pretrained=str(vae_folder)))
    finally:
        logger.removeHandler(handler)
    if importlib.util.find_spec("accelerate") is None:
        assert not [m for m in said if "accelerate" in m]


def test_a_config_bigger_than_its_weights_is_refused_before_it_is_built(vae_folder, tmp_path, monkeypatch):
    """A downloaded VAE's config.json of block_out_channels [8192] x 4 was built in full by
    diffusers (110 GiB) before the architecture check; a model with more parameters than its
    weights have bytes is refused on the meta device, and diffusers never loads it."""
    from diffusers import AutoencoderKL

    big = _refactored(vae_folder, tmp_path, "big", block_out_channels=[8192] * 2)

    def never(*a, **k):
        raise AssertionError("diffusers loaded the model before the check")

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", never)
    with pytest.raises(MinfmError, match=r"^flux_ae: .*big: .*config.json describes a model of [\d,]+ parameters, "
                                         r"but the folder's weights hold [\d,]+ bytes"):
        build_flux_ae(tiny_cfg(pretrained=str(big), block_out_channels=(8192, 8192)))
