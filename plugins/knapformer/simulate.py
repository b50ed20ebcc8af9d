"""Balancer simulator: score bag specs on traces before renting GPUs.

A trace is a list of steps; a step lists every rank's sequence lengths
(``[[257, 257, ...], [1105, 4173], ...]``). Traces come from a JSON file or from the
seeded generators below (the shapes of ``../shared/docs/KNAPFORMER.md``). Every plan
is scored by one evaluator: max/mean and max/min estimated load, fraction of tokens
moved, Ulysses bytes per layer and planning milliseconds, for no balancing, the
original longest-first rule and ours.

    minfm balance simulate recipes/quickstart.toml --world-size 8 --bags g1n8 --bags g2n4
    minfm balance simulate --bags g1n8 --bags g2n4 --synthetic mixed --world-size 8
    minfm balance simulate --bags g1n8 --trace trace.json
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from minfm_core.errors import MinfmError

from . import original, planner
from .spec import parse_bags

Trace = list[list[list[int]]]  # steps x ranks x sequences


def _img_tokens(px: int, patch_px: int = 16) -> int:
    """Image tokens of a square px x px image: VAE /8 then 2x2 patches = px/16 per side."""
    return (px // patch_px) ** 2


def _text(rng: random.Random) -> int:
    return rng.randint(77, 512)


def _imagenet(rng: random.Random, world: int) -> list[list[int]]:
    return [[257] * 32 for _ in range(world)]  # 256 image tokens + 1 class token


def _mixed(rng: random.Random, world: int, sizes=(256, 384, 512, 640, 768, 896, 1024), per_rank: int = 8):
    return [[_img_tokens(rng.choice(sizes)) + _text(rng) for _ in range(per_rank)] for _ in range(world)]


def _bucket(rng: random.Random, world: int, sizes=(256, 512, 768, 1024), budget: int = 16384):
    out = []
    for _ in range(world):
        img = _img_tokens(rng.choice(sizes))
        out.append([img + _text(rng) for _ in range(max(1, budget // img))])
    return out


def _with2048(rng: random.Random, world: int):
    return _mixed(rng, world, sizes=(256, 512, 1024, 2048), per_rank=4)


def _near_balanced(rng: random.Random, world: int):
    """Every rank draws the same resolution mix: balanced up to sampling noise."""
    return _mixed(rng, world, sizes=(256, 512), per_rank=32)


def _few(rng: random.Random, world: int):
    """Fewer sequences than ranks (inference-sized batches)."""
    out: list[list[int]] = [[] for _ in range(world)]
    for _ in range(max(1, world // 2)):
        out[rng.randrange(world)].append(_img_tokens(rng.choice((512, 1024))) + _text(rng))
    return out


SYNTHETIC: dict[str, Callable[[random.Random, int], list[list[int]]]] = {
    "imagenet": _imagenet,
    "mixed": _mixed,
    "bucket": _bucket,
    "with2048": _with2048,
    "near_balanced": _near_balanced,
    "few": _few,
}


def synthetic(name: str, world: int, steps: int = 4, seed: int = 0) -> Trace:
    if name not in SYNTHETIC:
        raise MinfmError(f"unknown synthetic trace {name!r}; choose from {', '.join(SYNTHETIC)}")
    rng = random.Random(f"{name}-{world}-{seed}")
    return [SYNTHETIC[name](rng, world) for _ in range(steps)]


def read_trace(path: str | Path) -> Trace:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise MinfmError(f"trace {path}: {exc}") from None
    if isinstance(data, list) and data and isinstance(data[0], list) and data[0] and all(isinstance(v, int) for v in data[0]):
        data = [data]  # one step given without the outer list
    ok = isinstance(data, list) and all(
        isinstance(step, list) and all(isinstance(r, list) and all(isinstance(v, int) and v >= 0 for v in r) for r in step)
        for step in data
    )
    if not ok or not data:
        raise MinfmError(f"trace {path}: expected a JSON list of steps, each a list of per-rank lists of lengths")
    return data


def ulysses_bytes(plan: planner.Plan, d: int, bytes_per_value: int = 2) -> int:
    """Bytes all GPUs send per layer in Ulysses all-to-alls (q, k, v out and o back): 4 d per token sent."""
    sizes = np.asarray(plan.spec.bag_sizes)
    g = sizes[plan.bag_of]
    sent = (plan.lens * (g - 1) // np.maximum(g, 1)).sum()  # each GPU keeps 1/G of heads of its own chunk
    return int(sent) * 4 * d * bytes_per_value


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, (time.perf_counter() - t0) * 1e3


def evaluate(trace: Trace, bags: str, d: int = 3072, gamma: float = 0.5, tolerance: float = 0.0,
             methods=("none", "original", "ours")) -> dict[str, dict[str, float]]:
    """Mean over steps of each metric, per method."""
    spec = parse_bags(bags)
    rows: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    for step in trace:
        if len(step) % spec.size:
            raise MinfmError(f"trace step has {len(step)} ranks, not a multiple of the bag spec's S = {spec.size}")
        for g0 in range(0, len(step), spec.size):  # independent balance groups
            lens = step[g0 : g0 + spec.size]
            ours, ms_ours = _timed(planner.plan, lens, spec, d, gamma, tolerance)
            for m in methods:
                if m == "none":
                    p, ms = planner.plan(lens, spec, d, gamma, locality=False), 0.0
                    before = p.load_before()
                    r = _metrics(before, 0, p.total_tokens, 0, ms)
                elif m == "original":
                    p, ms = _timed(original.plan, lens, spec, d, gamma)
                    r = _metrics(p.load_after(), p.moved_tokens, p.total_tokens, ulysses_bytes(p, d), ms)
                else:
                    p, ms = ours, ms_ours
                    r = _metrics(p.load_after(), p.moved_tokens, p.total_tokens, ulysses_bytes(p, d), ms)
                for k, v in r.items():
                    rows[m].setdefault(k, []).append(v)
    return {m: {k: (statistics.median(v) if k == "plan_ms" else statistics.fmean(v)) for k, v in r.items()}
            for m, r in rows.items()}


def _metrics(load: np.ndarray, moved: int, total: int, ubytes: int, ms: float) -> dict[str, float]:
    mean = load.mean()
    return {
        "max_mean": float(load.max() / mean) if mean > 0 else 1.0,
        "max_min": float(load.max() / load.min()) if load.min() > 0 else float("inf"),
        "moved": moved / total if total else 0.0,
        "ulysses_mb": ubytes / 2**20,
        "plan_ms": ms,
    }


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [f"{'bags':<20} {'method':<9} {'max/mean':>9} {'max/min':>9} {'moved':>7} {'ulysses MB':>11} {'plan ms':>9}"]
    for bags, rows in results.items():
        for m, r in rows.items():
            lines.append(
                f"{bags:<20} {m:<9} {r['max_mean']:>9.3f} {r['max_min']:>9.3f} {r['moved']:>7.1%} "
                f"{r['ulysses_mb']:>11.1f} {r['plan_ms']:>9.2f}"
            )
    return "\n".join(lines)


def run(args) -> int:
    sources = [x for x in (args.recipe, args.trace, args.synthetic) if x]
    if len(sources) != 1:
        raise MinfmError("balance simulate: give exactly one of RECIPE, --trace FILE or --synthetic NAME")
    d, gamma, tolerance, bags = args.d, args.gamma, args.tolerance, list(args.bags or [])
    resolved = None
    if args.recipe:
        from minfm_core.recipe import load_recipe

        from .config import KnapformerConfig

        resolved = load_recipe(args.recipe, args.overrides)
        den, bal = resolved.config("model.denoiser"), resolved.config("balancer")
        d = d or getattr(den, "d_model", None)
        if isinstance(bal, KnapformerConfig):
            gamma = bal.gamma if gamma is None else gamma
            tolerance = bal.tolerance if tolerance is None else tolerance
            bags = bags or [bal.bags]
    d, gamma, tolerance = d or 3072, 0.5 if gamma is None else gamma, tolerance or 0.0
    if not bags:
        if not args.world_size:
            raise MinfmError("balance simulate: give --bags SPEC or --world-size W")
        bags = [f"g1n{args.world_size}"]
    specs = [str(parse_bags(b)) for b in bags]
    world = args.world_size or parse_bags(specs[0]).size
    if args.trace:
        trace = read_trace(args.trace)
    elif args.synthetic:
        trace = synthetic(args.synthetic, world, args.steps, args.seed)
    else:
        from .data_trace import recipe_trace

        trace = recipe_trace(resolved, world, args.steps, args.seed, args.batch_size, tuple(args.text_range))
    if args.trace_out:
        Path(args.trace_out).write_text(json.dumps(trace))
    results = {b: evaluate(trace, b, d, gamma, tolerance) for b in specs}
    lens = [v for step in trace for r in step for v in r]
    source = args.recipe or args.trace or args.synthetic
    print(f"trace: {source}, {len(trace)} steps x {len(trace[0])} ranks, {len(lens)} sequences of "
          f"{min(lens, default=0)}-{max(lens, default=0)} tokens; d={d}, gamma={gamma}, tolerance={tolerance}")
    print("none = before balancing; ulysses MB = bytes all GPUs send per layer in Ulysses all-to-alls (bf16)")
    print(format_table(results))
    return 0
