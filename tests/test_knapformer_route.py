"""Runtime routing on gloo (127.0.0.1, CPU): identity, exact metadata, gradients, equal outputs."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minfm_plugins.knapformer.config import KnapformerConfig, NoBalancerConfig
from minfm_plugins.knapformer.route import KnapformerBalancer, NoBalancer
from ports import free_port

D = 8


def _global_batch(case: str, world: int):
    """Every rank's lengths, built identically on all ranks."""
    g = torch.Generator().manual_seed(len(case))  # str hash differs between processes
    if case == "random":
        return [torch.randint(1, 40, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist() for _ in range(world)]
    if case == "few":  # fewer sequences than ranks, empty ranks
        return [[5], []] + [[] for _ in range(world - 2)]
    if case == "huge":  # one sequence larger than any bag's capacity, plus a 1-token one
        return [[300, 1], [3]] + [[2, 7] for _ in range(world - 2)]
    raise ValueError(case)


def _data(lens_per_rank):
    """Global tokens and metadata; a token's value encodes (sample, position)."""
    total = sum(sum(x) for x in lens_per_rank)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(total, D, generator=g, dtype=torch.float64)
    ids = torch.arange(total, dtype=torch.int64) + (1 << 40)  # not representable in fp32 or bf16
    mask = ids % 3 == 0
    return tokens, ids, mask


def _local(x, lens_per_rank, rank):
    start = sum(sum(x) for x in lens_per_rank[:rank])
    return x[start : start + sum(lens_per_rank[rank])]


def _worker(rank: int, world: int, port: int, specs: tuple[str, ...]):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.GELU()).double()
    try:
        for bags in specs:
            bal = KnapformerBalancer(KnapformerConfig(bags=bags), group=None)
            for case in ("random", "few", "huge"):
                lens_all = _global_batch(case, world)
                tokens_g, ids_g, mask_g = _data(lens_all)
                x = _local(tokens_g, lens_all, rank).clone().requires_grad_(True)
                ids, mask = _local(ids_g, lens_all, rank), _local(mask_g, lens_all, rank)
                lens = torch.tensor(lens_all[rank], dtype=torch.int64)
                y, new_lens, (ids2, mask2), handle = bal.route(x, lens, [ids, mask.view(-1, 1)])
                assert int(new_lens.sum()) == y.shape[0] == ids2.shape[0]
                assert (new_lens > 0).all(), "no zero-length chunk"
                # Metadata is bit-exact and travels with its token.
                assert ids2.dtype == torch.int64 and mask2.dtype == torch.bool
                assert torch.equal(tokens_g[ids2 - (1 << 40)], y.detach())
                assert torch.equal(mask2.view(-1), ids2 % 3 == 0)
                # Identity: reverse(route(x)) == x, bit for bit.
                assert torch.equal(bal.reverse(y, handle), x)
                # A balanced per-token layer equals the unbalanced one, outputs and gradients.
                out = bal.reverse(layer(y), handle)
                ref = layer(x)
                torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
                weight = torch.cos(ids.double()).view(-1, 1)
                (out * weight).sum().backward()
                gx = x.grad.clone()
                pg = [p.grad.clone() for p in layer.parameters()]
                x.grad = None
                layer.zero_grad()
                (ref * weight).sum().backward()
                torch.testing.assert_close(gx, x.grad, rtol=0, atol=1e-12)
                for a, b in zip(pg, layer.parameters()):
                    dist.all_reduce(a)
                    ref_g = b.grad.clone()
                    dist.all_reduce(ref_g)
                    torch.testing.assert_close(a, ref_g, rtol=1e-12, atol=1e-12)
                layer.zero_grad()
                # Gradient through route alone: d/dx sum(route(x) * c(id)) = c(id) at x's place.
                y2, _, (ids3,), _ = bal.route(x, lens, [ids])
                x.grad = None
                (y2 * torch.sin(ids3.double()).view(-1, 1)).sum().backward()
                torch.testing.assert_close(x.grad, torch.sin(ids.double()).view(-1, 1).expand_as(x))
                # Every rank planned the same thing.
                digests = [None] * world
                dist.all_gather_object(digests, handle.plan.digest())
                assert len(set(digests)) == 1
        # The 'none' balancer changes nothing.
        nb = NoBalancer(NoBalancerConfig())
        t = torch.ones(3, D)
        out = nb.route(t, torch.tensor([3]), [])
        assert out[0] is t and nb.reverse(t, out[3]) is t
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_route_reverse_gloo_4_ranks():
    mp.spawn(_worker, args=(4, free_port(), ("g1n4", "g2n2", "g1n2+g2n1")), nprocs=4, join=True)


@pytest.mark.slow
def test_route_reverse_gloo_8_ranks():
    mp.spawn(_worker, args=(8, free_port(), ("g1n8", "g2n4", "g1n2+g2n1+g4n1")), nprocs=8, join=True)


def test_single_rank_without_process_group():
    bal = KnapformerBalancer(KnapformerConfig(bags="g1n1"))
    x = torch.randn(7, D, requires_grad=True)
    y, lens, extras, h = bal.route(x, torch.tensor([3, 4]), [torch.arange(7)])
    assert torch.equal(y, x) and lens.tolist() == [3, 4] and torch.equal(extras[0], torch.arange(7))
    assert torch.equal(bal.reverse(y, h), x)


@pytest.mark.parametrize("lens, why", [([6], "sum to 6"), ([2.5, 2.5], "one integer length per sequence"),
                                       ([8, -1], "a negative length -1"), ([[3, 4]], "shape")])
def test_lengths_that_do_not_cut_the_rows_exactly_are_refused(lens, why):
    """10 rows with datum_lens [6] lost 4 of them, and [2.5, 2.5] truncated to 2 + 2."""
    bal = KnapformerBalancer(KnapformerConfig(bags="g1n1"))
    rows = 7 if why != "sum to 6" else 10
    with pytest.raises(ValueError, match=why):
        bal.route(torch.randn(rows, D), torch.tensor(lens) if not isinstance(lens[0], list) else lens)


def test_multi_rank_spec_needs_process_group():
    from minfm_core.errors import MinfmError

    with pytest.raises(MinfmError, match="not initialized"):
        KnapformerBalancer(KnapformerConfig(bags="g1n2"))
