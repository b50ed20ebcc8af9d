"""Locality placement: start from where the tokens are, move the fewest that reach the target.

Every bag has a cap, its share of the target (the longest-first rule's max per-GPU load,
times ``1 + tolerance``). All steps are deterministic (exact integer workloads, ties
broken by the canonical item index, i.e. decreasing workload then sample id):

1. **shed** (vectorised): an overloaded bag evicts its largest sequences while even the
   next one would not cover the remaining excess, then the smallest one that does. The
   workload per token grows with the length, so this sheds the excess with few tokens.
   A sequence too large for the rooms there are stays, and smaller ones go instead.
2. **place** (a sorted list of rooms, O(E log S) for E evicted sequences): longest first,
   back home if it fits there, else best fit (the smallest room that holds it, which keeps
   large rooms for large sequences), else the roomiest bag, which sheds again in the next
   round (up to SHED_ROUNDS).
3. **repair** (one vectorised step per overflowing bag): the move or swap with the
   roomiest bags (and the sequences' home bags) that leaves the least total overflow, then
   moves the fewest extra tokens. The total overflow is an integer that falls at every
   step, so repair ends; it gives up after a step budget.

Coarse sequences (a large share of one GPU's cap) cannot be packed by pairwise swaps, so
when there are any they are placed first (:func:`coarse_first`) and the rest settle
around them; if that gets stuck, they take their bags in the (renamed) longest-first plan
(``anchored``), and last the renamed longest-first plan itself is used. Items are indexed
in canonical order throughout, so the result depends on the lengths and their ranks
only, never on how a rank ordered its own list.
"""
from __future__ import annotations

import heapq
from bisect import bisect_left, insort

import attrs
import numpy as np

#: Receivers a repair step looks at first (the bags with the most room, and the homes of
#: the bag's items); if none of them helps, the REPAIR_WIDE roomiest.
REPAIR_RECEIVERS, REPAIR_WIDE = 8, 64

_NONE = np.array([-1], dtype=np.int64)

#: Repair steps allowed: a few per bag that overflows after shedding and placing (a step
#: fixes one bag or lowers its overflow); past that the next, coarser strategy is cheaper.
REPAIR_PER_BAG, REPAIR_EXTRA = 2, 32

#: Shed-and-place rounds before the repair (each round sheds what the last one overflowed).
SHED_ROUNDS = 4

#: Sequences above 1/COARSE_SHARE of one GPU's cap are coarse: pairwise swaps cannot pack
#: them (a bag holding a few would need several small ones in exchange), so they are
#: placed first and the fine ones fill around them.
COARSE_SHARE = 8

#: If that gets stuck, the coarse sequences, then those above 1/ANCHOR_SHARE of one GPU's
#: cap, keep their (renamed) reference bags, and the rest settle around them.
ANCHOR_SHARE = 16


@attrs.frozen(eq=False)
class Problem:
    """Sequences in canonical order, with their home bag and what staying home saves.

    ``w`` are exact workloads (int64, or Python ints in an object array when int64 could
    overflow); ``keep`` the tokens that stay on their source rank if the sequence stays in
    its home bag (all of them in a single-GPU bag, one chunk in a G-GPU bag); ``caps`` the
    most load each bag may carry (same dtype as ``w``); ``sizes`` the G of every bag.
    """

    w: np.ndarray
    lens: np.ndarray
    home: np.ndarray
    keep: np.ndarray
    caps: np.ndarray
    sizes: np.ndarray  # G of every bag

    @property
    def n_bags(self) -> int:
        return int(self.caps.size)

    def loads(self, bag_of: np.ndarray) -> np.ndarray:
        """Every bag's load (exact) when item i is in bag ``bag_of[i]``."""
        loads = np.zeros(self.n_bags, dtype=self.w.dtype)
        np.add.at(loads, bag_of, self.w)
        return loads


def _evict(p: Problem, start: np.ndarray, cand: np.ndarray, excess: np.ndarray) -> np.ndarray:
    """Among the candidates (canonical order), what each overloaded bag evicts (bool mask)."""
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
    out = np.zeros(p.w.size, dtype=bool)
    out[ob] = forced | (pos == last[hb])
    return out


def _first_unplaceable(w_out: np.ndarray, rooms: np.ndarray):
    """The largest evicted workload that finds no room of its own, or None.

    Sequences above half the largest room cannot share one, so the i-th largest of them
    needs the i-th largest room."""
    big = np.sort(w_out[w_out * 2 > rooms.max()])[::-1]
    top = np.sort(rooms)[::-1][: big.size]
    short = np.flatnonzero(big[: top.size] > top)
    if short.size:
        return big[short[0]]
    return big[top.size] if big.size > top.size else None


def shed(p: Problem, start: np.ndarray, movable: np.ndarray) -> np.ndarray:
    """Which movable sequences leave their bag (bool mask): the excess of every overloaded bag.

    Largest first (the most workload per token moved), but a sequence too large for the
    rooms there are would only overflow another bag: such ones stay and smaller ones go,
    unless the smaller ones cannot cover the excess (then a coarse one overflows the
    roomiest bag, which sheds smaller ones in the next round).
    """
    excess = p.loads(start) - p.caps
    if not (excess > 0).any():
        return np.zeros(p.w.size, dtype=bool)
    rooms = np.maximum(-excess, 0)
    cand = movable & (p.w <= rooms.max())
    too_big = _first_unplaceable(p.w[_evict(p, start, np.flatnonzero(cand), excess)], rooms)
    if too_big is not None:
        cand &= p.w < too_big
    can = np.zeros(p.n_bags, dtype=p.w.dtype)
    np.add.at(can, start[cand], p.w[cand])
    cand |= movable & (can < excess)[start]
    return _evict(p, start, np.flatnonzero(cand), excess)


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

    def receivers(self, a: int, xs: np.ndarray, rooms: np.ndarray, limit: int | None) -> np.ndarray:
        """Bags with room to take load from bag ``a``: the roomiest ``limit`` (all tied at the
        last place too, so the set is exact) and the items' homes."""
        pick = rooms > 0
        if limit and limit < rooms.size:
            pick &= rooms >= np.partition(rooms, rooms.size - limit)[rooms.size - limit]
            pick[self.p.home[xs]] |= rooms[self.p.home[xs]] > 0
        pick[a] = False
        return np.flatnonzero(pick)

    def best_step(self, a: int, excess, limit: int | None):
        """The move (y = -1) or swap that lowers the overflow most, then moves the fewest tokens."""
        p = self.p
        xs = self.members[a]
        rooms = p.caps - self.loads
        targets = self.receivers(a, xs, rooms, limit)
        if xs.size == 0 or targets.size == 0:
            return None
        # Columns: per receiver c, "no partner" (a move, y = -1) then each of c's items (swaps).
        groups = [self.members[c] for c in targets.tolist()]
        col_item = np.concatenate([v for g in groups for v in (_NONE, g)])
        col_bag = np.repeat(targets, [1 + g.size for g in groups])
        col_w = np.where(col_item >= 0, p.w[col_item], 0)
        room = rooms[col_bag]
        delta = p.w[xs][:, None] - col_w[None, :]
        # A full fix first (both bags end within their caps); else the step that leaves the
        # least total overflow, if it lowers it at all.
        ii, jj = np.nonzero((delta >= excess) & (delta <= room))
        if ii.size == 0:
            left = np.maximum(excess - delta, 0) + np.maximum(delta - room, 0)
            ii, jj = np.nonzero((delta > 0) & (left < excess))
            if ii.size == 0:
                return None
            left = left[ii, jj]
            best = left == left.min()
            ii, jj = ii[best], jj[best]
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
        """Fix the overflowing bags, largest overflow first; False when stuck or out of steps."""
        for _ in range(max_steps):
            while self.heap and -self.heap[0][0] != self.loads[self.heap[0][1]] - self.p.caps[self.heap[0][1]]:
                heapq.heappop(self.heap)  # stale entry: the bag changed since it was pushed
            if not self.heap:
                return True
            neg, a = heapq.heappop(self.heap)
            step = self.best_step(a, -neg, REPAIR_RECEIVERS) or self.best_step(a, -neg, REPAIR_WIDE)
            if step is None:
                return False
            self.apply(a, *step)
        return not self.heap


def settle(p: Problem, start: np.ndarray, movable: np.ndarray) -> np.ndarray | None:
    """From ``start``, shed and place (a few rounds: a sequence too large for any room
    overflows the roomiest bag, which sheds smaller ones in the next round), then repair,
    until every bag is within its cap; None if stuck."""
    bag_of = start.copy()
    for _ in range(SHED_ROUNDS):
        evicted = np.flatnonzero(shed(p, bag_of, movable))
        if evicted.size == 0:
            break
        loads = p.loads(bag_of)
        np.subtract.at(loads, bag_of[evicted], p.w[evicted])
        place(p, evicted, loads.tolist(), bag_of)
    over = int((p.loads(bag_of) > p.caps).sum())
    if over and not _Repair(p, p.loads(bag_of).tolist(), bag_of).run(REPAIR_PER_BAG * over + REPAIR_EXTRA):
        return None
    return bag_of if (p.loads(bag_of) <= p.caps).all() else None


def relabel(p: Problem, ref: np.ndarray) -> np.ndarray:
    """The reference plan with its bags renamed (within each bag size) to keep the most tokens home.

    Bags of one size are interchangeable for balance, so any renaming keeps the max load.
    Greedy on (kept tokens, reference bag, home bag), heaviest overlap first.
    """
    nb, sizes = p.n_bags, p.sizes
    same = sizes[ref] == sizes[p.home]
    pairs, inverse = np.unique(ref[same] * nb + p.home[same], return_inverse=True)  # O(B), not O(bags^2)
    weight = np.bincount(inverse, weights=p.keep[same])
    cand = pairs[np.lexsort((pairs, -weight))]
    rename = np.full(nb, -1, dtype=np.int64)
    taken = np.zeros(nb, dtype=bool)
    for j, b in zip(*divmod(cand, nb)):
        if rename[j] < 0 and not taken[b]:
            rename[j], taken[b] = b, True
    for g in np.unique(sizes).tolist():  # the rest in order, size by size
        free = np.flatnonzero((sizes == g) & ~taken)
        rename[np.flatnonzero((sizes == g) & (rename < 0))] = free
    return rename[ref]


def coarse_first(p: Problem, coarse: np.ndarray) -> np.ndarray:
    """Bags for the coarse items (others stay home): longest first, home if it fits under
    its cap, else the least-occupied bag (per GPU) where it fits, else the least occupied.

    This is the longest-first rule on the coarse items with a preference for home: the
    fine items are then free to fill around them.
    """
    bag_of, sizes = p.home.copy(), p.sizes
    caps, w, home = p.caps.tolist(), p.w.tolist(), p.home.tolist()
    lcm = int(np.lcm.reduce(sizes))
    scale = [lcm // int(g) for g in sizes.tolist()]
    loads = [0] * p.n_bags
    # Per bag size, (per-GPU key, bag), lazily updated; bags are in increasing G, so each
    # size's bags are a contiguous, already heap-ordered run.
    size_list = sizes.tolist()
    heaps = {g: [(0, b) for b in range(size_list.index(g), size_list.index(g) + size_list.count(g))]
             for g in dict.fromkeys(size_list)}
    for i in np.flatnonzero(coarse).tolist():
        b = home[i]
        if loads[b] + w[i] > caps[b]:
            tops = []
            for h in heaps.values():
                while h[0][0] != loads[h[0][1]] * scale[h[0][1]]:
                    heapq.heappop(h)  # stale: that bag took an item at home since
                tops.append(h[0])
            fitting = [t for t in tops if loads[t[1]] + w[i] <= caps[t[1]]]
            b = min(fitting or tops)[1]
        loads[b] += w[i]
        heapq.heappush(heaps[int(sizes[b])], (loads[b] * scale[b], b))
        bag_of[i] = b
    return bag_of


def locality_plan(p: Problem, ref: np.ndarray) -> tuple[np.ndarray, str]:
    """Bag of every item (canonical order) within the caps, and how it was reached.

    ``local``: from where the items are, when no item is coarse (over 1/COARSE_SHARE of a
    GPU's cap); else ``coarse_first``: the coarse items placed first (:func:`coarse_first`),
    the fine ones settling around them. If that gets stuck, ``anchored``: the coarse items
    (then those over 1/ANCHOR_SHARE of a GPU's cap) take their (renamed) reference bags and
    the rest settle around them. Last, ``longest_first``: the renamed reference plan itself, within the
    caps by construction.
    """
    gpu_cap = int(p.caps.min()) // int(p.sizes.min())  # a single GPU's cap (Python int: exact)
    coarse = p.w * COARSE_SHARE > gpu_cap
    if not coarse.any():
        got = settle(p, p.home, np.ones(p.w.size, dtype=bool))
        if got is not None:
            return got, "local"
    else:
        got = settle(p, coarse_first(p, coarse), ~coarse)
        if got is not None:
            return got, "coarse_first"
    renamed = relabel(p, ref)
    for share in (COARSE_SHARE, ANCHOR_SHARE):  # anchor the coarse items, then more
        anchored = p.w * share > gpu_cap
        got = settle(p, np.where(anchored, renamed, p.home), ~anchored)
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
    excess = p.loads(p.home) - p.caps
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
