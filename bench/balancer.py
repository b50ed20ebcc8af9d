"""KnapFormer balancer benchmark: no balancing vs the original longest-first rule vs ours.

    python bench/balancer.py             # every trace, 3 seeded steps each
    python bench/balancer.py --quick     # 1 step each
    python bench/balancer.py --markdown  # the table for docs/performance.md

Every trace is seeded (``minfm_plugins.knapformer.simulate.synthetic``) and every plan is
scored by one evaluator (``simulate.evaluate``): estimated per-GPU load max/mean and
max/min, fraction of tokens moved, Ulysses bytes per layer (bf16, all GPUs), and the
median planning time (p50). Traces: uniform ImageNet-257 (32 samples per rank); mixed
256-1024 px per sample with 77-512 text tokens; one resolution bucket per rank; a mix
with 2048 px (where multi-GPU bags matter); fewer sequences than ranks; and 32 / 128 /
512-rank scaling. Last, the planning-time ratio original / ours at 512 ranks,
interleaved runs (target >= 5).
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


def markdown(results: dict) -> str:
    lines = [
        "| trace (ranks, bags) | none max/mean | original max/mean, max/min, moved | ours max/mean, max/min, moved "
        "| Ulysses MB/layer | plan ms p50 orig / ours |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, r in results.items():
        n, o, u = r["none"], r["original"], r["ours"]
        lines.append(
            f"| {key} | {n['max_mean']:.3f} | {o['max_mean']:.3f}, {o['max_min']:.3f}, {o['moved']:.1%} "
            f"| {u['max_mean']:.3f}, {u['max_min']:.3f}, {u['moved']:.1%} | {u['ulysses_mb']:.0f} "
            f"| {o['plan_ms']:.2f} / {u['plan_ms']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one step per trace")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    ap.add_argument("--d", type=int, default=3072, help="hidden width (FLUX.1-dev: 3072)")
    args = ap.parse_args()
    steps = 1 if args.quick else 3
    results = {}
    for name, world, bags in CASES:
        trace = simulate.synthetic(name, world, steps)
        results[f"{name} ({world}, {bags})"] = simulate.evaluate(trace, bags, d=args.d)
    print(markdown(results) if args.markdown else simulate.format_table(results))
    trace = simulate.synthetic("mixed", 512, steps)
    ours, theirs = [], []
    for lens in trace * 2:
        t0 = time.perf_counter()
        planner.plan(lens, "g1n512", args.d)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        original.plan(lens, "g1n512", args.d)
        theirs.append(time.perf_counter() - t0)
    o, t = statistics.median(ours) * 1e3, statistics.median(theirs) * 1e3
    print(f"\nplan time at 512 ranks (mixed, g1n512, interleaved): ours {o:.1f} ms, original {t:.1f} ms, ratio {t / o:.1f}x")


if __name__ == "__main__":
    main()
