"""Time samplers (training distribution of t), warpers (resolution shift) and weighters (loss weight)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import (
    LogitNormalTimeConfig,
    LogitNormalWeightConfig,
    NoWarpConfig,
    ResolutionShiftConfig,
    UniformTimeConfig,
    UniformWeightConfig,
)

# Smallest step of float32 just below 1: keeps sampled t inside the open interval (0, 1),
# where 1/t and logit(t) are finite.
_EDGE = 2.0**-24


def _open_unit(t: Tensor) -> Tensor:
    return t.clamp(_EDGE, 1.0 - _EDGE)


# --- samplers -------------------------------------------------------------------------


class UniformTimeSampler:
    """t ~ U(0, 1)."""

    def __init__(self, cfg: UniformTimeConfig | None = None) -> None:
        self.cfg = cfg or UniformTimeConfig()

    def __call__(self, n: int, *, generator: torch.Generator | None = None, device=None) -> Tensor:
        return _open_unit(torch.rand(n, generator=generator, device=device, dtype=torch.float32))


class LogitNormalTimeSampler:
    """t = sigmoid(mu + sigma z), z ~ N(0, 1)."""

    def __init__(self, cfg: LogitNormalTimeConfig | None = None) -> None:
        self.cfg = cfg or LogitNormalTimeConfig()

    def __call__(self, n: int, *, generator: torch.Generator | None = None, device=None) -> Tensor:
        z = torch.randn(n, generator=generator, device=device, dtype=torch.float32)
        return _open_unit(torch.sigmoid(self.cfg.mu + self.cfg.sigma * z))

    def pdf(self, t: Tensor) -> Tensor:
        return logit_normal_pdf(t, self.cfg.mu, self.cfg.sigma)


def logit_normal_pdf(t: Tensor, mu: float, sigma: float) -> Tensor:
    """Density of sigmoid(N(mu, sigma^2)) on (0, 1); 0 at the closed ends."""
    inside = (t > 0) & (t < 1)
    ts = torch.where(inside, t, torch.full_like(t, 0.5))  # keep the masked lanes finite
    logit = torch.log(ts) - torch.log1p(-ts)
    log_pdf = -((logit - mu) ** 2) / (2 * sigma**2) - math.log(sigma * math.sqrt(2 * math.pi)) - torch.log(ts * (1 - ts))
    return torch.where(inside, torch.exp(log_pdf), torch.zeros_like(t))


# --- warpers --------------------------------------------------------------------------


class ResolutionShift:
    """Per-sample shift from each sample's own image token count (FLUX's dynamic shifting).

    mu = base_shift + (max_shift - base_shift) (len - base_len) / (max_len - base_len);
    t' = e^mu / (e^mu + 1/t - 1), computed as t / (t + e^-mu (1 - t)), with t' = t at t in {0, 1}
    (where e^-mu under- or overflows, past ~600,000 tokens, that form is 0/0).
    """

    def __init__(self, cfg: ResolutionShiftConfig | None = None) -> None:
        self.cfg = cfg or ResolutionShiftConfig()

    def mu(self, seq_lens: Tensor | int) -> Tensor:
        c = self.cfg
        slope = (c.max_shift - c.base_shift) / (c.max_len - c.base_len)
        lens = torch.as_tensor(seq_lens)
        return (lens.to(torch.float64) - c.base_len) * slope + c.base_shift

    def __call__(self, t: Tensor, seq_lens: Tensor | int) -> Tensor:
        # mu in float64 (cheap, n values) so large token counts do not lose digits; the shift itself
        # runs in t's dtype.
        inv_gain = torch.exp(-self.mu(seq_lens)).to(device=t.device, dtype=t.dtype)
        shifted = t / (t + inv_gain * (1 - t))
        return torch.where((t <= 0) | (t >= 1), t, shifted)


class NoWarp:
    """t unchanged."""

    def __init__(self, cfg: NoWarpConfig | None = None) -> None:
        self.cfg = cfg or NoWarpConfig()

    def __call__(self, t: Tensor, seq_lens: Tensor | int | None = None) -> Tensor:
        return t


# --- weighters ------------------------------------------------------------------------


class UniformWeight:
    """w(t) = 1."""

    def __init__(self, cfg: UniformWeightConfig | None = None) -> None:
        self.cfg = cfg or UniformWeightConfig()

    def __call__(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)


class LogitNormalWeight:
    """w(t) = logit-normal pdf(t; mu, sigma). Under uniform t its mean is 1, so the loss scale is kept."""

    def __init__(self, cfg: LogitNormalWeightConfig | None = None) -> None:
        self.cfg = cfg or LogitNormalWeightConfig()

    def __call__(self, t: Tensor) -> Tensor:
        return logit_normal_pdf(t, self.cfg.mu, self.cfg.sigma)
