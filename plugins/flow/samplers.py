"""Samplers: integrate the rectified-flow velocity from t = 1 (noise) to t = 0 (data) on packed tokens.

Every sample in a pack gets its own time grid: the uniform grid 1 -> 0 passed through the
warper with that sample's image token count, so a 256-token and a 4096-token image in
one batch are each shifted as if sampled alone. ``velocity(x_t, t)`` takes per-sample
``t`` of shape ``(n,)`` and returns ``(L, d)`` (guidance already applied by the engine).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from minfm_core.errors import MinfmError
from minfm_core.packing import expand_per_token

from .config import DDIMSDEConfig, EulerConfig, HeunConfig
from .path import split_velocity

Velocity = Callable[[Tensor, Tensor], Tensor]


def time_grid(steps: int, seq_lens: Tensor, warper=None, *, dtype=torch.float32, device=None) -> Tensor:
    """Per-sample times ``(steps + 1, n)``: linspace(1, 0) warped with each sample's token count."""
    n = seq_lens.numel()
    base = torch.linspace(1.0, 0.0, steps + 1, dtype=dtype, device=device)
    if warper is None:
        return base[:, None].expand(steps + 1, n).contiguous()
    flat = warper(base.repeat_interleave(n), seq_lens.to(device).repeat(steps + 1))
    return flat.view(steps + 1, n)


class _Solver:
    """Shared loop; subclasses implement :meth:`step`."""

    def __init__(self, cfg=None) -> None:
        self.cfg = cfg

    def step(self, velocity: Velocity, x: Tensor, t: Tensor, t_next: Tensor, lens: Tensor, generators) -> Tensor:
        raise NotImplementedError

    def __call__(
        self,
        velocity: Velocity,
        noise: Tensor,
        seq_lens: Tensor,
        *,
        steps: int,
        warper=None,
        generators: Sequence[torch.Generator] | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> Tensor:
        if steps < 1:
            raise MinfmError(f"sampler steps must be >= 1, got {steps}")
        seq_lens = seq_lens.to(noise.device).long()
        if int(seq_lens.sum()) != noise.shape[0]:
            raise ValueError(f"seq_lens sum to {int(seq_lens.sum())} but noise has {noise.shape[0]} tokens")
        if generators is not None and len(generators) != seq_lens.numel():
            raise ValueError(f"{len(generators)} generators for {seq_lens.numel()} samples (one per sample)")
        # Integrate in at least fp32 whatever the model runs in (the error accumulates over steps).
        dtype = torch.promote_types(noise.dtype, torch.float32)
        ts = time_grid(steps, seq_lens, warper, dtype=dtype, device=noise.device)
        x = noise.to(dtype)
        for k in range(steps):
            x = self.step(velocity, x, ts[k], ts[k + 1], seq_lens, generators)
            if callback is not None:
                callback(k + 1, steps)
        return x


def _tok(t: Tensor, lens: Tensor, x: Tensor) -> Tensor:
    """Per-sample ``(n,)`` -> per-token, broadcastable over x."""
    return expand_per_token(t, lens).view(-1, *([1] * (x.dim() - 1)))


def fresh_noise(x: Tensor, lens: Tensor, generators) -> Tensor:
    """N(0, I) like ``x``, each sample's rows from its own generator (drawn on the CPU, where
    the generators live): a sample's noise does not depend on its pack."""
    if generators is None:
        return torch.randn_like(x)
    parts = [torch.randn((int(n), *x.shape[1:]), generator=g, dtype=x.dtype) for n, g in zip(lens.tolist(), generators)]
    return torch.cat(parts).to(x.device)


def _v(velocity: Velocity, x: Tensor, t: Tensor) -> Tensor:
    return velocity(x, t).to(x.dtype)


class Euler(_Solver):
    """x <- x + (t_next - t) v(x, t)."""

    def __init__(self, cfg: EulerConfig | None = None) -> None:
        super().__init__(cfg or EulerConfig())

    def step(self, velocity, x, t, t_next, lens, generators):
        return x + _tok(t_next - t, lens, x) * _v(velocity, x, t)


class Heun(_Solver):
    """Euler predictor, then the trapezoid corrector: x <- x + dt (v(x, t) + v(x_pred, t_next)) / 2.

    The corrector runs on the last step too (the flow velocity is defined at t = 0),
    so a solve costs 2 * steps velocity calls.
    """

    def __init__(self, cfg: HeunConfig | None = None) -> None:
        super().__init__(cfg or HeunConfig())

    def step(self, velocity, x, t, t_next, lens, generators):
        dt = _tok(t_next - t, lens, x)
        v0 = _v(velocity, x, t)
        v1 = _v(velocity, x + dt * v0, t_next)
        return x + dt * 0.5 * (v0 + v1)


class DDIMSDE(_Solver):
    """The seed's eta-controlled DDIM step on the rectified path (alpha = 1 - t, beta = t).

    Split x_t into predictions x0 = x - t v and eps = x + (1 - t) v, then re-noise to t':
        b = max(t' - eta (t - t') t' / t, 0)
        x' = (1 - t') x0 + b eps + sqrt(t'^2 - b^2) z,   z ~ N(0, I)
    The noise share keeps the total noise level at t' (b^2 + (t'^2 - b^2) = t'^2); eta = 0
    gives b = t' and no fresh noise, which is exactly the Euler step.
    """

    def __init__(self, cfg: DDIMSDEConfig | None = None) -> None:
        super().__init__(cfg or DDIMSDEConfig())

    def step(self, velocity, x, t, t_next, lens, generators):
        eta = self.cfg.eta
        beta, beta_next = _tok(t, lens, x), _tok(t_next, lens, x)
        x0, eps = split_velocity(x, _v(velocity, x, t), beta)
        b = (beta_next - eta * (beta - beta_next) * beta_next / beta.clamp_min(1e-12)).clamp_min(0.0)
        out = (1 - beta_next) * x0 + b * eps
        if eta > 0:
            std = (beta_next.square() - b.square()).clamp_min(0.0).sqrt()
            out = out + std * fresh_noise(x, lens, generators)
        return out
