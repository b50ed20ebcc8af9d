"""Render the pictures of docs/components.md into docs/img/.

    pip install matplotlib
    python docs/make_component_plots.py

Components are built through the registry, exactly as a recipe would select them.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from minfm_core.packing import expand_per_token  # noqa: E402
from minfm_core.registry import get_registry  # noqa: E402
from minfm_core.schedule import lr_at  # noqa: E402

OUT = Path(__file__).resolve().parent / "img"


def build(kind: str, name: str, **options):
    comp = get_registry().get(kind, name)
    return comp.build(comp.config(**options))


def save(fig, name: str) -> None:
    fig.tight_layout()
    fig.savefig(OUT / name, dpi=100)
    plt.close(fig)
    print("wrote", OUT / name)


def time_samplers() -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    g = torch.Generator().manual_seed(0)
    bins = torch.linspace(0, 1, 81)
    for label, sampler in [
        ("uniform", build("time_sampler", "uniform")),
        ("logit_normal (mu 0, sigma 1)", build("time_sampler", "logit_normal")),
        ("logit_normal (mu 0.5, sigma 1)", build("time_sampler", "logit_normal", mu=0.5)),
        ("logit_normal (mu 0, sigma 0.5)", build("time_sampler", "logit_normal", sigma=0.5)),
    ]:
        t = sampler(200_000, generator=g)
        density = torch.histc(t, bins=80, min=0, max=1) / (t.numel() / 80)
        ax.plot(((bins[1:] + bins[:-1]) / 2).numpy(), density.numpy(), label=label)
    ax.set(xlabel="t (0 clean, 1 noise)", ylabel="density", title="time samplers (200k draws)")
    ax.legend(fontsize=8)
    save(fig, "time_samplers.png")


def time_warper() -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    t = torch.linspace(0, 1, 201)
    ax.plot(t.numpy(), build("time_warper", "none")(t, 0).numpy(), "k--", label="none")
    warper = build("time_warper", "resolution_shift")
    for n in (64, 256, 1024, 4096, 16384):
        mu = warper.mu(n).item()
        ax.plot(t.numpy(), warper(t, torch.full_like(t, n)).numpy(), label=f"{n} tokens (mu {mu:.2f})")
    ax.set(xlabel="t", ylabel="warped t'", title="resolution_shift (FLUX defaults)")
    ax.legend(fontsize=8)
    save(fig, "time_warper.png")


def time_weighters() -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    t = torch.linspace(0, 1, 401)
    ax.plot(t.numpy(), build("time_weighter", "uniform")(t).numpy(), "k--", label="uniform")
    for mu, sigma in ((0.0, 1.0), (0.0, 0.5), (0.5, 1.0)):
        w = build("time_weighter", "logit_normal", mu=mu, sigma=sigma)(t)
        ax.plot(t.numpy(), w.numpy(), label=f"logit_normal (mu {mu}, sigma {sigma})")
    ax.set(xlabel="t", ylabel="loss weight", title="time weighters (mean 1 under uniform t)")
    ax.legend(fontsize=8)
    save(fig, "time_weighters.png")


def lr_schedule() -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    steps = list(range(0, 12_001, 20))
    kw = dict(lr=3e-4, min_lr=1e-5, warmup_steps=1000, max_steps=10_000)
    ax.plot(steps, [lr_at(s, **kw) for s in steps])
    ax.axvline(1000, color="gray", lw=0.5)
    ax.axvline(10_000, color="gray", lw=0.5)
    ax.set(xlabel="optimizer step", ylabel="learning rate",
           title="lr_at: warm-up 1000, cosine to min_lr at max_steps 10000")
    save(fig, "lr_schedule.png")


def sampler_convergence() -> None:
    """Error of the learned scale on 1-D Gaussian data (exact velocity), by solver and step count."""
    m, s = 1.0, 0.5
    lens = torch.tensor([1, 1])

    def velocity(x, t):
        tt = expand_per_token(t, lens)[:, None].double()
        var = (1 - tt) ** 2 * s**2 + tt**2
        return (tt - (1 - tt) * s**2) * (x - (1 - tt) * m) / var - m

    noise = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    steps = [4, 8, 16, 32, 64, 128]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name in ("euler", "heun"):
        solver = build("sampler", name)
        errs = []
        for n in steps:
            out = solver(velocity, noise, lens, steps=n)
            errs.append(abs((out[1] - out[0]).item() - s))
        ax.loglog(steps, errs, "o-", label=name)
    ax.set(xlabel="steps", ylabel="|learned std - data std|", title="ODE solvers on Gaussian data (exact velocity)")
    ax.legend()
    save(fig, "sampler_convergence.png")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    time_samplers()
    time_warper()
    time_weighters()
    lr_schedule()
    sampler_convergence()


if __name__ == "__main__":
    main()
