"""flux-tiny training throughput and MFU on one GPU (FSDP2, bf16, attention `auto`).

    python bench/gpu_train.py                  # on a GPU machine, compiled blocks, < 5 minutes
    python bench/gpu_train.py --compile both   # eager, then compiled (the comparison)
    python bench/gpu_train.py --smoke          # CPU, flux-debug, tiny batch (compile: a minute or two)

ImageNet-256 shapes: 256 image tokens + 1 class token per sample (the seed's setup), the
largest batch that fits (searched), with ``model.denoiser.compile = true`` (per-block
torch.compile inside the FSDP2 units, plugins/flux/compiled.py) unless ``--compile off``.
Prints tokens/s, achieved TFLOP/s and MFU against the bf16 matmul rate measured on the
same GPU in the same run (so the ratio does not depend on a data sheet).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist


def matmul_peak(device, dtype=torch.bfloat16, n=8192, iters=20) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t)


def build(flavor: str, device, compile_blocks: bool, smoke: bool):
    from minfm_core.registry import get_registry

    reg = get_registry()
    flux = reg.get("denoiser", "flux")
    cfg = flux.config(flavor=flavor, d_txt=768, d_vec=768, compile=compile_blocks)
    torch.manual_seed(0)
    model = flux.build(cfg).to(device)
    par = reg.get("parallelizer", "fsdp2")
    pcfg = par.config(shard_size=1, param_dtype="fp32" if smoke else "bf16", reduce_dtype="fp32")
    model = par.build(pcfg).parallelize(model, world_size=1, device=device)
    return model, cfg


def batch(n: int, cfg, device):
    img_tokens, txt_tokens = 256, 1
    img = torch.randn(n * img_tokens, cfg.d_img, device=device)
    ys, xs = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    pos1 = torch.stack([torch.zeros_like(ys), ys, xs], -1).reshape(-1, 3)
    pos = pos1.repeat(n, 1).to(device)
    lens = torch.full((n,), img_tokens, device=device)
    txt = torch.randn(n * txt_tokens, cfg.d_txt, device=device)
    txt_lens = torch.full((n,), txt_tokens, device=device)
    t = torch.rand(n, device=device)
    vec = torch.randn(n, cfg.d_vec, device=device)
    return (img, pos, lens, txt, txt_lens, t, vec), n * (img_tokens + txt_tokens)


def step_time(model, opt, args_, iters: int, device) -> float:
    def one():
        out = model(*args_[:6], vec=args_[6])
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="CPU, flux-debug, tiny batch")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--compile", choices=("on", "off", "both"), default="on",
                    help="compiled blocks (default), eager, or eager then compiled")
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    store = tempfile.mktemp()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}", rank=0, world_size=1)
    flavor = "flux-debug" if args.smoke else "flux-tiny"
    peak = matmul_peak(device) if device.type == "cuda" else None
    if peak:
        print(f"measured bf16 matmul: {peak / 1e12:.0f} TFLOP/s")
    for compile_blocks in {"on": (True,), "off": (False,), "both": (False, True)}[args.compile]:
        model, cfg = build(flavor, device, compile_blocks, args.smoke)
        n_params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        sizes = [2] if args.smoke else [64, 128, 192, 256, 384]
        best = None
        for n in sizes:
            try:
                inputs, tokens = batch(n, cfg, device)
                dt = step_time(model, opt, inputs, 2 if args.smoke else args.iters, device)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                break
            # 6 N per token for the matmuls, plus attention: 12 * layers * d_model * seq per token.
            layers = cfg.n_ds_blocks + cfg.n_ss_blocks
            flops_tok = 6 * n_params + 12 * layers * cfg.d_model * (tokens // n)
            achieved = flops_tok * tokens / dt
            best = (n, tokens / dt, achieved)
            mfu = f"{achieved / peak:.1%}" if peak else "n/a"
            print(f"compile={compile_blocks} batch={n}: {tokens / dt:,.0f} tokens/s, {achieved / 1e12:.1f} TFLOP/s, MFU {mfu}")
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if best:
            print(f"best (compile={compile_blocks}): batch {best[0]}, {best[1]:,.0f} tokens/s")
    dist.destroy_process_group()
    os.path.exists(store) and os.remove(store)


if __name__ == "__main__":
    main()
