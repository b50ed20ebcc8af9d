"""The FLUX autoencoder through diffusers' ``AutoencoderKL``.

Weights come from a diffusers folder (``config.json`` + safetensors), from the original
BFL single file ``ae.safetensors`` (converted with diffusers' own LDM-VAE key
conversion), or from either of those in a Hub repo (see ``minfm_core.pretrained``).
The architecture is always described by the config fields, so ``minfm check`` builds
the exact structure without any file; a loaded model must agree with them.

The latent scale and shift are the weights' own: a diffusers folder's ``config.json``
(``scaling_factor``, ``shift_factor``; FLUX's 0.3611 / 0.1159 when there is none, as for
an ``ae.safetensors``). A recipe may state them; a value the folder contradicts is an error,
not a silent re-scaling of every latent.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import math

import torch
from torch import Tensor, nn

from minfm_core.errors import MinfmError, first_line
from minfm_core.packing import group_by_shape
from minfm_core.pretrained import resolve_pretrained
from minfm_core.weights import DTYPES

from .configs import FLUX_SCALE, FLUX_SHIFT, FluxAEConfig, from_pretrained_kwargs, vae_source
from .posterior import posterior_sample

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def diffusers_config(cfg: FluxAEConfig) -> dict:
    """``AutoencoderKL`` keyword arguments for the architecture the config describes."""
    levels = len(cfg.block_out_channels)
    return dict(
        in_channels=cfg.image_channels,
        out_channels=cfg.image_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        scaling_factor=FLUX_SCALE if cfg.scale is None else cfg.scale,
        shift_factor=FLUX_SHIFT if cfg.shift is None else cfg.shift,
        # FLUX's autoencoder has no 1x1 (post-)quant convs; its mid blocks have attention.
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )


class FluxAE(nn.Module):
    """Encode/decode lists of (C, F, H, W) tensors of mixed sizes; frames are coded independently."""

    def __init__(self, cfg: FluxAEConfig, model: nn.Module, scale: float, shift: float):
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.scale, self.shift = scale, shift  # latent = scale * (z - shift)
        self.latent_channels = cfg.latent_channels
        self.compression = cfg.compression

    @property
    def _param(self) -> Tensor:
        return next(self.model.parameters())

    def _frames(self, xs: list[Tensor], idx: list[int], channels: int, what: str) -> Tensor:
        """Stack one shape group (B, C, F, H, W) and fold frames into the batch: (B*F, C, H, W)."""
        x = torch.stack([xs[i] for i in idx])
        if x.dim() != 5 or x.shape[1] != channels:
            raise MinfmError(f"flux_ae: {what} of shape {tuple(x.shape[1:])}, expected ({channels}, F, H, W)")
        b, c, f, h, w = x.shape
        return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)

    @staticmethod
    def _unfold(y: Tensor, b: int) -> list[Tensor]:
        bf, c, h, w = y.shape
        return list(y.reshape(b, bf // b, c, h, w).permute(0, 2, 1, 3, 4).unbind(0))

    @torch.no_grad()
    def encode(self, images: list[Tensor], generators: Sequence[torch.Generator] | None = None) -> list[Tensor]:
        """Images in [-1, 1], each (3, F, H, W) with H, W multiples of the compression -> latents.
        With ``sample_posterior``, image i's noise comes from ``generators[i]`` (all its frames)."""
        out: list[Tensor | None] = [None] * len(images)
        p = self._param
        s = self.compression[1]
        for idx in group_by_shape([x.shape for x in images]).values():
            h, w = images[idx[0]].shape[-2:]
            if h % s or w % s:
                raise MinfmError(f"flux_ae: image size {h}x{w} is not a multiple of the VAE's downsampling {s}")
            x = self._frames(images, idx, self.cfg.image_channels, "image")
            frames = x.shape[0] // len(idx)  # rows are image-major: each image's frames in turn
            rows = None if generators is None else [generators[i] for i in idx for _ in range(frames)]
            zs = []
            for start in range(0, x.shape[0], self.cfg.chunk_size):
                end = start + self.cfg.chunk_size
                dist = self.model.encode(x[start:end].to(p.device, p.dtype)).latent_dist
                if not self.cfg.sample_posterior:
                    zs.append(dist.mode())
                else:
                    zs.append(posterior_sample(dist, None if rows is None else rows[start:end]))
            z = (torch.cat(zs) - self.shift) * self.scale
            for i, zi in zip(idx, self._unfold(z, len(idx))):
                out[i] = zi.to(images[i].dtype)
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def decode(self, latents: list[Tensor]) -> list[Tensor]:
        """Latents (C, F, h, w) -> images (3, F, h*s, w*s) clamped to [-1, 1]."""
        out: list[Tensor | None] = [None] * len(latents)
        p = self._param
        for idx in group_by_shape([z.shape for z in latents]).values():
            z = self._frames(latents, idx, self.cfg.latent_channels, "latent")
            z = z.to(p.device, p.dtype) / self.scale + self.shift
            x = torch.cat([self.model.decode(chunk).sample for chunk in z.split(self.cfg.chunk_size)])
            for i, xi in zip(idx, self._unfold(x.clamp(-1, 1), len(idx))):
                out[i] = xi.to(latents[i].dtype)
        return out  # type: ignore[return-value]


def _check_architecture(cfg: FluxAEConfig, model: nn.Module, where: str) -> None:
    want = diffusers_config(cfg)
    names = {"in_channels": "image_channels", "block_out_channels": "block_out_channels",
             "layers_per_block": "layers_per_block", "latent_channels": "latent_channels",
             "norm_num_groups": "norm_num_groups"}
    bad = []
    for key, ours in names.items():
        got = model.config[key]
        got = tuple(got) if isinstance(got, (list, tuple)) else got
        if got != want[key]:
            bad.append(f"{ours} = {got!r} (the config says {want[key]!r})")
    if bad:
        raise MinfmError(f"flux_ae: {where} has {', '.join(bad)}; set these fields to match the weights")


def latent_affine(cfg: FluxAEConfig, model: nn.Module, where: str) -> tuple[float, float]:
    """(scale, shift) of the loaded ``model`` (its config.json's), checked against the recipe's."""
    scale = float(model.config["scaling_factor"])
    shift = float(model.config.get("shift_factor") or 0.0)  # diffusers writes null for "no shift"
    bad = [f"{name} = {ours!r} but the weights' config.json says {theirs!r}"
           for name, ours, theirs in (("scale", cfg.scale, scale), ("shift", cfg.shift, shift))
           if ours is not None and not math.isclose(ours, theirs, rel_tol=1e-6, abs_tol=1e-9)]
    if bad:
        raise MinfmError(f"flux_ae: {where}: {'; '.join(bad)}; leave them unset to use the weights' own")
    return scale, shift


def _is_ldm_layout(state: dict[str, Tensor]) -> bool:
    """BFL/LDM checkpoints name blocks ``encoder.down.0.block.0``; diffusers ``encoder.down_blocks.0``."""
    return any(".down.0.block." in k or k.startswith(("encoder.down.", "first_stage_model.", "vae.")) for k in state)


def load_single_file(path: Path, model: nn.Module) -> None:
    """Load an ``ae.safetensors`` (BFL layout, or already diffusers layout) into ``model``."""
    from minfm_core.weights import load_safetensors_file

    state = load_safetensors_file(path)
    if _is_ldm_layout(state):
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        state = convert_ldm_vae_checkpoint(state, dict(model.config))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise MinfmError(
            f"flux_ae: {path} does not fit the configured architecture ({' '.join(first[:2])[:300]}); "
            "check block_out_channels, layers_per_block and latent_channels"
        ) from None


def _load(cfg: FluxAEConfig) -> tuple[nn.Module, float, float]:
    from diffusers import AutoencoderKL

    assert cfg.pretrained
    path = resolve_pretrained(vae_source(cfg.pretrained))
    if path.is_dir() and not (path / "config.json").exists():
        # a local pipeline folder: its diffusers vae/, else the original ae.safetensors
        path = path / "vae" if (path / "vae" / "config.json").exists() else path / "ae.safetensors"
    if path.is_file():
        model = AutoencoderKL(**diffusers_config(cfg))
        load_single_file(path, model)
        return model, *latent_affine(cfg, model, cfg.pretrained)
    if not (path / "config.json").exists() or not (path / WEIGHTS_NAME).exists():
        raise MinfmError(
            f"flux_ae: {cfg.pretrained} ({path}) is not a diffusers VAE folder with config.json and "
            f"{WEIGHTS_NAME}; give such a folder or an ae.safetensors file"
        )
    from minfm_core.weights import LIBRARY_LOAD_ERRORS, check_weights_folder, pretrained_meta_model

    check_weights_folder(path)  # shard names and links stay inside, headers bounded: before diffusers reads
    # config.json is from outside: checked against the recipe, and against its weights' size,
    # on the meta device before diffusers builds what it describes
    _check_architecture(cfg, pretrained_meta_model(lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(str(path))),
                                                   path, f"flux_ae: {cfg.pretrained}"), cfg.pretrained)
    try:
        model = AutoencoderKL.from_pretrained(str(path), use_safetensors=True, torch_dtype=DTYPES[cfg.dtype],
                                              **from_pretrained_kwargs())
    except LIBRARY_LOAD_ERRORS as exc:  # weights that do not fit their own config.json
        raise MinfmError(f"flux_ae: {cfg.pretrained} ({path}) does not load: {first_line(exc, 300)}") from None
    return model, *latent_affine(cfg, model, f"{cfg.pretrained} ({path / 'config.json'})")


def build_flux_ae(cfg: FluxAEConfig, *, load_weights: bool = True) -> FluxAE:
    """The frozen FLUX VAE; ``load_weights=False`` builds the structure only (no file access)."""
    if load_weights and cfg.pretrained:
        model, scale, shift = _load(cfg)
    else:
        from diffusers import AutoencoderKL

        model = AutoencoderKL(**diffusers_config(cfg))
        # No file to ask: the recipe's values, else FLUX's (the meta build only counts parameters).
        scale, shift = float(model.config["scaling_factor"]), float(model.config["shift_factor"])
    # nn.Module.to: diffusers' own .to() warns about casting a model that has no fp32-only parts
    model = nn.Module.to(model, DTYPES[cfg.dtype])
    return FluxAE(cfg, model, scale, shift).eval().requires_grad_(False)
