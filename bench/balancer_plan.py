"""Planner benchmark: ours vs the original longest-first rule (balance, tokens moved, plan time).

    python bench/balancer_plan.py            # all traces, 3 steps each
    python bench/balancer_plan.py --quick    # fewer steps

Prints one row per (trace, bag spec, method) and, last, the planning-time ratio
original / ours at 512 ranks (the target is >= 5).
"""

from __future__ import annotations

import argparse
import statistics
import time

from minfm_plugins.knapformer import original, planner, simulate

CASES = [
    ("imagenet", 8, "g1n8"),
    ("mixed", 8, "g1n8"),
    ("bucket", 8, "g1n8"),
    ("near_balanced", 8, "g1n8"),
    ("with2048", 8, "g1n8"),
    ("with2048", 8, "g2n4"),
    ("few", 8, "g2n4"),
    ("mixed", 32, "g1n32"),
    ("mixed", 128, "g1n64+g2n16+g4n8"),
    ("mixed", 512, "g1n512"),
    ("imagenet", 512, "g1n512"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--d", type=int, default=3072)
    args = ap.parse_args()
    steps = 1 if args.quick else 3
    results = {}
    for name, world, bags in CASES:
        trace = simulate.synthetic(name, world, steps)
        results[f"{name}/{world} {bags}"] = simulate.evaluate(trace, bags, d=args.d)
    print(simulate.format_table(results))
    # Planning time at 512 ranks, interleaved runs, median of each.
    trace = simulate.synthetic("mixed", 512, 1 if args.quick else 3)
    ours, theirs = [], []
    for lens in trace * 2:
        t0 = time.perf_counter()
        planner.plan(lens, "g1n512", args.d)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        original.plan(lens, "g1n512", args.d)
        theirs.append(time.perf_counter() - t0)
    o, t = statistics.median(ours) * 1e3, statistics.median(theirs) * 1e3
    print(f"\nplan time at 512 ranks (mixed, g1n512): ours {o:.1f} ms, original {t:.1f} ms, ratio {t / o:.1f}x")


if __name__ == "__main__":
    main()
