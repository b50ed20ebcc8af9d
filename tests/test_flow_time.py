"""Time samplers, warpers, weighters, the rectified path and the LR schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from minfm_core.errors import MinfmError
from minfm_core.schedule import lr_at
from minfm_plugins.flow.config import (
    LogitNormalTimeConfig,
    LogitNormalWeightConfig,
    RectifiedConfig,
    ResolutionShiftConfig,
)
from minfm_plugins.flow.path import RectifiedPath, split_velocity
from minfm_plugins.flow.time import (
    LogitNormalTimeSampler,
    LogitNormalWeight,
    NoWarp,
    ResolutionShift,
    UniformTimeSampler,
    UniformWeight,
)

TOKEN_COUNTS = [1, 64, 256, 700, 1024, 4096, 6000, 16384]


@pytest.mark.parametrize(
    "cfg",
    [ResolutionShiftConfig(), ResolutionShiftConfig(base_len=64, base_shift=0.2, max_len=1024, max_shift=2.0)],
    ids=["flux", "custom"],
)
def test_resolution_shift_equals_diffusers(cfg):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    t = np.concatenate([np.linspace(1e-4, 1.0, 501), [0.5, 0.999999]])
    warper = ResolutionShift(cfg)
    for n in TOKEN_COUNTS:
        mu = calculate_shift(n, cfg.base_len, cfg.max_len, cfg.base_shift, cfg.max_shift)
        want = torch.as_tensor(sched.time_shift(mu, 1.0, t))  # float64 reference
        got = warper(torch.tensor(t, dtype=torch.float32), torch.full((t.size,), n))
        assert got.dtype == torch.float32
        assert (got.double() - want).abs().max().item() <= 1e-6, n
        got64 = warper(torch.tensor(t), torch.full((t.size,), n))
        assert (got64 - want).abs().max().item() <= 1e-12


def test_resolution_shift_is_per_sample_and_keeps_the_ends():
    warper = ResolutionShift()
    lens = torch.tensor([256, 4096, 256])
    t = torch.tensor([0.5, 0.5, 0.0])
    out = warper(t, lens)
    assert out[0].item() == pytest.approx(math.exp(0.5) / (math.exp(0.5) + 1))
    assert out[1].item() == pytest.approx(math.exp(1.15) / (math.exp(1.15) + 1))
    assert out[2].item() == 0.0
    assert warper(torch.ones(2), torch.tensor([1, 10**6])).tolist() == [1.0, 1.0]
    assert torch.equal(NoWarp()(t, lens), t)


def test_resolution_shift_keeps_the_ends_where_its_gain_overflows():
    """From ~611,538 tokens e^-mu underflows to 0 in fp32, and t / (t + e^-mu (1 - t)) was 0/0 at
    t = 0: a NaN that Euler spread to every token of the sample. A mu extrapolated below the
    base (base_len > max_len) overflows e^-mu at t = 1 the same way."""
    from minfm_plugins.flow.config import ResolutionShiftConfig

    ends = torch.tensor([0.0, 0.5, 1.0])
    for warper, lens in ((ResolutionShift(), 2**24), (ResolutionShift(ResolutionShiftConfig(base_len=4096, max_len=256)), 2**24)):
        out = warper(ends, torch.full((3,), lens))
        assert torch.isfinite(out).all() and out[0] == 0 and out[2] == 1, out


@pytest.mark.parametrize("sampler", [UniformTimeSampler(), LogitNormalTimeSampler(LogitNormalTimeConfig(mu=0.5, sigma=1.2))])
def test_time_samplers_shape_range_determinism(sampler):
    t = sampler(50_000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (50_000,) and t.dtype == torch.float32
    assert (t > 0).all() and (t < 1).all()
    assert torch.equal(t, sampler(50_000, generator=torch.Generator().manual_seed(0)))


def test_time_sampler_distributions():
    u = UniformTimeSampler()(100_000, generator=torch.Generator().manual_seed(0))
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.002
    ln = LogitNormalTimeSampler(LogitNormalTimeConfig(mu=0.5, sigma=1.2))(100_000, generator=torch.Generator().manual_seed(0))
    logit = torch.log(ln) - torch.log1p(-ln)
    assert abs(logit.mean().item() - 0.5) < 0.02 and abs(logit.std().item() - 1.2) < 0.02
    # The widest and most shifted the config allows (logits past +-17 round to 0 or 1 in fp32)
    # stay strictly inside (0, 1).
    for mu in (-10.0, 0.0, 10.0):
        wide = LogitNormalTimeSampler(LogitNormalTimeConfig(mu=mu, sigma=10.0))(10_000, generator=torch.Generator().manual_seed(0))
        assert (wide > 0).all() and (wide < 1).all()


def test_weighters():
    t = torch.linspace(0, 1, 10_001, dtype=torch.float64)
    assert torch.equal(UniformWeight()(t), torch.ones_like(t))
    w = LogitNormalWeight(LogitNormalWeightConfig(mu=0.3, sigma=0.8))(t)
    assert w[0] == 0 and w[-1] == 0 and torch.isfinite(w).all()
    # A density: integrates to 1 over (0, 1), so the mean weight under uniform t is 1.
    assert torch.trapezoid(w, t).item() == pytest.approx(1.0, abs=1e-4)
    # Matches the textbook formula at an interior point.
    x, mu, s = 0.3, 0.3, 0.8
    logit = math.log(x / (1 - x))
    want = math.exp(-((logit - mu) ** 2) / (2 * s * s)) / (s * math.sqrt(2 * math.pi) * x * (1 - x))
    assert LogitNormalWeight(LogitNormalWeightConfig(mu=mu, sigma=s))(torch.tensor([x])).item() == pytest.approx(want, rel=1e-6)


def test_the_narrowest_weighter_allowed_is_finite():
    """sigma = 1e-200 passed the range (0, 10] and weighted by NaN; 1e-3 is the least now."""
    from minfm_core.errors import MinfmError

    t = torch.linspace(0, 1, 100_001)
    for mu in (-10.0, 0.0, 10.0):
        w = LogitNormalWeight(LogitNormalWeightConfig(mu=mu, sigma=1e-3))(t)
        assert torch.isfinite(w).all() and (w >= 0).all()
    with pytest.raises((MinfmError, ValueError), match=r"must be in \[0.001, 10\], got 0.0001"):
        LogitNormalWeightConfig(sigma=1e-4)


def test_rectified_path():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(10, 4, generator=g), torch.randn(10, 4, generator=g)
    t = torch.rand(10, generator=g)
    path = RectifiedPath()
    xt, v = path.noise(x0, eps, t), path.target(x0, eps)
    torch.testing.assert_close(xt, (1 - t[:, None]) * x0 + t[:, None] * eps)
    assert torch.equal(v, eps - x0)
    assert torch.equal(path.noise(x0, eps, torch.zeros(10)), x0)
    assert torch.equal(path.noise(x0, eps, torch.ones(10)), eps)
    assert torch.equal(path.noise(x0, eps, 0.25), path.noise(x0, eps, torch.full((10,), 0.25)))
    # The velocity splits back into the two endpoints.
    rx0, reps = split_velocity(xt, v, t)
    torch.testing.assert_close(rx0, x0)
    torch.testing.assert_close(reps, eps)
    bf = RectifiedPath(RectifiedConfig(compute_dtype="bf16"))
    assert bf.noise(x0, eps, t).dtype == torch.bfloat16 and bf.target(x0, eps).dtype == torch.bfloat16


def test_lr_schedule():
    kw = dict(lr=1e-3, min_lr=1e-5, warmup_steps=10, max_steps=110)
    assert lr_at(0, **kw) == pytest.approx(1e-4)
    assert lr_at(9, **kw) == pytest.approx(1e-3)
    assert lr_at(10, **kw) == pytest.approx(1e-3)
    assert lr_at(60, **kw) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(110, **kw) == pytest.approx(1e-5)
    assert lr_at(10_000, **kw) == pytest.approx(1e-5)
    lrs = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay after warm-up
    assert lr_at(0, lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=4) == 1.0
    assert lr_at(5, lr=1.0, min_lr=0.5, warmup_steps=0, max_steps=0) == 1.0  # no decay planned
    with pytest.raises(MinfmError, match="min_lr"):
        lr_at(0, lr=1e-5, min_lr=1e-3, warmup_steps=1, max_steps=2)
    with pytest.raises(MinfmError, match=">= 0"):
        lr_at(-1, **kw)
