"""What a VAE, a text encoder and an attention backend hand the engine is checked where they
hand it (minfm_core.boundary): shape and dtype, which costs nothing. A plugin's VAE making
latents of another width, an encoder one column short or a backend dropping a head failed in
the denoiser's first matmul, with a traceback ending "this is a bug in minFM". Now: one line
naming the component and its plugin, exit 2; and the conformance kit (minfm_core.testing)
catches each before a recipe ever names it.
"""

from __future__ import annotations

import pytest
import torch

from conftest import minfm_in_process
from engine_helpers import tiny
from minfm_core import config, field, hookimpl, protocols, testing
from minfm_core.errors import PluginError
from minfm_core.plugins import plugin
from minfm_core.registry import get_registry


@config
class NarrowTextConfig:
    dim: int = field(16, doc="promised width")
    pooled: bool = field(False, doc="packed tokens")


class NarrowText(torch.nn.Module, protocols.TextEncoder):
    """One token per word, one column narrower than its config's dim."""

    pooled = False

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, prompts):
        lens = torch.tensor([len(p.split()) + 1 for p in prompts])
        return torch.zeros(int(lens.sum()), self.dim - 1), lens


@config
class ShapeVaeConfig:
    latent_channels: int = field(3, doc="promised channels")
    compression: tuple[int, int, int] = field((1, 1, 1), doc="promised compression")
    fault: str = field("encode", doc="which half breaks its promise")


class ShapeVae(torch.nn.Module, protocols.Vae):
    """The identity VAE, but encode adds a channel, or decode crops a row."""

    def __init__(self, fault: str):
        super().__init__()
        self.fault = fault

    def encode(self, images, generators=None):
        return [torch.cat([x, x[:1]]) if self.fault == "encode" else x.clone() for x in images]

    def decode(self, latents):
        return [x[:, :, 1:] if self.fault == "decode" else x.clone() for x in latents]


def drop_a_head(q, k, v, cu_seqlens, max_seqlen):
    return testing.reference_attention(q, k, v, cu_seqlens, max_seqlen)[:, 1:]


class Misshapen:
    @hookimpl
    def register_text_encoders(self, register):
        register("narrow", lambda cfg, *, load_weights=True: NarrowText(cfg.dim), NarrowTextConfig)

    @hookimpl
    def register_vaes(self, register):
        register("misshapen", lambda cfg, *, load_weights=True: ShapeVae(cfg.fault), ShapeVaeConfig)

    @hookimpl
    def register_attention_backends(self, register):
        register("drop_a_head", lambda: drop_a_head, doc="returns one head fewer than q has")


@pytest.fixture
def misshapen():
    with plugin(Misshapen(), "misshapen_parts"):
        yield


def _run(tmp_path, *sets):
    from minfm_core.engine.train import train

    train(tiny(tmp_path / "run", "train.max_steps=1", *sets))


@pytest.mark.parametrize(("sets", "message"), [
    (['model.text_encoder={name = "narrow", dim = 16}'],
     r"model.text_encoder: text_encoder 'narrow' of plugin 'misshapen_parts': enc\(prompts\): expected tokens \(sum\(lens\), dim\) of shape "
     r"\(\d+, 16\), got \(\d+, 15\)"),
    (['model.vae={name = "misshapen", fault = "encode"}'],
     r"model.vae: vae 'misshapen' of plugin 'misshapen_parts': latents = vae.encode\(images, ...\): expected latent 0 of shape "
     r"\(3, 1, (16|24), (16|24)\), got \(4, 1, (16|24), (16|24)\)"),
    (['model.attention="drop_a_head"'],
     r"model.attention: attention 'drop_a_head' of plugin 'misshapen_parts': out = attention\(q, k, v, cu_seqlens, max_seqlen\): "
     r"expected shape \(\d+, 2, 16\) \(the input's\), got \(\d+, 1, 16\)"),
], ids=["text_encoder", "vae_encode", "attention"])
def test_training_names_the_part_that_broke_its_shape(misshapen, tmp_path, sets, message):
    with pytest.raises(PluginError, match=f"^{message}$"):
        _run(tmp_path, *sets)


def test_sampling_names_a_vae_whose_decode_breaks_its_shape(misshapen, trained_run, tmp_path):
    res = minfm_in_process("sample", str(trained_run), "--out", str(tmp_path / "out"), "--prompt", "a red circle",
                           "--steps", "1", "--size", "16x24", "--set", 'model.vae={name = "misshapen", fault = "decode"}')
    assert res.returncode == 2 and "Traceback" not in res.stderr and "bug in minFM" not in res.stderr, res.stderr
    assert res.stderr.strip() == ("minfm: error: model.vae: vae 'misshapen' of plugin 'misshapen_parts': images = "
                                  "vae.decode(latents): expected image 0 of shape (3, 1, 16, 24), got (3, 1, 15, 24)")


def test_the_kit_catches_each_before_a_recipe_names_it(misshapen):
    reg = get_registry()
    with pytest.raises(AssertionError, match=r"enc\(prompts\).*expected tokens .* of shape \(\d+, 16\), got \(\d+, 15\)"):
        testing.check_text_encoder(reg.get("text_encoder", "narrow"), smoke=True)
    with pytest.raises(AssertionError, match=r"latents = encode\(images\).*expected latent 0 of shape \(3, 1, 16, 16\)"):
        testing.check_vae(reg.get("vae", "misshapen"), ShapeVaeConfig(fault="encode"), smoke=True)
    with pytest.raises(AssertionError, match=r"images = decode\(latents\).*expected image 0 of shape \(3, 1, 16, 16\)"):
        testing.check_vae(reg.get("vae", "misshapen"), ShapeVaeConfig(fault="decode"), smoke=True)
    with pytest.raises(AssertionError, match=r"attention.*expected shape \(5, 2, 8\) \(the input's\), got \(5, 1, 8\)"):
        testing.check_attention(reg.get("attention", "drop_a_head"))
    testing.check_vae(reg.get("vae", "misshapen"), ShapeVaeConfig(fault="none"), smoke=True)  # the rule, kept


def test_a_vae_may_pad_a_side_its_compression_does_not_divide():
    from minfm_core import boundary

    assert boundary.latent_shape(16, (1, 8, 8), (1, 64, 60)) == (16, 1, 8, -1)
    assert boundary.latent_shape(16, (4, 8, 8), (9, 64, 64)) == (16, 3, 8, 8)
    assert boundary.latent_shape(16, (4, 8, 8), (8, 64, 64)) == (16, -1, 8, 8)
    image, vae = torch.zeros(3, 1, 64, 60), ShapeVaeConfig(latent_channels=16, compression=(1, 8, 8))
    assert boundary.latents_problem([torch.zeros(16, 1, 8, 8)], [image], vae) is None
    assert boundary.latents_problem([torch.zeros(16, 1, 8, 8)], [image], ShapeVaeConfig(latent_channels=4, compression=(1, 8, 8))) == \
        "expected latent 0 of shape (4, 1, 8, ?), got (16, 1, 8, 8)"
