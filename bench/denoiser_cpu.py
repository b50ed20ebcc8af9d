"""Tokens/s of FLUX forward+backward on CPU: minFM's packed model vs diffusers' FluxTransformer2DModel.

    python bench/denoiser_cpu.py                           # the issue's workloads on flux-debug
    python bench/denoiser_cpu.py --scale 0.5 --repeat 2    # a quick run (half the token counts)
    python bench/denoiser_cpu.py --d-model 256 --d-head 64 --blocks 2 4   # a wider model
    python bench/denoiser_cpu.py --profile                 # + where ours' time goes (GEMMs, attention, rest)

Same process, identical weights (through the state-dict adapter), fp32, sdpa attention.
Workloads: (a) uniform: 8 samples x (256 image + 32 text) tokens; (b) mixed: image token
counts 64..1024 and text 8..77 per sample; (c) quickstart: 16 samples of 256 or 384 image
and 1..9 text tokens; ours runs packed, diffusers runs the batch
padded to the longest image and the longest prompt (no mask: padding only costs time).
Tokens/s counts real (unpadded) text+image tokens for both. The "compiled" column is ours
with ``compile = true`` (per-block torch.compile, plugins/flux/compiled.py), same weights,
timed in the same alternation after its compile (``--no-compile`` leaves it out).
"""

from __future__ import annotations

import argparse
import time

import torch

from minfm_plugins.attention.backends import Sdpa
from minfm_plugins.flux.config import FluxConfig
from minfm_plugins.flux.model import build_flux
from minfm_plugins.flux.state_dict import bfl_to_diffusers, diffusers_config

MIXED_IMG = [64, 1024, 256, 576, 144, 784, 400, 100]
MIXED_TXT = [8, 77, 30, 12, 64, 45, 20, 77]
# One micro-batch of the quickstart: 32x32 / 32x48 / 48x32 pictures (256 / 384 tokens), 1-9 words.
QUICK_IMG = [256, 384, 384, 256, 384, 256, 384, 384, 256, 384, 256, 384, 256, 384, 384, 256]
QUICK_TXT = [4, 9, 4, 1, 9, 4, 9, 4, 9, 4, 1, 9, 4, 9, 4, 9]


def grid(n_tokens: int) -> torch.Tensor:
    w = int(n_tokens**0.5)
    while n_tokens % w:
        w -= 1
    y, x = torch.meshgrid(torch.arange(n_tokens // w), torch.arange(w), indexing="ij")
    return torch.stack([torch.zeros_like(y), y, x], -1).reshape(-1, 3)


def workload(cfg, img_counts, txt_counts, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(img_counts)
    return dict(
        img=torch.randn(sum(img_counts), cfg.d_img, generator=g),
        img_pos=torch.cat([grid(c) for c in img_counts]),
        img_lens=torch.tensor(img_counts),
        txt=torch.randn(sum(txt_counts), cfg.d_txt, generator=g),
        txt_lens=torch.tensor(txt_counts),
        t=torch.rand(n, generator=g),
        vec=torch.randn(n, cfg.d_vec, generator=g),
    )


def padded(cfg, batch):
    """The same batch as diffusers wants it: (n, max_len, d), padded with zeros."""
    n = batch["t"].numel()
    li, lt = int(batch["img_lens"].max()), int(batch["txt_lens"].max())
    img = torch.zeros(n, li, cfg.d_img)
    txt = torch.zeros(n, lt, cfg.d_txt)
    for i, (a, b) in enumerate(zip(batch["img"].split(batch["img_lens"].tolist()), batch["txt"].split(batch["txt_lens"].tolist()))):
        img[i, : a.shape[0]], txt[i, : b.shape[0]] = a, b
    return dict(hidden_states=img, encoder_hidden_states=txt, pooled_projections=batch["vec"], timestep=batch["t"],
                img_ids=grid(li), txt_ids=torch.zeros(lt, 3), return_dict=False)


def timed(steps, repeat: int) -> list[float]:
    """Best time of each step; the steps alternate so that load from other processes hits both alike."""
    for step in steps:
        step()  # warm-up
    best = [float("inf")] * len(steps)
    for _ in range(repeat):
        for i, step in enumerate(steps):
            t0 = time.perf_counter()
            step()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def time_split(step, passes: int) -> str:
    """ms per pass in GEMMs, in attention (sdpa's kernels, forward and backward) and in everything else."""
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(passes):
            step()
    ms = {"gemm": 0.0, "attention": 0.0, "total": 0.0}
    for ev in prof.key_averages():
        t = ev.self_cpu_time_total / 1e3 / passes
        ms["total"] += t
        if ev.key in ("aten::mm", "aten::addmm", "aten::bmm"):
            ms["gemm"] += t
        elif "scaled_dot_product" in ev.key:
            ms["attention"] += t
    rest = ms["total"] - ms["gemm"] - ms["attention"]
    return f"GEMMs {ms['gemm']:.0f} + attention {ms['attention']:.0f} + rest {rest:.0f} = {ms['total']:.0f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flavor", default="flux-debug")
    ap.add_argument("--d-model", type=int, default=None, help="override the flavor's width")
    ap.add_argument("--d-head", type=int, default=None, help="override the flavor's head width (RoPE axes follow)")
    ap.add_argument("--blocks", type=int, nargs=2, default=None, metavar=("DOUBLE", "SINGLE"))
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every token count (quick runs)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-compile", action="store_true", help="leave out the compiled column")
    ap.add_argument("--profile", action="store_true",
                    help="also split a pass of ours (and compiled) into GEMMs, attention and the rest (torch.profiler)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import FluxTransformer2DModel

    over = {}
    if args.d_model:
        over["d_model"] = args.d_model
    if args.d_head:  # FLUX's split of a head over (t, y, x): 1/8, 7/16, 7/16, each even
        y = args.d_head * 7 // 32 * 2
        over.update(d_head=args.d_head, rope_axes=(args.d_head - 2 * y, y, y))
    if args.blocks:
        over.update(n_ds_blocks=args.blocks[0], n_ss_blocks=args.blocks[1])
    cfg = FluxConfig(flavor=args.flavor, **over)
    torch.manual_seed(0)
    ours = build_flux(cfg, attention=Sdpa(), load_weights=False)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02)
    comp = None
    if not args.no_compile:
        import attrs

        comp = build_flux(attrs.evolve(cfg, compile=True), attention=Sdpa(), load_weights=False)
        comp.load_state_dict(ours.state_dict())
    ref = FluxTransformer2DModel(**{k: v for k, v in diffusers_config(cfg).items() if not k.startswith("_")})
    ref.load_state_dict(bfl_to_diffusers(ours.state_dict()))
    s = args.scale
    loads = {
        "uniform": ([max(1, int(256 * s))] * 8, [max(1, int(32 * s))] * 8),
        "mixed": ([max(1, int(c * s)) for c in MIXED_IMG], [max(1, int(c * s)) for c in MIXED_TXT]),
        "quick": ([max(1, int(c * s)) for c in QUICK_IMG], QUICK_TXT),
    }
    print(f"model: d_model {cfg.d_model}, {cfg.n_heads} heads x {cfg.d_head}, {cfg.n_ds_blocks}+{cfg.n_ss_blocks} blocks, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, (img_counts, txt_counts) in loads.items():
        batch = workload(cfg, img_counts, txt_counts)
        dbatch = padded(cfg, batch)
        real = sum(img_counts) + sum(txt_counts)
        n_pad = len(img_counts) * (max(img_counts) + max(txt_counts))

        def step_ours():
            ours.zero_grad(set_to_none=True)
            ours(**batch).square().mean().backward()

        def step_ref():
            ref.zero_grad(set_to_none=True)
            ref(**dbatch)[0].square().mean().backward()

        def step_comp():
            comp.zero_grad(set_to_none=True)
            comp(**batch).square().mean().backward()

        if comp is not None:
            t0 = time.perf_counter()
            step_comp()  # compiles (the first workload) or reuses the graphs with new sizes
            print(f"{name:8s} compiled first call {time.perf_counter() - t0:.1f} s")
        t_ours, t_ref, *t_comp = timed([step_ours, step_ref] + ([step_comp] if comp is not None else []), args.repeat)
        line = (f"{name:8s} real tokens {real:6d} (diffusers padded {n_pad:6d}): "
                f"ours {real / t_ours:9.0f} tok/s, diffusers {real / t_ref:9.0f} tok/s, ratio {t_ref / t_ours:.2f}x")
        if t_comp:
            line += f"; compiled {real / t_comp[0]:9.0f} tok/s, compiled / ours {t_ours / t_comp[0]:.2f}x"
        print(line)
        if args.profile:
            for label, step in [("ours", step_ours)] + ([("compiled", step_comp)] if comp is not None else []):
                print(f"{'':8s} {label:8s} per pass: {time_split(step, args.repeat)}")


if __name__ == "__main__":
    main()
