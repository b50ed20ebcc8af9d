"""Attention over routed chunks: Ulysses inside multi-GPU bags, a guard for empty ranks.

After ``route``, rank k of a bag of G GPUs holds chunk k of each of the bag's
sequences, with all H heads. :class:`UlyssesAttention` wraps an attention backend
(``backend(q, k, v, cu_seqlens, max_seqlen)``, see plugins/attention) so that the
blocks call it exactly as before:

1. ``pre_attn``: one all-to-all within the bag sends head group j (H/G heads) of every
   local token to the bag's rank j, q, k and v in one buffer. Each rank then holds
   the bag's **whole** sequences for its H/G heads; a precomputed permutation puts
   every sequence's chunks back in order (chunk i came from rank i).
2. the backend attends whole sequences (the bag's ``cu_seqlens``, not the chunks');
3. ``post_attn``: the inverse permutation and all-to-all return every token's output
   for head group j to the rank that holds the token.

Both exchanges are autograd-aware (backward is the reverse all-to-all), so attention
over a sequence split across a bag equals unsplit attention, forward and backward.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from minfm_core.errors import MinfmError
from minfm_core.packing import cu_seqlens as _cu_seqlens

from .exchange import exchange


def _empty_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    # No tokens: keep q, k, v in the graph (zero gradients) so every parameter that
    # feeds attention still gets a gradient on this rank (FSDP reduces all of them).
    return (q + k + v) * 0


class LocalAttention:
    """A single-GPU bag: the backend on the rank's whole sequences; nothing to attend is fine."""

    def __init__(self, backend):
        self.backend = backend

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        if q.shape[0] == 0:
            return _empty_attention(q, k, v)
        return self.backend(q, k, v, cu_seqlens, max_seqlen)


class UlyssesAttention:
    """Attention for one rank of a G-GPU bag (see the module docstring).

    ``plan``: the step's plan; ``rank``: this rank within the balance group; ``bag``: its
    bag; ``group``: the bag's process group (ranks in bag order).
    """

    def __init__(self, backend, plan, rank: int, bag: int, group):
        self.backend, self.group = backend, group
        ranks = plan.spec.bag_ranks[bag]
        self.G, first = len(ranks), ranks[0]
        c = plan.chunks
        cb = c[(c[:, 2] >= first) & (c[:, 2] < first + self.G)]  # the bag's chunks, by (sample, offset)
        per_rank = np.bincount(cb[:, 2] - first, weights=cb[:, 4], minlength=self.G).astype(np.int64)
        self.recv = per_rank.tolist()  # tokens held by each bag rank: what it sends me (my heads)
        self.send = [int(per_rank[rank - first])] * self.G  # all my tokens to everyone (their heads)
        # Receive buffer = rank 0's tokens, rank 1's, ...; each rank's in sample order. The
        # start of every chunk there, then the gather that lays out whole sequences.
        by_rank = np.lexsort((cb[:, 0], cb[:, 2]))
        lens_sorted = cb[by_rank, 4]
        start = np.empty(len(cb), dtype=np.int64)
        start[by_rank] = np.cumsum(lens_sorted) - lens_sorted
        lens = cb[:, 4]
        perm = np.repeat(start - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()), dtype=np.int64)
        self.perm = torch.from_numpy(perm)
        inv = np.empty_like(perm)
        inv[perm] = np.arange(perm.size, dtype=np.int64)
        self.inv = torch.from_numpy(inv)
        seq = plan.lens[plan.bag_of == bag]
        seq = seq[seq > 0]
        self.cu = _cu_seqlens(torch.from_numpy(seq))
        self.max_seqlen = int(seq.max()) if seq.size else 0
        self._device = None

    def _to(self, device: torch.device) -> None:
        if self._device != device:
            self.perm, self.inv, self.cu = self.perm.to(device), self.inv.to(device), self.cu.to(device)
            self._device = device

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        L, H, D = q.shape
        G = self.G
        if H % G:
            raise MinfmError(f"balancer.bags: {H} attention heads are not divisible by a bag's G = {G} (Ulysses)")
        h = H // G
        self._to(q.device)
        # (L, 3, G, h, D) -> (G, L, 3 h D): block j (head group j of every token) goes to bag rank j.
        x = torch.stack([q, k, v], 1).view(L, 3, G, h, D).permute(2, 0, 1, 3, 4).reshape(G * L, 3 * h * D)
        y, _ = exchange(x, self.send, self.recv, self.group)
        y = y.index_select(0, self.perm).view(-1, 3, h, D)
        qs, ks, vs = y.unbind(1)
        if y.shape[0] == 0:
            out = _empty_attention(qs, ks, vs)
        else:
            out = self.backend(qs, ks, vs, self.cu, self.max_seqlen)
        out = out.reshape(-1, h * D).index_select(0, self.inv)
        back, _ = exchange(out, self.recv, self.send, self.group)  # (G L, h D): head group j from rank j
        return back.view(G, L, h, D).permute(1, 0, 2, 3).reshape(L, H, D)
