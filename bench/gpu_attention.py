"""Every available attention backend vs sdpa on a GPU, in bf16: max abs diff and timings.

    python bench/gpu_attention.py                 # H=24, D=128 (FLUX.1-dev heads), a mixed pack
    python bench/gpu_attention.py --heads 16 --dim 64 --repeat 50

Prints one line per backend: forward and gradient max abs diff against ``sdpa`` (same
bf16 inputs) and against an fp32 sdpa reference, and median forward / forward+backward
milliseconds. Then the flux-debug model, bf16 autocast, with each backend vs sdpa.
Exits 1 when a backend is both over --tol from sdpa and more than twice as far from
fp32 as sdpa's own bf16 result. On CPU it runs what it can.
"""

from __future__ import annotations

import argparse
import sys

import torch

from minfm_core.packing import cu_seqlens
from minfm_plugins.attention.backends import BACKENDS, Auto, unavailable_reason
from minfm_plugins.attention.config import FlexConfig

# text + image tokens of a mixed batch: 64..4096 image tokens, 8..512 text tokens
LENS = [77 + 1024, 8 + 64, 30 + 256, 512 + 4096, 12 + 576, 64 + 784, 20 + 400, 77 + 100]


def bench(fn, repeat: int, device) -> float:
    if device.type != "cuda":
        import time

        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def make(name):
    if name == "flex":
        return BACKENDS[name](FlexConfig(compile=True))
    return BACKENDS[name]() if name != "auto" else Auto()


def attention_check(args, device) -> bool:
    lens = torch.tensor(LENS if args.scale == 1 else [max(2, int(n * args.scale)) for n in LENS], device=device)
    cu, mx, L = cu_seqlens(lens), int(lens.max()), int(lens.sum())
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(L, args.heads, args.dim, device=device, generator=g) for _ in range(3))
    dout = torch.randn(L, args.heads, args.dim, device=device, generator=g)

    def run(backend, dtype):
        qq, kk, vv = (x.to(dtype).requires_grad_() for x in (q, k, v))
        out = backend(qq, kk, vv, cu, mx)
        grads = torch.autograd.grad(out, (qq, kk, vv), dout.to(dtype))
        return out.float(), [x.float() for x in grads]

    ref32, g32 = run(BACKENDS["sdpa"](), torch.float32)
    ref, gref = run(BACKENDS["sdpa"](), torch.bfloat16)
    print(f"pack: {len(LENS)} samples, {L} tokens (max {mx}), {args.heads} heads x {args.dim}, device {device}")
    base32 = max((ref - ref32).abs().max().item(), max((a - b).abs().max().item() for a, b in zip(gref, g32)))
    print(f"  sdpa bf16 vs fp32 (out and grads): {base32:.2e}")
    ok = True
    for name in [*BACKENDS, "auto"]:
        why = unavailable_reason(name) if name != "auto" else None
        if why is not None:
            print(f"  {name:13s} unavailable: {why}")
            continue
        backend = make(name)
        try:
            out, grads = run(backend, torch.bfloat16)
        except Exception as exc:  # report and go on: one broken backend must not hide the others
            print(f"  {name:13s} FAILED: {type(exc).__name__}: {exc}")
            ok = False
            continue
        d_out = (out - ref).abs().max().item()
        d_grad = max((a - b).abs().max().item() for a, b in zip(grads, gref))
        d32 = max((out - ref32).abs().max().item(), max((a - b).abs().max().item() for a, b in zip(grads, g32)))
        qb, kb, vb = (x.to(torch.bfloat16).requires_grad_() for x in (q, k, v))
        fwd = bench(lambda: backend(qb, kb, vb, cu, mx), args.repeat, device)
        fb = bench(lambda: backend(qb, kb, vb, cu, mx).backward(dout.to(torch.bfloat16)), args.repeat, device)
        # Pass: within --tol of sdpa, or no further from fp32 than twice sdpa's own bf16 error.
        flag = "" if max(d_out, d_grad) <= args.tol or d32 <= 2 * base32 else "  <-- over tolerance"
        ok &= not flag
        print(f"  {name:13s} vs sdpa bf16: out {d_out:.2e} grad {d_grad:.2e} | vs fp32 {d32:.2e} | "
              f"fwd {fwd:7.2f} ms  fwd+bwd {fb:7.2f} ms{flag}")
    return ok


def model_check(args, device) -> bool:
    """flux-debug on a mixed pack under bf16 autocast: every backend vs sdpa."""
    sys.path.insert(0, "tests")
    from flux_helpers import make_batch, random_flux

    model = random_flux(guidance=True).to(device)
    batch = {k: (v.to(device) if v is not None else None) for k, v in
             make_batch(model.cfg, [(32, 32), (8, 8), (16, 24), (4, 40)], [77, 8, 30, 512], guidance=True).items()}
    outs = {}
    for name in [*BACKENDS, "auto"]:
        if name != "auto" and unavailable_reason(name) is not None:
            continue
        model.attention = make(name)
        try:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                outs[name] = model(**batch).float()
        except Exception as exc:
            print(f"  model with {name}: FAILED: {type(exc).__name__}: {exc}")
    ok = True
    for name, out in outs.items():
        d = (out - outs["sdpa"]).abs().max().item()
        ok &= d <= args.model_tol
        print(f"  flux-debug with {name:13s} vs sdpa (bf16 autocast): max abs diff {d:.2e}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the pack's lengths (CPU dry runs)")
    ap.add_argument("--tol", type=float, default=2e-2, help="bf16 max abs diff allowed vs sdpa")
    ap.add_argument("--model-tol", type=float, default=5e-2)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    ok = attention_check(args, device)
    ok &= model_check(args, device)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
