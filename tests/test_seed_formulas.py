"""minFM's flow components against an independent restatement of the seed's formulas.

Seed: github.com/Kai-46/minFM at commit 2b15c5ffa9f6a083650994e385ee11ca23ee7ab7.
Each reference below is written from the math (sample by sample, plain loops), not copied;
the comments cite the seed line it restates. minFM components are built through the
public registry (minfm_core.registry.get_registry()).

Deliberately NOT asserted (intentional deviations, docs/components.md "Against the seed"):
  * weighter at t outside [1e-6, 1 - 1e-6]: the seed clamps t to that interval
    (utils_fm/noiser.py:119-120); minFM gives 0 at t in {0, 1} (docs/components.md) and the
    unclamped density in between;
  * time samplers at the very edges: minFM clamps to [2**-24, 1 - 2**-24]
    (plugins/flow/time.py:_open_unit), the seed does not (noiser.py:190-193, 239);
  * guidance at scale < 1: the seed skips guidance altogether unless scale > 1
    (models/latent_fm.py:458, 485); minFM applies it for every scale != 1;
  * the noise stream: the seed draws one randn of the whole pack per step from one generator,
    also at eta = 0 (utils_fm/sampler.py:87); minFM draws per sample from that sample's
    generator, only when eta > 0. Here the seed's step is replayed sample by sample with the
    sample's generator, which is the same formula and, per sample, the same stream.
"""

from __future__ import annotations

import math

import pytest
import torch

from minfm_core.registry import get_registry
from minfm_plugins.flow import config as c


def build(kind, name, cfg=None):
    return get_registry().get(kind, name).build(cfg)


LENS = [5, 256, 40, 1, 1300]  # several samples of different lengths, packed


def packed(d=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(LENS), d, generator=g, dtype=dtype)


def pieces(x):
    out, o = [], 0
    for n in LENS:
        out.append(x[o:o + n])
        o += n
    return out


# ---- reference formulas (own restatement) -----------------------------------------------

def ref_shift(t: float, length: int, base_len=256, base_shift=0.5, max_len=4096, max_shift=1.15) -> float:
    # noiser.py:84-85: mu is linear in the token count through (base_len, base_shift), (max_len, max_shift)
    mu = base_shift + (length - base_len) * (max_shift - base_shift) / (max_len - base_len)
    # noiser.py:92-95 with sigma = 1 (line 115): t' = e^mu / (e^mu + (1/t - 1)); t = 0 -> 0, t = 1 -> 1
    if t == 0.0:
        return 0.0
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))


def ref_velocity(x, t):
    """Toy field used by both sides; t is one float per sample here."""
    return torch.tanh(x) * (1 + t) - 0.5 * x + t


def ref_ddim_one_sample(x, steps, eta, gen, length):
    # sampler.py:68: grid linspace(1, 0, steps + 1); :72-73 each point warped with the token count
    grid = [ref_shift(1.0 - k / steps, length) for k in range(steps + 1)]
    grid[-1] = 0.0
    for t, tn in zip(grid[:-1], grid[1:]):
        v = ref_velocity(x, t)
        # noiser.py:42-43: alpha = 1 - t, beta = t; sampler.py:83: x0 = x - beta v, eps = x + alpha v
        x0, eps = x - t * v, x + (1 - t) * v
        # sampler.py:86: b = max(beta' - eta (beta - beta') beta' / beta, 0)
        b = max(tn - eta * (t - tn) * tn / t, 0.0)
        # sampler.py:87-88: fresh N(0, I) every step, std sqrt(beta'^2 - b^2)
        z = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        x = (1 - tn) * x0 + b * eps + math.sqrt(tn * tn - b * b) * z
    return x


def ref_ep_cfg(vc, vu, s):
    out = []
    for c_, u in zip(pieces(vc), pieces(vu)):
        g = c_ + (s - 1.0) * (c_ - u)  # sampler.py:35
        # sampler.py:34, 36 via utils/pack.py:173-217: energy = sum of squares over ALL of the
        # sample's tokens and features (one number per sample); sampler.py:37-40: scale by sqrt(E_c / E_g)
        out.append(g * math.sqrt(c_.square().sum().item() / g.square().sum().item()))
    return torch.cat(out)


def ref_logit_normal_pdf(t: float, mu: float, sigma: float) -> float:
    # noiser.py:118-125 (interior): exp(-(logit t - mu)^2 / (2 sigma^2)) / (sigma sqrt(2 pi) t (1 - t))
    lg = math.log(t / (1 - t))
    return math.exp(-((lg - mu) ** 2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi) * t * (1 - t))


# ---- tests --------------------------------------------------------------------------------

def test_defaults_match_seed():
    # noiser.py:69-72 (warper), :133-134 and :201-202 (logit-normal mu, sigma);
    # models/latent_fm.py:512-514 (cfg_scale 5, eta 1.0)
    assert c.ResolutionShiftConfig() == c.ResolutionShiftConfig(base_len=256, base_shift=0.5, max_len=4096, max_shift=1.15)
    assert (c.LogitNormalTimeConfig().mu, c.LogitNormalTimeConfig().sigma) == (0.0, 1.0)
    assert (c.LogitNormalWeightConfig().mu, c.LogitNormalWeightConfig().sigma) == (0.0, 1.0)
    assert c.DDIMSDEConfig().eta == 1.0 and c.EPCFGConfig().scale == 5.0


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 3e-7)])
def test_resolution_shift(dtype, tol):
    warp = build("time_warper", "resolution_shift")
    g = torch.Generator().manual_seed(1)
    t = torch.rand(200, generator=g, dtype=torch.float64)
    t[:4] = torch.tensor([0.0, 1.0, 1e-7, 0.5])
    lens = torch.randint(1, 9000, (200,), generator=g)
    got = warp(t.to(dtype), lens)
    want = torch.tensor([ref_shift(a, b) for a, b in zip(t.tolist(), lens.tolist())], dtype=torch.float64)
    assert (got.double() - want).abs().max().item() <= tol
    assert got[0].item() == 0.0 and got[1].item() == 1.0


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0, 3.0])  # 3.0: b clamps to 0 on some steps
@pytest.mark.parametrize("steps", [1, 2, 9])
def test_ddim_sde_matches_seed_step(eta, steps):
    x = packed()
    lens = torch.tensor(LENS)

    def velocity(xt, t):  # per-sample t (n,), spread over the sample's tokens
        tt = torch.repeat_interleave(t, lens)[:, None].to(xt.dtype)
        return ref_velocity(xt, tt)

    gens = [torch.Generator().manual_seed(100 + i) for i in range(len(LENS))]
    got = build("sampler", "ddim_sde", c.DDIMSDEConfig(eta=eta))(
        velocity, x.clone(), lens, steps=steps, warper=build("time_warper", "resolution_shift"), generators=gens)
    want = torch.cat([ref_ddim_one_sample(p.clone(), steps, eta, torch.Generator().manual_seed(100 + i), n)
                      for i, (p, n) in enumerate(zip(pieces(x), LENS))])
    assert got.dtype == torch.float64
    assert (got - want).abs().max().item() <= 1e-10
    if steps == 1:  # last step lands on t' = 0: b = 0, no noise, x = x0 prediction at t = 1
        assert torch.allclose(got, x - ref_velocity(x, 1.0), atol=1e-12, rtol=0)


def test_ddim_sde_float32_state():
    # The seed integrates in float32 (sampler.py:67); minFM keeps float32 for float32 noise.
    x = packed(dtype=torch.float32, seed=3)
    lens = torch.tensor(LENS)

    def velocity(xt, t):
        return ref_velocity(xt, torch.repeat_interleave(t, lens)[:, None].to(xt.dtype))

    gens = [torch.Generator().manual_seed(7 + i) for i in range(len(LENS))]
    got = build("sampler", "ddim_sde", c.DDIMSDEConfig(eta=1.0))(
        velocity, x.clone(), lens, steps=12, warper=build("time_warper", "resolution_shift"), generators=gens)
    want = torch.cat([ref_ddim_one_sample(p.clone(), 12, 1.0, torch.Generator().manual_seed(7 + i), n)
                      for i, (p, n) in enumerate(zip(pieces(x), LENS))])
    assert got.dtype == torch.float32
    assert (got - want).abs().max().item() <= 2e-5


def test_euler_matches_seed_step():
    # sampler.py:77-78: x <- x + (t' - t) v(x, t), same warped grid
    x, lens, steps = packed(seed=4), torch.tensor(LENS), 9

    def velocity(xt, t):
        return ref_velocity(xt, torch.repeat_interleave(t, lens)[:, None].to(xt.dtype))

    got = build("sampler", "euler")(velocity, x.clone(), lens, steps=steps, warper=build("time_warper", "resolution_shift"))
    want = []
    for p, n in zip(pieces(x), LENS):
        grid = [ref_shift(1.0 - k / steps, n) for k in range(steps + 1)]
        for t, tn in zip(grid[:-1], grid[1:]):
            p = p + (tn - t) * ref_velocity(p, t)
        want.append(p)
    assert (got - torch.cat(want)).abs().max().item() <= 1e-10


@pytest.mark.parametrize("scale", [1.5, 5.0, 12.0])  # the seed guides only when scale > 1 (latent_fm.py:458)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 5e-6)])
def test_ep_cfg_matches_seed(scale, dtype, tol):
    vc, vu = packed(d=16, dtype=torch.float64, seed=5), packed(d=16, dtype=torch.float64, seed=6)
    got = build("guidance", "ep_cfg", c.EPCFGConfig(scale=scale))(vc.to(dtype), vu.to(dtype), torch.tensor(LENS))
    want = ref_ep_cfg(vc, vu, scale)
    assert got.dtype == dtype
    assert ((got.double() - want).abs().max() / want.abs().max()).item() <= tol


@pytest.mark.parametrize("mu,sigma", [(0.0, 1.0), (0.5, 1.3), (-1.0, 0.7), (1.0, 3.0)])
def test_logit_normal_time_sampler(mu, sigma):
    # noiser.py:190-191: z = randn(n, float32, generator); t = sigmoid(sigma z + mu)
    n = 4096
    z = torch.randn(n, generator=torch.Generator().manual_seed(9), dtype=torch.float32)
    want = torch.sigmoid(sigma * z + mu)
    got = build("time_sampler", "logit_normal", c.LogitNormalTimeConfig(mu=mu, sigma=sigma))(
        n, generator=torch.Generator().manual_seed(9))
    assert torch.equal(got, want)  # no draw reaches minFM's edge clamp at these sigmas


def test_uniform_time_sampler():
    # noiser.py:239: torch.rand(size, float32, generator)
    want = torch.rand(4096, generator=torch.Generator().manual_seed(2), dtype=torch.float32)
    got = build("time_sampler", "uniform")(4096, generator=torch.Generator().manual_seed(2))
    assert torch.equal(got, want)


@pytest.mark.parametrize("mu,sigma", [(0.0, 1.0), (0.5, 1.3), (-1.0, 0.7), (0.0, 10.0)])
def test_logit_normal_weighter_interior(mu, sigma):
    g = torch.Generator().manual_seed(8)
    t = torch.rand(2000, generator=g, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)  # where the seed's clamp is inactive
    got = build("time_weighter", "logit_normal", c.LogitNormalWeightConfig(mu=mu, sigma=sigma))(t)
    want = torch.tensor([ref_logit_normal_pdf(a, mu, sigma) for a in t.tolist()], dtype=torch.float64)
    assert ((got - want).abs() / want.clamp_min(1e-300)).max().item() <= 1e-9
