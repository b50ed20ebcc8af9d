"""The rectified-flow probability path (t = 0 clean data, t = 1 pure noise)."""

from __future__ import annotations

import torch
from torch import Tensor

from minfm_core.weights import DTYPES

from .config import RectifiedConfig



def _like(t: Tensor | float, x: Tensor) -> Tensor:
    """Give a per-token ``(L,)`` (or any leading-shape) t trailing unit dims so it broadcasts over x."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.reshape(*t.shape, *([1] * (x.dim() - t.dim())))


def split_velocity(x_t: Tensor, v: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
    """Recover ``(x0, eps)`` from a point on the path and its velocity ``v = eps - x0``.

    From x_t = (1 - t) x0 + t eps: x0 = x_t - t v and eps = x_t + (1 - t) v.
    """
    tt = _like(t, x_t)
    return x_t - tt * v, x_t + (1 - tt) * v


class RectifiedPath:
    """x_t = (1 - t) x0 + t eps; target v = eps - x0."""

    def __init__(self, cfg: RectifiedConfig | None = None) -> None:
        self.cfg = cfg or RectifiedConfig()
        self.dtype = DTYPES[self.cfg.compute_dtype]

    def noise(self, x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
        """The noisy point at time t (per token ``(L,)`` or anything broadcastable), in the compute dtype."""
        x0, eps = x0.to(self.dtype), eps.to(self.dtype)
        tt = _like(t, x0)
        # (1 - t) x0 + t eps rather than lerp: exact x0 at t = 0 and exact eps at t = 1.
        return (1 - tt) * x0 + tt * eps

    def target(self, x0: Tensor, eps: Tensor) -> Tensor:
        """The regression target v = eps - x0, in the compute dtype."""
        return eps.to(self.dtype) - x0.to(self.dtype)

    def __repr__(self) -> str:
        return f"RectifiedPath(compute_dtype={self.cfg.compute_dtype!r})"
