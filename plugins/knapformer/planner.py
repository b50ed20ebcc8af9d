"""The pure planner: which rank computes which piece of which sequence.

No torch, no process group: given every rank's sequence lengths (the all-gathered
list), every rank computes the same :class:`Plan`. Determinism to the bit comes from
integer workloads (Python ints, exact), comparisons by cross-multiplication instead
of float division, and total orders on every sort (ties broken by sample id, then bag id).

Algorithm (see docs/balancer.md):

1. *Reference*: the original longest-first rule (``original.py``), run with one heap
   per bag size instead of a scan over all bags: O(B log S) instead of O(B S). Its max
   per-GPU load K0 sets the bound ``K0 * (1 + tolerance)``.
2. *Locality first*: every bag keeps its own sequences, largest first, skipping those
   that would push it over a keep cap; the evicted ones are placed longest-first on the
   least-occupied eligible bag. The keep cap starts at the bound and is lowered a few
   times (more eviction = more freedom to pack) until the plan's max load is within the
   bound. Near-balanced inputs are accepted at the first cap and move almost nothing.
3. If no locality plan meets the bound, the reference plan is used; so the max load is
   never above the longest-first rule's (times 1 + tolerance).

A sequence placed on a bag of G GPUs is cut into ``min(G, L)`` contiguous chunks
(remainder spread over the first chunks): never a zero-length chunk.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Sequence
from fractions import Fraction

import attrs
import numpy as np

from minfm_core.errors import MinfmError

from .spec import BagSpec, parse_bags

#: Largest denominator used to turn gamma into an exact fraction (0.5 -> 1/2, 0.4 -> 2/5).
GAMMA_DENOMINATOR = 1000

#: Keep caps tried after the bound, as fractions of the mean per-GPU load.
_KEEP_STEPS = (Fraction(1), Fraction(31, 32), Fraction(15, 16), Fraction(7, 8), Fraction(3, 4))


#: A locality plan is refined only when its max load is within this factor of the bound,
#: for at most this many moves/swaps (planning time stays O(B log S)).
_REFINE_REACH = Fraction(51, 50)
_REFINE_STEPS = 64


def gamma_fraction(gamma: float) -> Fraction:
    return Fraction(gamma).limit_denominator(GAMMA_DENOMINATOR)


def workloads(lens: np.ndarray, d: int, gamma: float) -> np.ndarray:
    """Integer workloads proportional to ``w(L) = 24 L d^2 + gamma 4 L^2 d`` (int64).

    Scaled by ``den / (4 d)`` with ``gamma = num / den``: ``L (6 d den + num L)``, exact.
    """
    g = gamma_fraction(gamma)
    lens = np.asarray(lens, dtype=np.int64)
    return lens * (6 * d * g.denominator + g.numerator * lens)


def workload(length: int, d: int, gamma: float) -> int:
    """The scaled integer workload of one sequence (Python int, exact)."""
    g = gamma_fraction(gamma)
    return length * (6 * d * g.denominator + g.numerator * length)


@attrs.frozen(eq=False)
class Plan:
    """Where every token goes. Sample ids are global, in rank order (rank 0's samples first).

    ``chunks`` is an int64 array (K, 5) with columns (sample, src, dst, offset, length),
    sorted by (sample, offset); ranks are relative to the balance group.
    """

    spec: BagSpec
    counts: np.ndarray  # (S,) sequences per source rank
    lens: np.ndarray  # (B,) tokens per sequence
    work: np.ndarray  # (B,) integer workload per sequence
    bag_of: np.ndarray  # (B,) bag index per sequence
    chunks: np.ndarray  # (K, 5)
    strategy: str  # "local" (a locality plan met the bound) or "longest_first"

    @property
    def bag_ranks(self) -> tuple[tuple[int, ...], ...]:
        return self.spec.bag_ranks

    def chunk_list(self) -> list[tuple[int, int, int, int, int]]:
        """The chunks as (sample, src, dst, offset, length) tuples."""
        return [tuple(int(v) for v in row) for row in self.chunks]

    @property
    def src(self) -> np.ndarray:
        return np.repeat(np.arange(self.spec.size), self.counts)

    def load_before(self) -> np.ndarray:
        """Estimated per-rank load before balancing (float, relative units)."""
        return np.bincount(self.src, weights=self.work.astype(np.float64), minlength=self.spec.size)

    def load_after(self) -> np.ndarray:
        """Estimated per-rank load after balancing: a bag's load shared by its G GPUs."""
        sizes = np.asarray(self.spec.bag_sizes)
        bag_load = np.bincount(self.bag_of, weights=self.work.astype(np.float64), minlength=sizes.size)
        return np.repeat(bag_load / sizes, sizes)

    @staticmethod
    def _ratio(load: np.ndarray) -> float:
        mean = load.mean() if load.size else 0.0
        return float(load.max() / mean) if mean > 0 else 1.0

    @property
    def balance_before(self) -> float:
        """max / mean estimated load before balancing."""
        return self._ratio(self.load_before())

    @property
    def balance_after(self) -> float:
        """max / mean estimated load after balancing."""
        return self._ratio(self.load_after())

    @property
    def total_tokens(self) -> int:
        return int(self.lens.sum())

    @property
    def moved_tokens(self) -> int:
        c = self.chunks
        return int(c[c[:, 1] != c[:, 2], 4].sum())

    @property
    def moved_fraction(self) -> float:
        total = self.total_tokens
        return self.moved_tokens / total if total else 0.0

    def tokens_per_rank(self) -> np.ndarray:
        return np.bincount(self.chunks[:, 2], weights=self.chunks[:, 4], minlength=self.spec.size).astype(np.int64)

    def digest(self) -> str:
        """A hash of the plan (ranks compare it to check they planned the same)."""
        h = hashlib.sha256(str(self.spec).encode())
        for arr in (self.counts, self.lens, self.bag_of, self.chunks):
            h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
        return h.hexdigest()


# ----------------------------------------------------------------------------- inputs


def flatten(lens_per_rank: Sequence[Sequence[int]], spec: BagSpec) -> tuple[np.ndarray, np.ndarray]:
    """Validate the per-rank lists; return (counts (S,), lens (B,)) as int64."""
    if len(lens_per_rank) != spec.size:
        raise MinfmError(f"bag spec {spec} covers {spec.size} ranks but lengths were given for {len(lens_per_rank)}")
    counts = np.array([len(x) for x in lens_per_rank], dtype=np.int64)
    lens = np.fromiter((int(v) for x in lens_per_rank for v in x), dtype=np.int64, count=int(counts.sum()))
    if lens.size and lens.min() < 0:
        raise MinfmError("sequence lengths must be >= 0")
    return counts, lens


def build_chunks(lens: np.ndarray, src: np.ndarray, bag_of: np.ndarray, spec: BagSpec) -> np.ndarray:
    """Cut each sequence into min(G, L) contiguous chunks, chunk k to its bag's k-th rank."""
    sizes = np.asarray(spec.bag_sizes, dtype=np.int64)
    first = np.cumsum(sizes) - sizes
    g = sizes[bag_of]
    n = np.minimum(g, lens)
    seq = np.repeat(np.arange(lens.size, dtype=np.int64), n)
    k = np.arange(seq.size, dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
    length = (lens // g)[seq] + (k < (lens % g)[seq])
    offset = np.cumsum(length) - length - (np.cumsum(lens) - lens)[seq]
    dst = first[bag_of][seq] + k
    return np.stack([seq, src[seq], dst, offset, length], axis=1)


# ----------------------------------------------------------------------------- placement


class _Bags:
    """Bag sizes grouped into classes (one per G), with exact per-GPU comparison keys."""

    def __init__(self, spec: BagSpec, total: int):
        self.sizes = spec.bag_sizes
        self.lcm = int(np.lcm.reduce(np.asarray(self.sizes, dtype=np.int64)))
        self.scale = [self.lcm // g for g in self.sizes]  # key = load * scale = per-GPU load * lcm
        self.total, self.S = total, spec.size
        self.classes: list[tuple[int, list[int]]] = []
        b = 0
        for g, n in spec.terms:
            self.classes.append((g, list(range(b, b + n))))
            b += n

    def eligible(self, w: int, length: int) -> list[int]:
        """Class indices the original rule allows: capacity G*total/S >= w and G <= L, else the largest."""
        out = [c for c, (g, _) in enumerate(self.classes) if g * self.total >= w * self.S and g <= length]
        return out or [len(self.classes) - 1]

    def max_key(self, loads: list[int]) -> int:
        return max(load * s for load, s in zip(loads, self.scale))


def _place(order: list[int], w: list[int], lens: list[int], bags: _Bags, loads: list[int], bag_of: list[int]) -> None:
    """Longest-first onto the least-occupied eligible bag (ties: lowest bag id). Mutates loads, bag_of."""
    heaps = []
    for _, ids in bags.classes:
        h = [(loads[b], b) for b in ids]
        heapq.heapify(h)
        heaps.append(h)
    scale = bags.scale
    if len(heaps) == 1:  # g1nS, g2nS...: one heap, no class arithmetic
        h = heaps[0]
        for i in order:
            load, b = h[0]
            heapq.heapreplace(h, (load + w[i], b))
            bag_of[i] = b
    else:
        elig_cache: dict[tuple[int, int], list[int]] = {}
        for i in order:
            wi, li = w[i], lens[i]
            key_e = (wi, li)
            elig = elig_cache.get(key_e)
            if elig is None:
                elig = elig_cache[key_e] = bags.eligible(wi, li)
            best_c, best = -1, None
            for c in elig:
                load, b = heaps[c][0]
                cand = (load * scale[b], b)
                if best is None or cand < best:
                    best, best_c = cand, c
            load, b = heaps[best_c][0]
            heapq.heapreplace(heaps[best_c], (load + wi, b))
            bag_of[i] = b
    for h in heaps:
        for load, b in h:
            loads[b] = load


def _longest_first(order, w, lens, bags: _Bags) -> tuple[list[int], int]:
    loads = [0] * len(bags.sizes)
    bag_of = [0] * len(w)
    _place(order, w, lens, bags, loads, bag_of)
    return bag_of, bags.max_key(loads)


def _local_first(order, w, lens, home, bags: _Bags, keep_key: Fraction) -> tuple[list[int], list[int]]:
    """Keep own sequences up to a per-GPU cap (largest first, skipping), place the rest longest-first.

    Returns (bag of each sequence, bag loads)."""
    caps = [int(keep_key * g // bags.lcm) for g in bags.sizes]  # floor(cap * G), exact
    sizes = bags.sizes
    loads = [0] * len(sizes)
    bag_of = [0] * len(w)
    evicted = []
    for i in order:
        b = home[i]
        nl = loads[b] + w[i]
        if nl <= caps[b] and sizes[b] <= lens[i]:
            loads[b] = nl
            bag_of[i] = b
        else:
            evicted.append(i)
    if evicted:
        _place(evicted, w, lens, bags, loads, bag_of)
    return bag_of, loads


def _refine(w, lens, home, bag_of, loads, bags: _Bags, bound: int, max_iter: int) -> int:
    """Lower the max per-GPU load by single moves or pairwise swaps out of the fullest bag.

    Each step takes the fullest bag (ties: lowest id) and the best move or swap with one
    of the four least-loaded bags: smallest new max of the two bags, then fewest extra
    tokens away from home. Floats rank the candidates, exact integers decide; stops at
    the bound or when no step helps. Mutates loads and bag_of; returns the max key.
    """
    scale, sizes = bags.scale, bags.sizes
    by_bag = np.argsort(np.asarray(bag_of, dtype=np.int64), kind="stable")
    bounds = np.searchsorted(np.asarray(bag_of, dtype=np.int64)[by_bag], np.arange(len(sizes) + 1))
    members: list[list[int]] = [by_bag[bounds[b] : bounds[b + 1]].tolist() for b in range(len(sizes))]
    w_f = np.asarray(w, dtype=np.float64)
    len_a = np.asarray(lens, dtype=np.int64)
    home_a = np.asarray(home, dtype=np.int64)
    n_bags = len(sizes)
    keys = [loads[b] * scale[b] for b in range(n_bags)]
    keys_f = np.asarray(keys, dtype=np.float64)  # for picking targets; decisions use the exact keys
    n_targets = min(5, n_bags)
    for _ in range(max_iter):
        top = max(keys)
        a = keys.index(top)  # the fullest bag, lowest id on ties
        if top <= bound or not members[a]:
            break
        xs = np.asarray(members[a], dtype=np.int64)
        best = None  # (new max, extra moved tokens, c, x, y)
        low = np.argpartition(keys_f, n_targets - 1)[:n_targets] if n_bags > n_targets else np.arange(n_bags)
        for c in sorted(low.tolist(), key=lambda b: (keys[b], b))[:4]:
            if c == a:
                continue
            ys = np.asarray(members[c], dtype=np.int64)
            # Column 0 is "no partner" (a move); columns 1.. are swaps with y.
            dw = w_f[xs][:, None] - np.concatenate([[0.0], w_f[ys]])[None, :]
            new_a = (loads[a] - dw) * scale[a]
            new_c = (loads[c] + dw) * scale[c]
            new_max = np.maximum(new_a, new_c)
            ok = (dw > 0) & (sizes[c] <= len_a[xs])[:, None]
            if ys.size:
                ok[:, 1:] &= (sizes[a] <= len_a[ys])[None, :]
            # tokens that end away from home, minus those that were away before
            away_x = (home_a[xs] != c).astype(np.int64) - (home_a[xs] != a)
            extra = (len_a[xs] * away_x)[:, None] + np.zeros_like(new_max, dtype=np.int64)
            if ys.size:
                away_y = (home_a[ys] != a).astype(np.int64) - (home_a[ys] != c)
                extra[:, 1:] += (len_a[ys] * away_y)[None, :]
            new_max = np.where(ok, new_max, np.inf)
            flat = np.lexsort((extra.ravel(), new_max.ravel()))[0]
            i, j = divmod(int(flat), new_max.shape[1])
            if not np.isfinite(new_max[i, j]):
                continue
            cand = (float(new_max[i, j]), int(extra[i, j]), c, int(xs[i]), int(ys[j - 1]) if j else -1)
            if best is None or cand[:3] < best[:3]:
                best = cand
        if best is None:
            break
        _, _, c, x, y = best
        delta = w[x] - (w[y] if y >= 0 else 0)
        if max((loads[a] - delta) * scale[a], (loads[c] + delta) * scale[c]) >= keys[a]:
            break  # exact check: no strict improvement
        loads[a] -= delta
        loads[c] += delta
        keys[a], keys[c] = loads[a] * scale[a], loads[c] * scale[c]
        keys_f[a], keys_f[c] = keys[a], keys[c]
        members[a].remove(x)
        members[c].append(x)
        bag_of[x] = c
        if y >= 0:
            members[c].remove(y)
            members[a].append(y)
            bag_of[y] = a
    return bags.max_key(loads)


def plan(
    lens_per_rank: Sequence[Sequence[int]],
    bags: str | BagSpec,
    d: int,
    gamma: float = 0.5,
    tolerance: float = 0.0,
    locality: bool = True,
) -> Plan:
    """Plan one step. ``lens_per_rank[r]`` lists rank r's sequence lengths (text + image tokens).

    The max per-GPU load is at most the longest-first rule's times ``1 + tolerance``;
    within that bound as many tokens as possible stay where they are (``locality=False``
    returns the longest-first plan itself).
    """
    spec = parse_bags(bags) if isinstance(bags, str) else bags
    if d <= 0:
        raise MinfmError(f"hidden width d must be positive, got {d}")
    counts, lens = flatten(lens_per_rank, spec)
    work = workloads(lens, d, gamma)
    src = np.repeat(np.arange(spec.size, dtype=np.int64), counts)
    if lens.size == 0:
        return Plan(spec, counts, lens, work, np.zeros(0, np.int64), np.zeros((0, 5), np.int64), "local")
    w = [int(v) for v in work.tolist()]
    ll = lens.tolist()
    total = sum(w)
    bags_ = _Bags(spec, total)
    # Decreasing workload, ties by sample id: a total order, identical on every rank.
    order = np.lexsort((np.arange(lens.size), -work)).tolist()
    ref_bag, ref_key = _longest_first(order, w, ll, bags_)
    chosen, strategy = ref_bag, "longest_first"
    if locality and total > 0:
        bound = int(ref_key * (1 + Fraction(tolerance)))  # keys are ints: key <= bound <=> key <= floor(bound)
        mean_key = Fraction(total * bags_.lcm, spec.size)
        rank_bag = np.repeat(np.arange(len(spec.bag_sizes)), spec.bag_sizes)
        home = rank_bag[src].tolist()
        for keep in (bound, *(mean_key * f for f in _KEEP_STEPS)):
            if keep > bound:
                continue
            bag_of, loads = _local_first(order, w, ll, home, bags_, keep)
            key = bags_.max_key(loads)
            if key * _REFINE_REACH.denominator <= bound * _REFINE_REACH.numerator:  # close enough that a few moves may meet the bound
                key = _refine(w, ll, home, bag_of, loads, bags_, bound, max_iter=_REFINE_STEPS)
            if key <= bound:
                chosen, strategy = bag_of, "local"
                break
    bag_arr = np.asarray(chosen, dtype=np.int64)
    return Plan(spec, counts, lens, work, bag_arr, build_chunks(lens, src, bag_arr, spec), strategy)
