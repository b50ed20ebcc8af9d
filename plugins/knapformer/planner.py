"""The pure planner: which rank computes which piece of which sequence.

No torch, no process group: given every rank's sequence lengths (the all-gathered
list), every rank computes the same :class:`Plan`. Determinism to the bit comes from
exact integer workloads (gamma taken exactly as the decimal it prints as), integer
comparisons, and total orders on every sort (decreasing workload, then sample id).

Algorithm (see docs/balancer.md):

1. *Target*: the original longest-first rule (``original.py``), run with one heap per
   bag size instead of a scan over all bags: O(B log S) instead of O(B S). Its max
   per-GPU load K0 sets the target ``K0 * (1 + tolerance)``; every bag's cap is its
   share of it.
2. *Locality* (``locality.py``): start from where the sequences are; overloaded bags
   shed their excess (few tokens: long sequences carry the most work per token), the
   shed sequences go to the bags with room (best fit), and a vectorised repair moves
   or swaps sequences out of any bag left above its cap. Coarse sequences (a large share
   of one GPU) are placed first and the rest settle around them. Near-balanced input
   moves little; balanced input moves nothing.
3. If that gets stuck, the coarse sequences keep their bags in the longest-first plan
   (renamed to keep the most tokens home) and the rest settle around them; last, that
   renamed plan itself. Every strategy meets the target, so the max load never exceeds
   the longest-first rule's times ``1 + tolerance``.

Items are processed in canonical order (decreasing workload, then sample id): the
plan depends on the lengths and their ranks only, not on how a rank ordered its list.
A sequence placed on a bag of G GPUs is cut into ``min(G, L)`` non-empty contiguous
chunks; the remainder tokens rotate over the bag's GPUs.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
import operator
from collections.abc import Sequence
from fractions import Fraction

import attrs
import numpy as np

from minfm_core.errors import MinfmError
from minfm_core.validators import Range, non_negative, positive

from . import locality as loc
from .config import GAMMA
from .spec import BagSpec, parse_bags

#: Integer workloads stay int64 (fast, vectorised) while every sum fits with this margin;
#: beyond it (huge lengths, or a gamma with many decimals) they are Python ints.
_INT64_SAFE = 2**62


def check_number(name: str, value, rng: Range, integer: bool = False) -> None:
    """Raise a MinfmError naming ``name`` unless ``value`` is a (whole) number in ``rng``."""
    is_num = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not is_num or not rng.ok(value) or (integer and not float(value).is_integer()):
        kind = "a whole number " if integer else ""
        raise MinfmError(f"{name} must be {kind}{rng.range_text}, got {value!r}")


def gamma_fraction(gamma: float) -> Fraction:
    """gamma as an exact fraction of the decimal it prints as (0.4 -> 2/5, 1e-4 -> 1/10000).

    The float's shortest decimal is what the user wrote in the recipe; taking it exactly
    (rather than the float's binary expansion) keeps the denominator a power of ten. The
    range (0 or 1e-6 to 100, config.GAMMA) keeps that power small enough for the float
    loads (``Plan.load_before``, ``gpu_load``): 1e-320 gave 10^320, past any float.
    """
    check_number("gamma", gamma, GAMMA)
    return Fraction(repr(float(gamma)))


def coefficients(d: int, gamma: float) -> tuple[int, int]:
    """(a, b) with ``a L + b L^2`` = w(L) scaled by ``den / (4 d)``: ``a = 6 d den``, ``b = num``."""
    check_number("hidden width d", d, positive, integer=True)
    g = gamma_fraction(gamma)
    return 6 * int(d) * g.denominator, g.numerator


def workloads(lens: np.ndarray, d: int, gamma: float) -> np.ndarray:
    """Integer workloads proportional to ``w(L) = 24 L d^2 + gamma 4 L^2 d``, exact.

    ``L (a + b L)`` with :func:`coefficients`: int64 when every sum fits, else an object
    array of Python ints.
    """
    a, b = coefficients(d, gamma)
    lens = np.asarray(lens, dtype=np.int64)
    top = int(lens.max()) if lens.size else 0
    if top * (a + b * top) * max(lens.size, 1) < _INT64_SAFE:
        return lens * (a + b * lens)
    return np.array([n * (a + b * n) for n in lens.tolist()], dtype=object)


def workload(length: int, d: int, gamma: float) -> int:
    """The scaled integer workload of one sequence (Python int, exact)."""
    a, b = coefficients(d, gamma)
    return length * (a + b * length)


@attrs.frozen(eq=False)
class Plan:
    """Where every token goes. Sample ids are global, in rank order (rank 0's samples first).

    ``chunks`` is an int64 array (K, 5) with columns (sample, src, dst, offset, length),
    sorted by (sample, offset); ranks are relative to the balance group. ``coef`` is
    ``(a, b)`` of the workload ``L (a + b L)``; ``target`` the max per-GPU load the plan
    had to meet, as a bag key (bag load x lcm of the bag sizes / G; 0 when unknown).
    """

    spec: BagSpec
    counts: np.ndarray  # (S,) sequences per source rank
    lens: np.ndarray  # (B,) tokens per sequence
    work: np.ndarray  # (B,) integer workload per sequence
    bag_of: np.ndarray  # (B,) bag index per sequence
    chunks: np.ndarray  # (K, 5)
    strategy: str  # "local", "coarse_first", "anchored", "longest_first" (locality.py) or "original"
    coef: tuple[int, int] = (0, 0)
    target: int = 0

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

    def gpu_load(self) -> np.ndarray:
        """Estimated per-GPU load from the chunks themselves: the linear layers run on the
        GPU's own chunk tokens, attention (Ulysses: every GPU of the bag takes 1/G of the
        heads of the bag's whole sequences) is shared equally. Needs ``coef``."""
        a, b = self.coef
        sizes = np.asarray(self.spec.bag_sizes)
        c = self.chunks
        linear = np.bincount(c[:, 2], weights=c[:, 4].astype(np.float64) * a, minlength=self.spec.size)
        lens = self.lens.astype(np.float64)
        attn = np.bincount(self.bag_of, weights=b * lens * lens, minlength=sizes.size)
        return linear + np.repeat(attn / sizes, sizes)

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
        """max / mean estimated load after balancing (bag loads shared by their GPUs)."""
        return self._ratio(self.load_after())

    @property
    def balance_gpu(self) -> float:
        """max / mean per-GPU load from the chunks (:meth:`gpu_load`)."""
        return self._ratio(self.gpu_load())

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

    def problems(self) -> list[str]:
        """What is wrong with the plan (empty when valid): every token of every sequence
        exactly once, in non-empty contiguous chunks on its bag's ranks, sent by its rank."""
        c, out = self.chunks, []
        if c.size and (c[:, 4] <= 0).any():
            out.append(f"{int((c[:, 4] <= 0).sum())} empty chunks")
        if c.size and ((np.diff(c[:, 0]) < 0) | ((np.diff(c[:, 0]) == 0) & (np.diff(c[:, 3]) <= 0))).any():
            out.append("chunks not sorted by (sample, offset)")
        covered = np.bincount(c[:, 0], weights=c[:, 4], minlength=self.lens.size) if c.size else np.zeros(self.lens.size)
        if (covered != self.lens).any():
            out.append(f"{int((covered != self.lens).sum())} sequences not covered exactly")
        start = np.cumsum(c[:, 4]) - c[:, 4] - (np.cumsum(self.lens) - self.lens)[c[:, 0]]
        if (start != c[:, 3]).any():
            out.append("chunks not contiguous")
        sizes = np.asarray(self.spec.bag_sizes)
        first = (np.cumsum(sizes) - sizes)[self.bag_of[c[:, 0]]]
        if ((c[:, 2] < first) | (c[:, 2] >= first + sizes[self.bag_of[c[:, 0]]])).any():
            out.append("chunks outside their sequence's bag")
        if (c[:, 1] != self.src[c[:, 0]]).any():
            out.append("chunks sent by the wrong rank")
        return out

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
    lens = np.fromiter(itertools.chain.from_iterable(lens_per_rank), dtype=np.int64, count=int(counts.sum()))
    if lens.size and lens.min() < 0:
        raise MinfmError("sequence lengths must be >= 0")
    return counts, lens


def canonical_order(work: np.ndarray) -> np.ndarray:
    """Decreasing workload, ties by sample id: a total order, identical on every rank."""
    return np.lexsort((np.arange(work.size), -work))


def _group_exclusive_cumsum(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """For items already sorted by group: the sum of the earlier items of the same group."""
    cum = np.cumsum(values) - values
    first = np.searchsorted(groups, groups)
    return cum - cum[first]


def build_chunks(lens: np.ndarray, src: np.ndarray, bag_of: np.ndarray, sizes: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Cut each sequence into its bag's G contiguous chunks, chunk k to the bag's k-th rank.

    The ``L mod G`` remainder tokens rotate: a bag's sequences, in ``order``, hand them
    to the next GPUs after the previous sequence's, so every GPU of the bag gets the
    same number of extra tokens (+-1). Empty chunks (L < G) are left out.
    """
    first_rank = np.cumsum(sizes) - sizes
    g = sizes[bag_of]
    base, rem = lens // g, lens % g
    ob = order[np.argsort(bag_of[order], kind="stable")]  # by bag, then `order`
    start = np.empty_like(lens)
    start[ob] = _group_exclusive_cumsum(rem[ob], bag_of[ob]) % g[ob]
    seq = np.repeat(np.arange(lens.size, dtype=np.int64), g)
    k = np.arange(seq.size, dtype=np.int64) - np.repeat(np.cumsum(g) - g, g)
    length = base[seq] + ((k - start[seq]) % g[seq] < rem[seq])
    offset = _group_exclusive_cumsum(length, seq)
    dst = first_rank[bag_of][seq] + k
    rows = np.stack([seq, src[seq], dst, offset, length], axis=1)
    return rows[length > 0]


# ----------------------------------------------------------------------------- placement


class _Bags:
    """Bag sizes grouped into classes (one per G), with exact per-GPU comparison keys."""

    def __init__(self, spec: BagSpec, total: int):
        self.sizes = spec.bag_sizes
        self.size_arr = np.asarray(self.sizes, dtype=np.int64)
        self.rank_bag = np.repeat(np.arange(len(self.sizes), dtype=np.int64), self.size_arr)  # bag of each rank
        self.lcm = int(np.lcm.reduce(np.asarray(self.sizes, dtype=np.int64)))
        self.scale = [self.lcm // g for g in self.sizes]  # key = load * scale = per-GPU load * lcm
        self.total, self.S = total, spec.size
        self.classes: list[tuple[int, list[int]]] = []
        b = 0
        for g, n in spec.terms:
            self.classes.append((g, list(range(b, b + n))))
            b += n

    def eligible_sets(self, w: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, list[tuple[int, ...]]]:
        """Per item, an index into a list of class-index tuples the original rule allows:
        capacity G*total/S >= w and G <= L; if none, the largest class. Vectorised."""
        mask = np.zeros(w.size, dtype=np.int64)
        for c, (g, _) in enumerate(self.classes):
            ok = (w <= g * self.total // self.S) & (lens >= g)  # w*S <= G*total, exact for integers
            mask |= ok.astype(np.int64) << c
        sets = [tuple(c for c in range(len(self.classes)) if m >> c & 1) or (len(self.classes) - 1,)
                for m in range(1 << len(self.classes))]
        return mask, sets

    def max_key(self, loads: list[int]) -> int:
        return max(map(operator.mul, loads, self.scale))


def _place(w: np.ndarray, lens: np.ndarray, bags: _Bags, loads: list[int], bag_of: list[int]) -> None:
    """Items in order (longest first) onto the least-occupied eligible bag (ties: lowest bag
    id). Heaps hold (per-GPU key, bag) per class, so classes compare directly. Mutates
    loads, bag_of."""
    heaps = []
    for _, ids in bags.classes:
        h = [(loads[b] * bags.scale[b], b) for b in ids]
        heapq.heapify(h)
        heaps.append(h)
    w_list = w.tolist()
    if len(heaps) == 1:  # g1nS, g2nS...: one heap, no class arithmetic
        h, s = heaps[0], bags.scale[0]
        for i, wi in enumerate(w_list):
            key, b = h[0]
            heapq.heapreplace(h, (key + wi * s, b))
            bag_of[i] = b
    else:
        mask, sets = bags.eligible_sets(w, lens)
        scale_c = [bags.lcm // g for g, _ in bags.classes]
        for i, (wi, m) in enumerate(zip(w_list, mask.tolist())):
            best_c = min(sets[m], key=lambda c: heaps[c][0])
            key, b = heaps[best_c][0]
            heapq.heapreplace(heaps[best_c], (key + wi * scale_c[best_c], b))
            bag_of[i] = b
    for h in heaps:
        for key, b in h:
            loads[b] = key // bags.scale[b]


def _longest_first(w: np.ndarray, lens: np.ndarray, bags: _Bags) -> tuple[list[int], int]:
    """The original rule on items already in canonical order: (bag of each item, max key)."""
    loads = [0] * len(bags.sizes)
    bag_of = [0] * w.size
    _place(w, lens, bags, loads, bag_of)
    return bag_of, bags.max_key(loads)



def _problem(lens: np.ndarray, work: np.ndarray, src: np.ndarray, bags_: _Bags, target: int) -> loc.Problem:
    """The locality problem (items in canonical order): each bag's cap is its share of the target key."""
    home = bags_.rank_bag[src]
    g = bags_.size_arr[home]
    keep = np.where(g == 1, lens, -(-lens // g))  # one chunk stays on its rank in a G-bag
    caps = np.array([target * gb // bags_.lcm for gb in bags_.sizes], dtype=work.dtype)
    return loc.Problem(work, lens, home, keep, caps, bags_.size_arr)


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
    within that bound few tokens leave their rank (``locality=False`` returns the
    longest-first plan itself).
    """
    spec = parse_bags(bags) if isinstance(bags, str) else bags
    check_number("tolerance", tolerance, non_negative)
    coef = coefficients(d, gamma)
    counts, lens = flatten(lens_per_rank, spec)
    work = workloads(lens, d, gamma)
    src = np.repeat(np.arange(spec.size, dtype=np.int64), counts)
    if lens.size == 0:
        return Plan(spec, counts, lens, work, np.zeros(0, np.int64), np.zeros((0, 5), np.int64), "local", coef)
    order = canonical_order(work)
    wc, lc = work[order], lens[order]
    bags_ = _Bags(spec, int(wc.sum()))
    ref_bag, ref_key = _longest_first(wc, lc, bags_)
    target = math.floor(ref_key * (1 + Fraction(tolerance)))  # keys are ints: key <= target exactly
    chosen, strategy = np.asarray(ref_bag, dtype=np.int64), "longest_first"
    if locality and bags_.total > 0:
        problem = _problem(lc, wc, src[order], bags_, target)
        chosen, strategy = loc.locality_plan(problem, chosen)
    bag_of = np.empty(lens.size, dtype=np.int64)
    bag_of[order] = chosen
    chunks = build_chunks(lens, src, bag_of, bags_.size_arr, order)
    return Plan(spec, counts, lens, work, bag_of, chunks, strategy, coef, target)


def lower_bound_moved(p: Plan) -> float:
    """Tokens any plan within ``p.target`` that chunks as ours does (near-equal chunks per bag
    GPU) must move, at least (see ``locality.moved_lower_bound``); the original rule's other
    cuts can move fewer."""
    if p.lens.size == 0 or p.target <= 0:
        return 0.0
    order = canonical_order(p.work)
    problem = _problem(p.lens[order], p.work[order], p.src[order], _Bags(p.spec, 0), p.target)
    return loc.moved_lower_bound(problem)
