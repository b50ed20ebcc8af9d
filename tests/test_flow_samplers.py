"""Samplers: parity with diffusers' FlowMatchEulerDiscreteScheduler, and exactness on Gaussian data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minfm_core.errors import MinfmError
from minfm_core.packing import expand_per_token, split
from minfm_plugins.flow.config import DDIMSDEConfig
from minfm_plugins.flow.samplers import DDIMSDE, Euler, Heun, time_grid
from minfm_plugins.flow.time import ResolutionShift


def toy_velocity(lens):
    """A smooth nonlinear velocity field; t arrives per sample and is spread over that sample's tokens.

    Integrated backwards in t it is mildly contracting, so 1-ulp differences in the time grid
    are not amplified into large output differences (a chaotic field would test the field, not us).
    """

    def velocity(x, t):
        tt = expand_per_token(t, lens)[:, None].to(x.dtype)
        return torch.tanh(x) * (1 + tt) - 0.5 * x + tt

    return velocity


def diffusers_euler(noise: torch.Tensor, steps: int) -> torch.Tensor:
    """FLUX pipeline's way: sigmas linspace(1, 1/steps), mu = calculate_shift(seq_len), scheduler.step."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    mu = calculate_shift(noise.shape[0], 256, 4096, 0.5, 1.15)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=mu)
    velocity = toy_velocity(torch.tensor([noise.shape[0]]))
    x = noise.clone()
    for i, timestep in enumerate(sched.timesteps):
        v = velocity(x, sched.sigmas[i].reshape(1))
        x = sched.step(v, timestep, x, return_dict=False)[0]
    return x


def test_euler_with_resolution_shift_matches_diffusers_scheduler():
    g = torch.Generator().manual_seed(0)
    steps = 28
    lens = torch.tensor([1024, 64, 4096])  # mixed sizes in one pack, each shifted by its own length
    noise = torch.randn(int(lens.sum()), 8, generator=g)
    ours = Euler()(toy_velocity(lens), noise, lens, steps=steps, warper=ResolutionShift())
    assert ours.dtype == torch.float32
    for got, sample_noise in zip(split(ours, lens), split(noise, lens)):
        want = diffusers_euler(sample_noise, steps)
        assert (got - want).abs().max().item() <= 1e-5


# --- Gaussian data: the optimal velocity is known in closed form ------------------------

M = torch.tensor([1.0, -2.0, 0.3], dtype=torch.float64)
S = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)


def gaussian_velocity(lens, m=M, s=S):
    """E[eps - x0 | x_t] for x0 ~ N(m, diag s^2), x_t = (1 - t) x0 + t eps."""

    def velocity(x, t):
        tt = expand_per_token(t, lens)[:, None].to(torch.float64)
        var = (1 - tt) ** 2 * s**2 + tt**2
        r = x.to(torch.float64) - (1 - tt) * m
        return (tt - (1 - tt) * s**2) * r / var - m

    return velocity


def affine_map_errors(solver, steps, warper=None):
    """The ODE solution is affine in the noise, x0 = a z + b; exact flow gives a = s, b = m.

    Solving from z = 0 and z = 1 measures (a, b) without sampling noise.
    """
    lens = torch.tensor([1, 1])
    noise = torch.stack([torch.zeros(3), torch.ones(3)]).double()
    out = solver(gaussian_velocity(lens), noise, lens, steps=steps, warper=warper)
    b, a = out[0], out[1] - out[0]
    return (b - M).abs().max().item(), (a - S).abs().max().item()


@pytest.mark.parametrize("warper", [None, ResolutionShift()], ids=["plain", "shifted"])
def test_heun_beats_euler_and_both_converge_at_their_order(warper):
    euler = [affine_map_errors(Euler(), n, warper)[1] for n in (10, 20, 40)]
    heun = [affine_map_errors(Heun(), n, warper)[1] for n in (10, 20, 40)]
    for e, h in zip(euler, heun):
        assert h < e / 10  # equal steps: second order is an order of magnitude closer here
    # Doubling the steps halves Euler's error (order 1) and quarters Heun's (order 2).
    assert all(1.7 < a / b < 2.3 for a, b in zip(euler, euler[1:]))
    assert all(3.2 < a / b < 5.5 for a, b in zip(heun, heun[1:]))
    assert heun[-1] < 2e-3
    # The mean moves along x = (1 - t) m where the field is exact for any step: no error at all.
    assert affine_map_errors(Euler(), 5, warper)[0] < 1e-12


@pytest.mark.parametrize(
    "solver,steps",
    [(Euler(), 200), (Heun(), 50), (DDIMSDE(DDIMSDEConfig(eta=1.0)), 200), (DDIMSDE(DDIMSDEConfig(eta=0.5)), 200)],
    ids=["euler", "heun", "ddim_sde-eta1", "ddim_sde-eta0.5"],
)
def test_samplers_reach_data_mean_and_variance(solver, steps):
    g = torch.Generator().manual_seed(0)
    lens = torch.tensor([12_000, 8_000])
    noise = torch.randn(int(lens.sum()), 3, generator=g)
    out = solver(gaussian_velocity(lens), noise, lens, steps=steps, generators=[g, torch.Generator().manual_seed(1)]).double()
    assert (out.mean(0) - M).abs().max().item() < 0.05
    assert (out.var(0) / S**2 - 1).abs().max().item() < 0.06


def test_ddim_sde_eta0_is_the_euler_step():
    lens = torch.tensor([300, 40])
    noise = torch.randn(340, 4, generator=torch.Generator().manual_seed(1))
    e = Euler()(toy_velocity(lens), noise, lens, steps=12, warper=ResolutionShift())
    d = DDIMSDE(DDIMSDEConfig(eta=0.0))(toy_velocity(lens), noise, lens, steps=12, warper=ResolutionShift())
    torch.testing.assert_close(d, e, rtol=0, atol=1e-5)


def test_ddim_sde_is_reproducible_from_its_generator_and_stochastic_across_seeds():
    lens = torch.tensor([50])
    noise = torch.randn(50, 2, generator=torch.Generator().manual_seed(2))
    run = lambda seed: DDIMSDE()(  # noqa: E731
        toy_velocity(lens), noise, lens, steps=8, generators=[torch.Generator().manual_seed(seed)]
    )
    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))


def test_ddim_sde_sample_depends_on_its_own_seed_not_on_its_pack():
    """The demo packs concurrent requests; sample.batch_size packs prompts: either way an
    image must come out the same as when drawn alone (it did not: one generator per pack)."""
    def solve(lens, noise, seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return DDIMSDE(DDIMSDEConfig(eta=1.0))(toy_velocity(torch.tensor(lens)), noise, torch.tensor(lens),
                                                steps=6, generators=gens)

    a = torch.randn(30, 2, generator=torch.Generator().manual_seed(5))
    b = torch.randn(50, 2, generator=torch.Generator().manual_seed(6))
    alone = solve([50], b, [6])
    first, second = solve([30, 50], torch.cat([a, b]), [5, 6]).split([30, 50])
    swapped = solve([50, 30], torch.cat([b, a]), [6, 5])[:50]
    torch.testing.assert_close(second, alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(swapped, alone, rtol=0, atol=1e-6)
    assert not torch.allclose(first, solve([30], a, [6]))  # and the seed matters
    with pytest.raises(ValueError, match="1 generators for 2 samples"):
        solve([30, 50], torch.cat([a, b]), [5])


def test_per_sample_shift_and_callback():
    lens = torch.tensor([256, 4096])
    ts = time_grid(4, lens, ResolutionShift())
    assert ts.shape == (5, 2)
    assert ts[0].tolist() == [1.0, 1.0] and ts[-1].tolist() == [0.0, 0.0]
    assert (ts[1:-1, 1] > ts[1:-1, 0]).all()  # more tokens -> stays noisier longer
    calls = []
    Heun()(toy_velocity(lens), torch.zeros(4352, 2), lens, steps=4, callback=lambda k, n: calls.append((k, n)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_bad_arguments():
    lens = torch.tensor([3])
    with pytest.raises(MinfmError, match="steps must be >= 1"):
        Euler()(toy_velocity(lens), torch.zeros(3, 2), lens, steps=0)
    with pytest.raises(ValueError, match="sum to 3 but noise has 4"):
        Euler()(toy_velocity(lens), torch.zeros(4, 2), lens, steps=2)
