"""Shared helpers for the FLUX tests: tiny random models and mixed packed batches."""

from __future__ import annotations

import torch

from minfm_plugins.attention.backends import Sdpa
from minfm_plugins.flux.config import FluxConfig
from minfm_plugins.flux.model import build_flux
from minfm_plugins.flux.state_dict import bfl_to_diffusers, diffusers_config


def random_flux(guidance: bool = False, seed: int = 0, **overrides):
    """A flux-debug model whose every parameter is random (init_weights would zero the modulation)."""
    cfg = FluxConfig(flavor="flux-debug", guidance_embed=guidance, **overrides)
    model = build_flux(cfg, attention=Sdpa(), load_weights=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.dim() == 1 and p.shape[0] == cfg.d_head else 0.0))
    return model.eval()


def diffusers_twin(model):
    from diffusers import FluxTransformer2DModel

    ref = FluxTransformer2DModel(**{k: v for k, v in diffusers_config(model.cfg).items() if not k.startswith("_")})
    ref.load_state_dict(bfl_to_diffusers(model.state_dict()), strict=True)
    return ref.eval()


def grid_pos(h: int, w: int, t: int = 0) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.full_like(y, t), y, x], -1).reshape(-1, 3)


def make_batch(cfg, shapes, txt_lens, seed: int = 0, guidance: bool = False):
    """A packed batch: ``shapes`` (h, w) image token grids, ``txt_lens`` prompt lengths."""
    g = torch.Generator().manual_seed(seed)
    n = len(shapes)
    img_lens = torch.tensor([h * w for h, w in shapes])
    return dict(
        img=torch.randn(int(img_lens.sum()), cfg.d_img, generator=g),
        img_pos=torch.cat([grid_pos(h, w) for h, w in shapes]),
        img_lens=img_lens,
        txt=torch.randn(sum(txt_lens), cfg.d_txt, generator=g),
        txt_lens=torch.tensor(txt_lens),
        t=torch.rand(n, generator=g),
        vec=torch.randn(n, cfg.d_vec, generator=g),
        guidance=(torch.rand(n, generator=g) * 5) if guidance else None,
    )


def sample(batch, i):
    """Sample ``i`` of a packed batch as a batch of one."""
    io = int(batch["img_lens"][:i].sum()); il = int(batch["img_lens"][i])
    to = int(batch["txt_lens"][:i].sum()); tl = int(batch["txt_lens"][i])
    one = dict(
        img=batch["img"][io:io + il], img_pos=batch["img_pos"][io:io + il], img_lens=batch["img_lens"][i:i + 1],
        txt=batch["txt"][to:to + tl], txt_lens=batch["txt_lens"][i:i + 1], t=batch["t"][i:i + 1],
        vec=batch["vec"][i:i + 1], guidance=None if batch["guidance"] is None else batch["guidance"][i:i + 1],
    )
    return one, slice(io, io + il)


def diffusers_forward(ref, one):
    out = ref(
        hidden_states=one["img"][None], encoder_hidden_states=one["txt"][None], pooled_projections=one["vec"],
        timestep=one["t"], img_ids=one["img_pos"], txt_ids=torch.zeros(one["txt"].shape[0], 3),
        guidance=one["guidance"], return_dict=False,
    )[0]
    return out[0]
