"""The original KnapFormer planning rule, re-implemented as a baseline.

Written from the behaviour described in ``../shared/docs/KNAPFORMER.md`` and checked
against the public original (``SequenceBalancer.plan_routing``, run with fake
collectives: same bags and chunk lengths on the bench's traces, docs/balancer.md):
sequences in decreasing workload (ties in sample order); candidate bags are those whose
*full* capacity (G x total / S) holds the sequence and with G <= L; the least-occupied
candidate wins (ties to the lowest bag id); if none qualifies, the largest bags are the
candidates. A sequence on a bag of G GPUs is cut into G chunks, the whole remainder
going to one chunk chosen round-robin over all sequences in sample order, so a sequence
shorter than G yields zero-length chunks.

Kept deliberately in the original's shape - a scan over every bag for every sequence,
O(S B) - because it is the yardstick for planning time. Occupancies are compared
exactly (integers; the original compares floats) so that ties are broken the same way
as in ``planner.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .planner import Plan, coefficients, flatten, workloads
from .spec import BagSpec, parse_bags


def assign(lens: list[int], works: list[int], spec: BagSpec) -> list[int]:
    """The bag of every sequence under the original rule."""
    sizes = list(spec.bag_sizes)
    n_bags = len(sizes)
    lcm = int(np.lcm.reduce(np.asarray(sizes, dtype=np.int64)))
    total, S = sum(works), spec.size
    largest = [b for b in range(n_bags) if sizes[b] == spec.max_gpus]
    occupancy = {b: 0 for b in range(n_bags)}  # load * lcm / G: exact per-GPU occupancy
    bag_of: dict[int, int] = {}
    for seq in sorted(range(len(works)), key=lambda i: works[i], reverse=True):
        w, length = works[seq], lens[seq]
        candidates = [b for b in range(n_bags) if sizes[b] * total >= w * S and length >= sizes[b]]
        if not candidates:
            candidates = list(largest)
        candidates.sort(key=lambda b: occupancy[b])
        chosen = candidates[0]
        bag_of[seq] = chosen
        occupancy[chosen] += w * lcm // sizes[chosen]
    return [bag_of[i] for i in range(len(works))]


def chunks(lens: list[int], src: list[int], bag_of: list[int], spec: BagSpec) -> np.ndarray:
    """The original chunking: G chunks per sequence, the remainder on a round-robin chunk."""
    ranks = spec.bag_ranks
    rows = []
    for seq, (length, s, b) in enumerate(zip(lens, src, bag_of)):
        g = len(ranks[b])
        parts = [length // g] * g
        idx = seq % g  # the original's rolling counter: one step per sequence, in sample order
        parts[idx] = length - (sum(parts) - parts[idx])
        offset = 0
        for k, part in enumerate(parts):
            rows.append((seq, s, ranks[b][k], offset, part))
            offset += part
    return np.asarray(rows, dtype=np.int64).reshape(-1, 5)


def plan(lens_per_rank: Sequence[Sequence[int]], bags: str | BagSpec, d: int, gamma: float = 0.5,
         bag_of: Sequence[int] | None = None) -> Plan:
    """The original rule's plan, in the same :class:`Plan` format as ours.

    ``bag_of``: the assignment when it is already known (``planner.plan(..., locality=False)``
    is property-tested equal to :func:`assign`), to skip the O(S B) scan in large tests.
    """
    spec = parse_bags(bags) if isinstance(bags, str) else bags
    coef = coefficients(d, gamma)
    counts, lens_arr = flatten(lens_per_rank, spec)
    lens = lens_arr.tolist()
    work = workloads(lens_arr, d, gamma)
    works = work.tolist()
    src = [r for r, c in enumerate(counts.tolist()) for _ in range(c)]
    bag_of = assign(lens, works, spec) if bag_of is None else [int(b) for b in bag_of]
    return Plan(
        spec, counts, lens_arr, work, np.asarray(bag_of, dtype=np.int64),
        chunks(lens, src, bag_of, spec), "original", coef,
    )
