"""Locality placement: start from where the tokens are, move the fewest that reach the target.

Every bag has a cap, its share of the target (the longest-first rule's max per-GPU load,
times ``1 + tolerance``). Three steps, all deterministic (exact integer workloads, ties
broken by the canonical item index, i.e. decreasing workload then sample id):

1. **shed** (vectorised): an overloaded bag evicts its largest sequences while even the
   next one would not cover the remaining excess, then the smallest one that does. The
   workload per token grows with the length, so this sheds the excess with few tokens.
2. **place** (a sorted list of rooms, O(E log S) for E evicted sequences): longest first,
   back home if it fits there, else best fit (the smallest room that holds it, which keeps
   large rooms for large sequences), else the largest room (that bag overflows).
3. **repair** (one vectorised step per overflowing bag, O(log S) Python each): moves or
   swaps with the bags that have the most room (and the sequences' home bags) that lower
   the total overflow, the fewest extra moved tokens first. The total overflow is an
   integer that falls at every step, so repair ends; it gives up after a step budget.

Items are indexed in canonical order throughout, so the result depends on the lengths
and their ranks only, never on how a rank ordered its own list.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort

import attrs
import numpy as np

#: Receivers a repair step looks at first (the bags with the most room); if none of them
#: helps, the step looks at every bag.
REPAIR_RECEIVERS = 8

#: When the local plan gets stuck, sequences above 1/ANCHOR_SHARE of one GPU's cap keep
#: their reference bags: pairwise swaps cannot pack such coarse pieces, the rest can.
ANCHOR_SHARE = 16


@attrs.frozen(eq=False)
class Problem:
    """Sequences in canonical order, with their home bag and what staying home saves.

    ``w`` are exact workloads (int64, or Python ints in an object array when int64 could
    overflow); ``keep`` the tokens that stay on their source rank if the sequence stays in
    its home bag (all of them in a single-GPU bag, one chunk in a G-GPU bag); ``caps`` the
    most load each bag may carry (same dtype as ``w``).
    """

    w: np.ndarray
    lens: np.ndarray
    home: np.ndarray
    keep: np.ndarray
    caps: np.ndarray

    @property
    def n_bags(self) -> int:
        return int(self.caps.size)

    def home_loads(self) -> np.ndarray:
        loads = np.zeros(self.n_bags, dtype=self.w.dtype)
        np.add.at(loads, self.home, self.w)
        return loads


def shed(p: Problem, start: np.ndarray, movable: np.ndarray) -> np.ndarray:
    """Which movable sequences leave their bag (bool mask): the excess of every overloaded bag."""
    loads = np.zeros(p.n_bags, dtype=p.w.dtype)
    np.add.at(loads, start, p.w)
    excess = loads - p.caps
    out = np.zeros(p.w.size, dtype=bool)
    if not (excess > 0).any():
        return out
    cand = np.flatnonzero(movable)
    ob = cand[np.argsort(start[cand], kind="stable")]
    hb, wb = start[ob], p.w[ob]
    first = np.searchsorted(hb, hb)
    cum = np.cumsum(wb)
    incl = cum - (cum - wb)[first]  # workload of this item and the larger ones of its bag
    # Evicting this item and every larger one still leaves an excess: all of them go.
    forced = incl < excess[hb]
    gone = np.zeros(p.n_bags, dtype=p.w.dtype)
    np.add.at(gone, hb[forced], wb[forced])
    rem = excess - gone
    # The rest of the excess: the smallest remaining item that covers it (items are in
    # decreasing workload, so the last one that covers it).
    cover = ~forced & (rem[hb] > 0) & (wb >= rem[hb])
    pos = np.arange(ob.size)
    last = np.full(p.n_bags, -1, dtype=np.int64)
    np.maximum.at(last, hb[cover], pos[cover])
    out[ob] = forced | (pos == last[hb])
    return out


def place(p: Problem, evicted: np.ndarray, loads: list[int], bag_of: np.ndarray) -> None:
    """Put the evicted items (canonical order = longest first) into rooms. Mutates loads, bag_of."""
    caps = p.caps.tolist()
    rooms = [c - load for c, load in zip(caps, loads)]
    ordered = sorted((r, b) for b, r in enumerate(rooms))  # ties: lowest bag id first
    w, home = p.w.tolist(), p.home.tolist()
    for i in evicted.tolist():
        wi, h = w[i], home[i]
        if rooms[h] >= wi:
            b = h  # back home costs nothing
        else:
            j = bisect_left(ordered, (wi, -1))
            b = ordered[j][1] if j < len(ordered) else ordered[-1][1]
        del ordered[bisect_left(ordered, (rooms[b], b))]
        rooms[b] -= wi
        loads[b] += wi
        insort(ordered, (rooms[b], b))
        bag_of[i] = b


def _moved_delta(keep: np.ndarray, home: np.ndarray, frm, to) -> np.ndarray:
    """Extra tokens moved when items leave bag ``frm`` for bag ``to`` (broadcasts)."""
    return keep * (home == frm) - keep * (home == to)


class _Repair:
    """State of the repair: loads, each bag's members, and the overflowing bags in a heap."""

    def __init__(self, p: Problem, loads: list[int], bag_of: np.ndarray):
        self.p, self.bag_of = p, bag_of
        self.loads = np.array(loads, dtype=p.w.dtype)
        ob = np.argsort(bag_of, kind="stable")
        cuts = np.searchsorted(bag_of[ob], np.arange(1, p.n_bags))
        self.members = np.split(ob, cuts)  # canonical order within each bag
        self.heap = [(-(load - cap), b) for b, (load, cap) in enumerate(zip(loads, p.caps.tolist())) if load > cap]
        heapq.heapify(self.heap)

    def receivers(self, a: int, xs: np.ndarray, limit: int | None) -> np.ndarray:
        """Bags with room to take load from bag ``a``: the roomiest ``limit`` (all tied at the
        last place too, so the set is exact) and the items' homes."""
        rooms = self.p.caps - self.loads
        if limit and limit < rooms.size:
            roomy = np.flatnonzero(rooms >= np.partition(rooms, rooms.size - limit)[rooms.size - limit])
        else:
            roomy = np.arange(rooms.size)
        both = np.union1d(roomy, self.p.home[xs])
        return both[(rooms[both] > 0) & (both != a)]

    def best_step(self, a: int, excess, limit: int | None):
        """The move (y = -1) or swap that lowers the overflow most, then moves the fewest tokens."""
        p = self.p
        xs = self.members[a]
        targets = self.receivers(a, xs, limit)
        if xs.size == 0 or targets.size == 0:
            return None
        ys = np.concatenate([self.members[c] for c in targets.tolist()])
        col_bag = np.concatenate([targets, self.bag_of[ys]])
        col_item = np.concatenate([np.full(targets.size, -1), ys])
        col_w = np.concatenate([np.zeros(targets.size, dtype=p.w.dtype), p.w[ys]])
        room = (p.caps - self.loads)[col_bag]
        delta = p.w[xs][:, None] - col_w[None, :]
        # A full fix first (both bags end within their caps); else the step that leaves the
        # least total overflow, if it lowers it at all.
        ii, jj = np.nonzero((delta >= excess) & (delta <= room[None, :]))
        if ii.size == 0:
            left = np.maximum(excess - delta, 0) + np.maximum(delta - room[None, :], 0)
            ii, jj = np.nonzero((delta > 0) & (left < excess))
            if ii.size == 0:
                return None
            left = left[ii, jj]
            ii, jj = ii[left == left.min()], jj[left == left.min()]
        x, c, y, delta = xs[ii], col_bag[jj], col_item[jj], delta[ii, jj]
        yy = np.maximum(y, 0)
        cost = _moved_delta(p.keep[x], p.home[x], a, c) + _moved_delta(np.where(y >= 0, p.keep[yy], 0), p.home[yy], c, a)
        # Then the fewest extra tokens, the smallest delta (keeps rooms for later), then the
        # canonical indices (a total order).
        k = np.lexsort((y, x, c, delta, cost))[0]
        return int(x[k]), int(y[k]), int(c[k]), delta[k]

    def _transfer(self, item: int, frm: int, to: int) -> None:
        self.bag_of[item] = to
        m = self.members[frm]
        self.members[frm] = m[m != item]
        self.members[to] = np.append(self.members[to], item)

    def apply(self, a: int, x: int, y: int, c: int, delta) -> None:
        self._transfer(x, a, c)
        if y >= 0:
            self._transfer(y, c, a)
        self.loads[a] -= delta
        self.loads[c] += delta
        for b in (a, c):
            over = self.loads[b] - self.p.caps[b]
            if over > 0:
                heapq.heappush(self.heap, (-over, b))

    def run(self, max_steps: int) -> bool:
        """Fix the overflowing bags, largest overflow first; False when the budget runs out."""
        for _ in range(max_steps):
            while self.heap and -self.heap[0][0] != self.loads[self.heap[0][1]] - self.p.caps[self.heap[0][1]]:
                heapq.heappop(self.heap)  # stale entry: the bag changed since it was pushed
            if not self.heap:
                return True
            neg, a = heapq.heappop(self.heap)
            step = self.best_step(a, -neg, REPAIR_RECEIVERS) or self.best_step(a, -neg, None)
            if step is None:
                return False
            self.apply(a, *step)
        return not self.heap


def settle(p: Problem, start: np.ndarray, movable: np.ndarray, max_steps: int) -> np.ndarray | None:
    """From ``start``, shed, place and repair until every bag is within its cap; None if stuck."""
    bag_of = start.copy()
    evicted = np.flatnonzero(shed(p, start, movable))
    loads = np.zeros(p.n_bags, dtype=p.w.dtype)
    np.add.at(loads, start, p.w)
    if evicted.size:
        np.subtract.at(loads, start[evicted], p.w[evicted])
    loads = loads.tolist()
    place(p, evicted, loads, bag_of)
    if any(load > cap for load, cap in zip(loads, p.caps.tolist())):
        if not _Repair(p, loads, bag_of).run(max_steps):
            return None
    final = np.zeros(p.n_bags, dtype=p.w.dtype)
    np.add.at(final, bag_of, p.w)
    return bag_of if (final <= p.caps).all() else None


def relabel(p: Problem, ref: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The reference plan with its bags renamed (within each bag size) to keep the most tokens home.

    Bags of one size are interchangeable for balance, so any renaming keeps the max load.
    Greedy on (kept tokens, reference bag, home bag), heaviest overlap first.
    """
    nb = p.n_bags
    same = sizes[ref] == sizes[p.home]
    pair = ref[same] * nb + p.home[same]
    weight = np.bincount(pair, weights=p.keep[same], minlength=nb * nb)
    cand = np.flatnonzero(weight)
    cand = cand[np.lexsort((cand, -weight[cand]))]
    rename = np.full(nb, -1, dtype=np.int64)
    taken = np.zeros(nb, dtype=bool)
    for j, b in zip(*divmod(cand, nb)):
        if rename[j] < 0 and not taken[b]:
            rename[j], taken[b] = b, True
    for g in np.unique(sizes).tolist():  # the rest in order, size by size
        free = np.flatnonzero((sizes == g) & ~taken)
        rename[np.flatnonzero((sizes == g) & (rename < 0))] = free
    return rename[ref]


def locality_plan(p: Problem, ref: np.ndarray, sizes: np.ndarray, max_steps: int) -> tuple[np.ndarray, str]:
    """Bag of every item (canonical order) within the caps, and how it was reached.

    ``local``: from where the items are. If that gets stuck (coarse sequences that only a
    global packing fits), ``anchored``: the sequences above 1/ANCHOR_SHARE of a GPU's cap
    take their (renamed) reference bags and the rest settle around them. Last,
    ``longest_first``: the renamed reference plan itself, within the caps by construction.
    """
    everything = np.ones(p.w.size, dtype=bool)
    got = settle(p, p.home, everything, max_steps)
    if got is not None:
        return got, "local"
    renamed = relabel(p, ref, sizes)
    coarse = p.w * ANCHOR_SHARE > p.caps.min() // sizes.min()  # a coarse share of one GPU
    got = settle(p, np.where(coarse, renamed, p.home), ~coarse, max_steps)
    if got is not None:
        return got, "anchored"
    return renamed, "longest_first"


def moved_lower_bound(p: Problem) -> float:
    """Tokens that any plan within the caps must move, at least.

    Structural: a sequence homed in a G-GPU bag keeps at most one chunk on its rank.
    Eviction: each overloaded bag must shed its excess; evicting costs the tokens kept
    home (``keep``), and the fractional knapsack (best workload per kept token first)
    bounds that cost from below.
    """
    structural = float((p.lens - p.keep).sum())
    excess = p.home_loads() - p.caps
    if not (excess > 0).any():
        return structural
    rate = p.w.astype(np.float64) / np.maximum(p.keep, 1)
    ob = np.lexsort((-rate, p.home))
    hb = p.home[ob]
    first = np.searchsorted(hb, np.arange(p.n_bags))[hb]
    wb, kb = p.w[ob].astype(np.float64), p.keep[ob].astype(np.float64)
    cum = np.cumsum(wb)
    before = (cum - wb) - (cum - wb)[first]
    need = np.clip(excess.astype(np.float64)[hb] - before, 0.0, wb)  # workload this item must shed
    frac = np.divide(need, wb, out=np.zeros_like(wb), where=wb > 0)
    return structural + float((frac * kb).sum())
