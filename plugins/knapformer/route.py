"""Runtime: route packed tokens to their planned ranks and back.

``route`` plans (two all-gathers of the local lengths, then the pure planner on every
rank) and sends every chunk with **one** all-to-all. Per-token metadata (positions,
modality ids, sample ids...) travels in the same buffer as raw bytes of its own dtype,
so it arrives bit-exact (the original used an fp32 side buffer because ids above 256
are corrupted in bf16; bytes are exact for any dtype). The all-to-all is an autograd
function whose backward is the reverse all-to-all; ``reverse`` is the same exchange the
other way, also differentiable.

Received tokens are ordered by global sample id (senders emit their chunks to each
destination in sample order and sample ids grow with the source rank), so no re-sort
is needed on arrival. On a bag of G > 1 GPUs the local ``datum_lens`` are chunk
lengths; attention there goes through :meth:`KnapformerBalancer.attention`, which wraps
the backend with the bag's Ulysses exchange (ulysses.py). A model that conditions
every sample on a per-sample vector gets every sample's inputs with
:meth:`KnapformerBalancer.gather_samples`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from minfm_core import protocols
from minfm_core.errors import MinfmError

from .config import KnapformerConfig, NoBalancerConfig
from .planner import Plan, plan
from .spec import parse_bags
from .exchange import as_bytes, exchange, from_bytes
from .ulysses import LocalAttention, UlyssesAttention


@attrs.frozen(eq=False)
class RouteHandle:
    """What ``reverse`` and the Ulysses exchanges need from one ``route`` call."""

    plan: Plan
    rank: int  # rank within the balance group
    send_index: Tensor  # local token order of the send buffer
    send_splits: list[int]
    recv_splits: list[int]
    recv_chunks: np.ndarray  # (k, 5) the chunks this rank holds, in local order
    group: object
    bag: int  # this rank's bag

    @property
    def samples(self) -> np.ndarray:
        """Global sample id of every local chunk (non-decreasing)."""
        return self.recv_chunks[:, 0]

    @property
    def offsets(self) -> np.ndarray:
        """Where every local chunk starts within its sample."""
        return self.recv_chunks[:, 3]


class NoBalancer(protocols.Balancer):  # identity: the protocol's attention / gather_samples defaults
    """The ``none`` balancer: everything stays where it is."""

    identity = True  # models skip the balanced path entirely (no extra work)

    def __init__(self, cfg: NoBalancerConfig | None = None, *, group=None):
        self.cfg = cfg

    def route(self, tokens: Tensor, datum_lens: Tensor, extras: Sequence[Tensor] = ()):
        return tokens, datum_lens, list(extras), None

    def reverse(self, tokens: Tensor, handle) -> Tensor:
        return tokens


class KnapformerBalancer:
    """Balance packed sequences over the ranks of a balance group (S = the bag spec's size).

    ``group``: the balance process group (its size must be S). Without one, the world is
    cut into ``world / S`` consecutive groups, created here (every rank must build the
    balancer, in the same order, as with any process-group creation).
    """

    identity = False

    def __init__(self, cfg: KnapformerConfig, *, group=None):
        self.cfg = cfg
        self.spec = parse_bags(cfg.bags)
        self.bag_group = None  # this rank's bag's process group (G > 1 only)
        S = self.spec.size
        if group is not None:
            if dist.get_world_size(group) != S:
                raise MinfmError(f"balancer.bags: group has {dist.get_world_size(group)} ranks, bag spec {cfg.bags!r} needs {S}")
            self.group = group
            # Every rank creates every bag group, in the same order: learn all balance groups.
            mine = tuple(dist.get_process_group_ranks(group))
            every: list = [None] * dist.get_world_size()
            dist.all_gather_object(every, mine)
            self._make_bag_groups(sorted(set(every)))
        elif not dist.is_available() or not dist.is_initialized():
            if S != 1:
                raise MinfmError(f"balancer.bags: {cfg.bags!r} spans {S} ranks but torch.distributed is not initialized")
            self.group = None
        else:
            world = dist.get_world_size()
            if world % S:
                raise MinfmError(f"balancer.bags: world size {world} is not divisible by the {S} GPUs of {cfg.bags!r}")
            self.group = None
            if world > S:
                me = dist.get_rank()
                for start in range(0, world, S):  # every rank creates every group, in order
                    g = dist.new_group(list(range(start, start + S)))
                    if start <= me < start + S:
                        self.group = g
            self._make_bag_groups([tuple(range(start, start + S)) for start in range(0, world, S)])
        self.last_plan: Plan | None = None

    def _make_bag_groups(self, balance_groups: list[tuple[int, ...]]) -> None:
        """A process group per multi-GPU bag (Ulysses all-to-alls stay inside the bag)."""
        if self.spec.max_gpus == 1:
            return
        me = dist.get_rank()
        for ranks in balance_groups:  # identical order on every rank
            for bag in self.spec.bag_ranks:
                if len(bag) > 1:
                    members = [ranks[i] for i in bag]
                    g = dist.new_group(members)
                    if me in members:
                        self.bag_group = g

    # ------------------------------------------------------------------ planning

    def _rank(self) -> int:
        return dist.get_rank(self.group) if self.spec.size > 1 else 0

    def gather_lens(self, datum_lens: Tensor) -> list[list[int]]:
        """Every rank's sequence lengths: two all-gathers (counts, then lengths padded to the max)."""
        S = self.spec.size
        if S == 1:
            return [datum_lens.tolist()]
        dev = datum_lens.device
        count = torch.tensor([datum_lens.numel()], dtype=torch.int64, device=dev)
        counts = [torch.zeros_like(count) for _ in range(S)]
        dist.all_gather(counts, count, group=self.group)
        counts_l = [int(c.item()) for c in counts]
        padded = torch.zeros(max(max(counts_l), 1), dtype=torch.int64, device=dev)
        padded[: datum_lens.numel()] = datum_lens.to(torch.int64)
        lens = [torch.zeros_like(padded) for _ in range(S)]
        dist.all_gather(lens, padded, group=self.group)
        return [t[:c].tolist() for t, c in zip(lens, counts_l)]

    def plan(self, datum_lens: Tensor, d: int) -> Plan:
        p = plan(self.gather_lens(datum_lens), self.spec, d, self.cfg.gamma, self.cfg.tolerance)
        self.last_plan = p
        return p

    # ------------------------------------------------------------------ routing

    def route(self, tokens: Tensor, datum_lens: Tensor, extras: Sequence[Tensor] = ()):
        """Send every chunk to its planned rank. Returns (tokens', datum_lens', extras', handle)."""
        if tokens.dim() != 2:
            raise ValueError(f"route expects packed tokens (L, d), got shape {tuple(tokens.shape)}")
        for e in extras:
            if e.shape[0] != tokens.shape[0]:
                raise ValueError(f"extra of shape {tuple(e.shape)} does not have {tokens.shape[0]} rows")
        # The lengths must cut the rows exactly: more rows were dropped without a word, and
        # float lengths were truncated (a token lost).
        lens = np.asarray(datum_lens.detach().cpu() if isinstance(datum_lens, Tensor) else datum_lens)
        if lens.ndim != 1 or (lens.size and lens.dtype.kind not in "iu"):
            raise ValueError(f"route expects one integer length per sequence, got {lens.dtype} of shape {lens.shape}")
        if (lens < 0).any():
            raise ValueError(f"datum_lens holds a negative length {int(lens.min())}")
        if int(lens.sum()) != tokens.shape[0]:
            raise ValueError(f"datum_lens sum to {int(lens.sum())}, but tokens have {tokens.shape[0]} rows")
        p = self.plan(datum_lens, tokens.shape[1])
        me, S = self._rank(), self.spec.size
        c = p.chunks
        first = np.cumsum(p.counts) - p.counts  # first global sample id of each rank
        local_lens = p.lens[first[me] : first[me] + p.counts[me]]
        local_start = np.cumsum(local_lens) - local_lens
        mine = c[c[:, 1] == me]
        mine = mine[np.argsort(mine[:, 2], kind="stable")]  # by destination, then sample (already sorted)
        starts = local_start[mine[:, 0] - first[me]] + mine[:, 3]
        lens = mine[:, 4]
        idx = np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()))
        send_index = torch.from_numpy(idx).to(tokens.device)
        send = np.bincount(mine[:, 2], weights=lens, minlength=S).astype(np.int64).tolist()
        recv_chunks = c[c[:, 2] == me]
        recv = np.bincount(recv_chunks[:, 1], weights=recv_chunks[:, 4], minlength=S).astype(np.int64).tolist()
        x = tokens.index_select(0, send_index)  # backward: index_add_, not an accumulating index_put_
        ex = [e.index_select(0, send_index) for e in extras]
        if S == 1:
            out, out_extras = x, ex
        else:
            out, out_extras = exchange(x, send, recv, self.group, ex)
        new_lens = torch.from_numpy(recv_chunks[:, 4].copy()).to(datum_lens.device, datum_lens.dtype)
        bag = int(np.repeat(np.arange(len(self.spec.bag_sizes)), self.spec.bag_sizes)[me])
        handle = RouteHandle(p, me, send_index, send, recv, recv_chunks, self.group, bag)
        return out, new_lens, out_extras, handle

    def attention(self, backend, handle: RouteHandle):
        """The attention to use on routed tokens: ``backend`` on a single-GPU bag, wrapped
        with the bag's Ulysses exchange on a multi-GPU bag (same call signature)."""
        if self.spec.bag_sizes[handle.bag] == 1:
            return LocalAttention(backend)
        return UlyssesAttention(backend, handle.plan, handle.rank, handle.bag, self.bag_group)

    def gather_samples(self, tensors: Sequence[Tensor], handle: RouteHandle) -> list[Tensor]:
        """Every rank's per-sample tensors ``(n_r, ...)`` -> ``(B, ...)`` in global sample order.

        One all-gather of raw bytes (exact for any dtype); no gradient flows back (use it
        for inputs such as timesteps, pooled text vectors, prompt lengths).
        """
        if self.spec.size == 1:
            return [t.detach() for t in tensors]
        counts = handle.plan.counts.tolist()
        n = counts[handle.rank]
        metas = [(t.dtype, tuple(t.shape[1:]), math.prod(t.shape[1:])) for t in tensors]
        parts = [as_bytes(t.detach().reshape(n, numel)) for t, (_, _, numel) in zip(tensors, metas)]
        widths = [p.shape[1] for p in parts]
        buf = torch.cat(parts, dim=1)
        padded = buf.new_zeros((max(max(counts), 1), buf.shape[1]))
        padded[:n] = buf
        out = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(out, padded, group=self.group)
        full = torch.cat([o[:c] for o, c in zip(out, counts)])
        res, start = [], 0
        for (dtype, shape, numel), width in zip(metas, widths):
            res.append(from_bytes(full[:, start : start + width], dtype, numel).reshape(-1, *shape))
            start += width
        return res

    def reverse(self, tokens: Tensor, handle: RouteHandle) -> Tensor:
        """Send routed tokens (or outputs with the same rows) back to where they came from."""
        if handle.plan.spec.size == 1:
            back = tokens
        else:
            back, _ = exchange(tokens, handle.recv_splits, handle.send_splits, handle.group)
        # The inverse permutation, gathered with index_select (backward: one index_add_).
        inv = torch.empty_like(handle.send_index)
        inv[handle.send_index] = torch.arange(handle.send_index.numel(), device=inv.device)
        return back.index_select(0, inv)
