"""The identity VAE: images are their own latents (pixel-space training on small data)."""

from __future__ import annotations

from torch import Tensor, nn

from minfm_core.errors import MinfmError

from .configs import IdentityVAEConfig


class IdentityVAE(nn.Module):
    """``encode``/``decode`` check the channel count and hand the tensors back unchanged."""

    def __init__(self, cfg: IdentityVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.latent_channels = cfg.channels
        self.compression = (1, 1, 1)

    def _check(self, xs: list[Tensor], what: str) -> list[Tensor]:
        for i, x in enumerate(xs):
            if x.dim() != 4 or x.shape[0] != self.cfg.channels:
                raise MinfmError(
                    f"identity VAE: {what} {i} has shape {tuple(x.shape)}, expected ({self.cfg.channels}, F, H, W)"
                )
        return list(xs)

    def encode(self, images: list[Tensor], generators=None) -> list[Tensor]:
        return self._check(images, "image")

    def decode(self, latents: list[Tensor]) -> list[Tensor]:
        return [x.clamp(-1, 1) for x in self._check(latents, "latent")]


def build_identity(cfg: IdentityVAEConfig, *, load_weights: bool = True) -> IdentityVAE:
    return IdentityVAE(cfg).eval().requires_grad_(False)
