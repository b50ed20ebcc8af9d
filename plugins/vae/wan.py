"""Wan 2.1's causal 3-D video VAE through diffusers' ``AutoencoderKLWan``.

Clips of ``1 + 4k`` frames become ``1 + k`` latent frames (the first frame is coded on its own,
causally, so a picture is a one-frame clip and images and clips share one latent space); height
and width shrink 8x. Latents are normalised per channel with the weights' own ``latents_mean``
and ``latents_std`` (``(z - mean) / std``), as diffusers' Wan pipelines do, so a flow model sees
roughly unit-variance latents. Weights come from a diffusers folder or a Hub repo (a bare Wan
pipeline repo id means its ``vae/``); the architecture is always described by the config fields,
so ``minfm check`` builds the exact structure without any file and a loaded model must agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from minfm_core.errors import MinfmError
from minfm_core.packing import group_by_shape
from minfm_core.pretrained import resolve_pretrained
from minfm_core.weights import DTYPES

from .configs import WanVAEConfig, from_pretrained_kwargs, vae_source
from .posterior import posterior_sample

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def diffusers_config(cfg: WanVAEConfig) -> dict:
    """``AutoencoderKLWan`` keyword arguments for the architecture the config describes."""
    levels = len(cfg.dim_mult) - 1
    return dict(
        base_dim=cfg.base_dim,
        z_dim=cfg.z_dim,
        dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks,
        temperal_downsample=[bool(t) for t in cfg.temperal_downsample],
        in_channels=cfg.image_channels,
        out_channels=cfg.image_channels,
        scale_factor_temporal=2 ** sum(bool(t) for t in cfg.temperal_downsample),
        scale_factor_spatial=2**levels,
        # diffusers' defaults are Wan 2.1's statistics for 16 channels; another z_dim has none yet
        # (identity normalisation) until real weights bring their own.
        **({} if cfg.z_dim == 16 else {"latents_mean": [0.0] * cfg.z_dim, "latents_std": [1.0] * cfg.z_dim}),
    )


class WanVAE(nn.Module):
    """Encode/decode lists of (C, F, H, W) tensors of mixed sizes and frame counts (1 + 4k frames)."""

    def __init__(self, cfg: WanVAEConfig, model: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.latent_channels = cfg.z_dim
        self.compression = cfg.compression
        c = cfg.z_dim
        # Buffers (not parameters): they move with .to() and never train.
        self.register_buffer("mean", torch.tensor(model.config.latents_mean, dtype=torch.float32).view(1, c, 1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(model.config.latents_std, dtype=torch.float32).view(1, c, 1, 1, 1),
                             persistent=False)

    @property
    def _param(self) -> Tensor:
        return next(self.model.parameters())

    def _check(self, x: Tensor, i: int, channels: int, what: str) -> None:
        if x.dim() != 4 or x.shape[0] != channels:
            raise MinfmError(f"wan VAE: {what} {i} has shape {tuple(x.shape)}, expected ({channels}, F, H, W)")

    @torch.no_grad()
    def encode(self, images: list[Tensor], generators: Sequence[torch.Generator] | None = None) -> list[Tensor]:
        """Images/clips in [-1, 1], each (3, F, H, W) with F = 1 + 4k and H, W multiples of 8 -> latents.
        With ``sample_posterior``, clip i's noise comes from ``generators[i]``."""
        ct, s = self.compression[0], self.compression[1]
        for i, x in enumerate(images):
            self._check(x, i, self.cfg.image_channels, "image")
            f, h, w = x.shape[1:]
            if (f - 1) % ct:
                raise MinfmError(f"wan VAE: clip {i} has {f} frames; this VAE needs 1 + {ct}k frames "
                                 f"(1, {1 + ct}, {1 + 2 * ct}, ...): set the dataset's frames to one of them")
            if h % s or w % s:
                raise MinfmError(f"wan VAE: size {h}x{w} of item {i} is not a multiple of the VAE's downsampling {s}")
        out: list[Tensor | None] = [None] * len(images)
        p = self._param
        for idx in group_by_shape([x.shape for x in images]).values():
            x = torch.stack([images[i] for i in idx]).to(p.device, p.dtype)
            dist = self.model.encode(x).latent_dist
            if not self.cfg.sample_posterior:
                z = dist.mode()
            else:
                z = posterior_sample(dist, None if generators is None else [generators[i] for i in idx])
            z = (z.float() - self.mean) / self.std
            for i, zi in zip(idx, z.unbind(0)):
                out[i] = zi.to(images[i].dtype)
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def decode(self, latents: list[Tensor]) -> list[Tensor]:
        """Latents (C, 1 + k, h, w) -> images (3, 1 + 4k, 8h, 8w) clamped to [-1, 1]."""
        for i, z in enumerate(latents):
            self._check(z, i, self.cfg.z_dim, "latent")
        out: list[Tensor | None] = [None] * len(latents)
        p = self._param
        for idx in group_by_shape([z.shape for z in latents]).values():
            z = torch.stack([latents[i] for i in idx]).to(p.device, torch.float32)
            x = self.model.decode((z * self.std + self.mean).to(p.dtype)).sample
            for i, xi in zip(idx, x.clamp(-1, 1).unbind(0)):
                out[i] = xi.to(latents[i].dtype)
        return out  # type: ignore[return-value]


def _check_architecture(cfg: WanVAEConfig, model: nn.Module, where: str) -> None:
    want = diffusers_config(cfg)
    bad = []
    for key in ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample"):
        got = model.config[key]
        got = [bool(v) if key == "temperal_downsample" else v for v in got] if isinstance(got, (list, tuple)) else got
        if got != want[key]:
            bad.append(f"{key} = {got!r} (the config says {want[key]!r})")
    if bad:
        raise MinfmError(f"wan VAE: {where} has {', '.join(bad)}; set these fields to match the weights")


def _load(cfg: WanVAEConfig) -> nn.Module:
    from diffusers import AutoencoderKLWan

    from minfm_core.weights import check_weights_folder

    assert cfg.pretrained
    path = resolve_pretrained(vae_source(cfg.pretrained))
    if path.is_dir() and not (path / "config.json").exists() and (path / "vae" / "config.json").exists():
        path = path / "vae"  # a local pipeline folder
    if not path.is_dir() or not (path / "config.json").exists():
        raise MinfmError(f"wan VAE: {cfg.pretrained} ({path}) is not a diffusers AutoencoderKLWan folder with config.json")
    if not (path / WEIGHTS_NAME).exists() and not (path / f"{WEIGHTS_NAME}.index.json").exists():
        raise MinfmError(f"wan VAE: {cfg.pretrained} ({path}) has no {WEIGHTS_NAME} (only safetensors are read)")
    check_weights_folder(path)  # shard names and links stay inside, headers bounded: before diffusers reads
    model = AutoencoderKLWan.from_pretrained(str(path), use_safetensors=True, torch_dtype=DTYPES[cfg.dtype],
                                     **from_pretrained_kwargs())
    _check_architecture(cfg, model, cfg.pretrained)
    return model


def build_wan(cfg: WanVAEConfig, *, load_weights: bool = True) -> WanVAE:
    """The frozen Wan VAE; ``load_weights=False`` builds the structure only (no file access)."""
    if load_weights and cfg.pretrained:
        model = _load(cfg)
    else:
        from diffusers import AutoencoderKLWan

        model = AutoencoderKLWan(**diffusers_config(cfg))
    model = nn.Module.to(model, DTYPES[cfg.dtype])
    return WanVAE(cfg, model).eval().requires_grad_(False)


__all__ = ["WanVAE", "build_wan", "diffusers_config"]
