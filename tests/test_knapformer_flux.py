"""The flux-debug denoiser with the KnapFormer balancer equals the unbalanced run (gloo, CPU).

Forward outputs, input gradients and parameter gradients (all-reduced, and once under
FSDP2) match per sample for bags g1n4, g2n2 (Ulysses) and g1n2+g2n1 (both), with
empty text, a rank with no samples and sequences shorter than a bag's G. Ulysses
attention alone equals full attention.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flux_helpers import grid_pos, random_flux
from minfm_plugins.attention.backends import Sdpa
from minfm_plugins.knapformer.config import KnapformerConfig
from minfm_plugins.knapformer.route import KnapformerBalancer
from ports import free_port

# Per rank: (image h, w, text length) of each sample. Rank 2 has no samples; empty texts;
# a 1-token-text 1x1 image (2 tokens: shorter than... nothing, but one chunk per GPU of a
# 2-GPU bag has no text); one long sample that dominates.
BATCHES = {
    "mixed": [[(4, 6, 7), (3, 3, 0)], [(8, 8, 5)], [], [(5, 2, 3), (1, 1, 1), (2, 3, 0)]],
    "uniform": [[(4, 4, 6), (4, 4, 6)], [(4, 4, 6)], [(4, 4, 6), (4, 4, 6)], [(4, 4, 6)]],
}


def _batch(cfg, samples, seed):
    g = torch.Generator().manual_seed(seed)
    n = len(samples)
    img_lens = torch.tensor([h * w for h, w, _ in samples], dtype=torch.long)
    txt_lens = torch.tensor([t for _, _, t in samples], dtype=torch.long)
    pos = [grid_pos(h, w) for h, w, _ in samples]
    return dict(
        img=torch.randn(int(img_lens.sum()), cfg.d_img, generator=g),
        img_pos=torch.cat(pos) if pos else torch.zeros(0, 3, dtype=torch.long),
        img_lens=img_lens,
        txt=torch.randn(int(txt_lens.sum()), cfg.d_txt, generator=g),
        txt_lens=txt_lens,
        t=torch.rand(n, generator=g),
        vec=torch.randn(n, cfg.d_vec, generator=g),
        guidance=torch.rand(n, generator=g) * 4,
    )


def _run(model, batch):
    """Forward + backward of a fixed weighted sum; returns (out, input grads, param grads)."""
    if batch["img_lens"].numel() == 0 and getattr(model, "balancer", None) is None:
        # The plain forward needs a sample; an empty rank contributes nothing.
        zero = {k: torch.zeros_like(batch[k]) for k in ("img", "txt")}
        return torch.zeros(0, model.cfg.d_img), zero, {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    b = {k: (v.clone().requires_grad_(True) if k in ("img", "txt") else v) for k, v in batch.items()}
    out = model(**b)
    w = torch.cos(torch.arange(out.numel(), dtype=torch.float32)).view(out.shape)
    (out * w).sum().backward()
    grads = {k: b[k].grad.clone() for k in ("img", "txt")}
    params = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"  # the zero-gradient rule (FSDP would hang)
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
        params[name] = g
    model.zero_grad(set_to_none=True)
    return out.detach(), grads, params


def _close(a, b, what, tol=2e-5):
    """fp32 with sums in another order: max abs difference within tol x the reference's scale."""
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    diff = float((a - b).abs().max()) if b.numel() else 0.0
    assert a.shape == b.shape and diff <= tol * scale, f"{what}: max abs diff {diff:.3g} (scale {scale:.3g})"


def _check_ulysses(rank):
    """Attention over sequences split across a 2-GPU bag equals unsplit attention."""
    bal = KnapformerBalancer(KnapformerConfig(bags="g2n2"))
    lens_all = [[9, 1], [3], [], [14, 2, 5]]
    lens = torch.tensor(lens_all[rank], dtype=torch.long)
    H, D = 4, 8
    g = torch.Generator().manual_seed(3)
    total = sum(map(sum, lens_all))
    q_g, k_g, v_g = (torch.randn(total, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    start = sum(sum(x) for x in lens_all[:rank])
    qkv = [x[start : start + int(lens.sum())].clone().requires_grad_(True) for x in (q_g, k_g, v_g)]
    ref = Sdpa()(*qkv, torch.tensor([0, *np.cumsum(lens_all[rank])], dtype=torch.int32), 0) if lens.numel() else None
    x = torch.cat(qkv, 1).flatten(1)
    y, new_lens, _, h = bal.route(x, lens)
    q, k, v = y.view(-1, 3 * H, D).split(H, 1)
    attn = bal.attention(Sdpa(), h)
    out = bal.reverse(attn(q, k, v, None, None).flatten(1), h).view(-1, H, D)
    (out.sin().sum()).backward()
    if ref is not None:
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
        grads = [t.grad.clone() for t in qkv]
        for t in qkv:
            t.grad = None
        ref.sin().sum().backward()
        for a, t in zip(grads, qkv):
            torch.testing.assert_close(a, t.grad, rtol=1e-10, atol=1e-12)


def _worker(rank: int, world: int, port: int, fsdp_bags: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        _check_ulysses(rank)
        model = random_flux(guidance=True).train()
        for case, per_rank in BATCHES.items():
            batch = _batch(model.cfg, per_rank[rank], seed=rank)
            model.balancer = None
            ref_out, ref_in, ref_p = _run(model, batch)
            for name in ref_p:
                dist.all_reduce(ref_p[name])
            for bags in ("g1n4", "g2n2", "g1n2+g2n1"):
                model.balancer = KnapformerBalancer(KnapformerConfig(bags=bags))
                out, grads, params = _run(model, batch)
                _close(out, ref_out, f"{case} {bags} output")
                for k in grads:
                    _close(grads[k], ref_in[k], f"{case} {bags} d{k}")
                for name, g in params.items():
                    dist.all_reduce(g)
                    _close(g, ref_p[name], f"{case} {bags} {name}")
        # FSDP2: the same gradients (averaged over ranks), through the balanced forward.
        if fsdp_bags:
            from minfm_core.registry import get_registry

            comp = get_registry().get("parallelizer", "fsdp2")
            sharded = random_flux(guidance=True).train()
            sharded.balancer = KnapformerBalancer(KnapformerConfig(bags=fsdp_bags))
            sharded = comp.build(comp.config(param_dtype="fp32")).parallelize(sharded, world_size=world, device="cpu")
            batch = _batch(sharded.cfg, BATCHES["mixed"][rank], seed=rank)
            model.balancer = None
            ref_out, _, ref_p = _run(model, batch)
            out, _, params = _run(sharded, batch)
            torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
            for name, g in params.items():
                dist.all_reduce(ref_p[name])
                _close(g, ref_p[name] / world, f"fsdp2 {name}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_flux_balanced_equals_unbalanced_4_ranks():
    mp.spawn(_worker, args=(4, free_port(), "g1n2+g2n1"), nprocs=4, join=True)


def test_flux_balanced_single_rank_is_exact():
    """g1n1 runs the whole balanced path in one process (route = identity): bit-exact."""
    model = random_flux(guidance=True).train()
    batch = _batch(model.cfg, BATCHES["mixed"][0] + BATCHES["mixed"][3], seed=0)
    ref = _run(model, batch)
    model.balancer = KnapformerBalancer(KnapformerConfig(bags="g1n1"))
    got = _run(model, batch)
    assert torch.equal(got[0], ref[0])
    for a, b in zip(got[1:], ref[1:]):
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_none_balancer_keeps_plain_forward():
    from minfm_plugins.flux.config import FluxConfig
    from minfm_plugins.flux.model import build_flux
    from minfm_plugins.knapformer.route import NoBalancer

    model = build_flux(FluxConfig(flavor="flux-debug"), load_weights=False, attention=Sdpa(), balancer=NoBalancer())
    assert model.balancer is None


def test_balanced_forward_rejects_differentiable_conditioning():
    from minfm_core.errors import MinfmError

    model = random_flux()
    model.balancer = KnapformerBalancer(KnapformerConfig(bags="g1n1"))
    batch = _batch(model.cfg, BATCHES["mixed"][0], seed=0)
    batch["vec"].requires_grad_(True)
    with pytest.raises(MinfmError, match="without gradient"):
        model(**batch)
