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
import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from minfm_core.errors import MinfmError, os_error_line
from minfm_core.jsonio import read_json_file
from minfm_core.launch_env import MAX_WORLD_SIZE
from minfm_core.safepath import write_text_atomic
from minfm_core.validators import MAX_TOKENS, positive

from . import original, planner
from .spec import parse_bags

#: Most sequences one simulation plans (all steps and ranks together), and most per-rank
#: lists (steps x ranks): planning costs tens of microseconds a sequence and a few hundred a
#: balance group, per bag spec and method, so this keeps any trace to minutes (an 80 KB file
#: of 20,000 one-sequence ranks took 11 s; at the byte cap it would have taken hours). One
#: step of the largest launch (MAX_WORLD_SIZE ranks, a sequence each) fits, and so do 1,000
#: steps of 64 ranks x 16 samples.
MAX_TRACE_SEQUENCES = 1 << 20

#: Most (sequence, bag) pairs the original rule scans for one bag spec: it looks at every bag
#: for every sequence (original.py keeps that O(S B) shape as the yardstick), some 200 ns a
#: pair, so 2^30 is a few minutes. A step of 65,536 one-GPU bags and 32,768 sequences alone
#: is 2^31 (it took 7 minutes); 512 ranks x 32 samples x 64 steps are 2^29.
MAX_ORIGINAL_SCAN = 1 << 30
#: Both planners cut every sequence into one chunk per GPU of its bag before dropping the
#: empty ones: sequences x G rows of five int64s. 2^24 rows peak near 2 GB (512 ranks of
#: ImageNet in one g512n1 bag: 1.2 GB); a g4096n1 step needed tens of GB.
MAX_CHUNK_ROWS = 1 << 24

#: Largest ``--trace`` file read: MAX_TRACE_SEQUENCES lengths are about 10 MB of compact JSON
#: (``--trace-out`` writes that), some 30 MB indented; 64 MiB leaves room for either.
MAX_TRACE_BYTES = 64 << 20

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


def _step_ratio(step: list[list[int]]) -> float:
    """max / mean estimated load of one step (d = 3072, gamma = 0.5), for calibrating traces."""
    load = [int(planner.workloads(np.asarray(r, dtype=np.int64), 3072, 0.5).sum()) for r in step]
    mean = sum(load) / len(load)
    return max(load) / mean if mean else 1.0


#: max / mean load of a near-balanced step (the range the issue's measurements used).
NEAR_BALANCED = (1.06, 1.07)


def _near_balanced(rng: random.Random, world: int, per_rank: int = 32):
    """Every rank draws 32 samples from the same law (512 px, some 256 px, 77-512 text
    tokens): balanced up to sampling noise, drawn (seeded) until max/mean lies in
    NEAR_BALANCED. The largest of more ranks strays further, so the share of 256 px
    samples (the spread) shrinks with the world: 0.8 / z^3, z the normal quantile of
    1 - 1/(2 world) (about the expected largest of ``world`` draws)."""
    z = statistics.NormalDist().inv_cdf(1 - 0.5 / max(world, 2))
    small = min(0.5, 0.8 / z**3)
    for _ in range(1000):
        step = [[_img_tokens(256 if rng.random() < small else 512) + _text(rng) for _ in range(per_rank)]
                for _ in range(world)]
        if world == 1 or NEAR_BALANCED[0] <= _step_ratio(step) <= NEAR_BALANCED[1]:
            return step
    return step  # pragma: no cover - the range is reached within a few draws


def _long_tail(rng: random.Random, world: int, per_rank: int = 8):
    """Every rank draws from the same long-tailed size law: side 256 px x a Pareto(2)
    factor (1 in 4 samples above 512 px, 1 in 64 at 2048 px), on a 64 px grid."""
    out = []
    for _ in range(world):
        sides = [min(2048, 64 * round(4 * rng.paretovariate(2.0))) for _ in range(per_rank)]
        out.append([_img_tokens(px) + _text(rng) for px in sides])
    return out


#: Video clips: (latent frames, height px, width px) after the VAE's 4x temporal compression.
CLIPS = ((5, 256, 256), (9, 256, 448), (13, 256, 448), (9, 480, 832), (17, 480, 832))


def _video(rng: random.Random, world: int, budget: int = 32768, clip_share: float = 0.3):
    """Clips next to images: every rank fills a token budget with samples, each a video
    clip with probability ``clip_share`` (frames x (h/16) x (w/16) tokens, up to 26,520)
    or an image of 256-1024 px; a clip over the budget still makes a batch of one."""
    out = []
    for _ in range(world):
        batch: list[int] = []
        while not batch or sum(batch) < budget:
            if rng.random() < clip_share:
                f, h, w = rng.choice(CLIPS)
                batch.append(f * (h // 16) * (w // 16) + _text(rng))
            else:
                batch.append(_img_tokens(rng.choice((256, 512, 768, 1024))) + _text(rng))
        out.append(batch)
    return out


def _few(rng: random.Random, world: int):
    """Fewer sequences than ranks (inference-sized batches)."""
    out: list[list[int]] = [[] for _ in range(world)]
    for _ in range(max(1, world // 2)):
        out[rng.randrange(world)].append(_img_tokens(rng.choice((512, 1024))) + _text(rng))
    return out


def check_work(what: str, steps: int, ranks: int, sequences: int, count: str = "") -> None:
    """Refuse a trace past the simulator's bounds before any planning (or drawing): one line
    naming ``what`` (the trace file, or the flags that would draw it); ``count`` says how
    ``sequences`` was reckoned."""
    if ranks > MAX_WORLD_SIZE:
        raise MinfmError(f"{what}: {ranks} ranks per step; at most {MAX_WORLD_SIZE} (the most a launch may have)")
    if steps * ranks > MAX_TRACE_SEQUENCES:
        raise MinfmError(f"{what}: {steps} steps x {ranks} ranks = {steps * ranks} per-rank lists; the simulator "
                         f"plans at most {MAX_TRACE_SEQUENCES} (fewer steps)")
    if sequences > MAX_TRACE_SEQUENCES:
        raise MinfmError(f"{what}: {count}{sequences} sequences; the simulator plans at most "
                         f"{MAX_TRACE_SEQUENCES} (fewer steps or ranks)")


SYNTHETIC: dict[str, Callable[[random.Random, int], list[list[int]]]] = {
    "imagenet": _imagenet,
    "mixed": _mixed,
    "bucket": _bucket,
    "with2048": _with2048,
    "near_balanced": _near_balanced,
    "long_tail": _long_tail,
    "video": _video,
    "few": _few,
}

#: The most sequences each generator draws in one step, per rank (a step has at most
#: ``world * PER_RANK[name]``; bounds a draw before it starts): video fills 32,768 tokens with
#: samples of at least 256 + 77 tokens; bucket fills 16,384 with 256-token images; few draws
#: half as many sequences as ranks (some ranks get two).
PER_RANK: dict[str, int] = {
    "imagenet": 32, "mixed": 8, "bucket": 16384 // _img_tokens(256), "with2048": 4, "near_balanced": 32,
    "long_tail": 8, "video": -(-32768 // (_img_tokens(256) + 77)), "few": 1,
}


def synthetic(name: str, world: int, steps: int = 4, seed: int = 0) -> Trace:
    if name not in SYNTHETIC:
        raise MinfmError(f"unknown synthetic trace {name!r}; choose from {', '.join(SYNTHETIC)}")
    planner.check_number("world size", world, positive, integer=True)
    planner.check_number("steps", steps, positive, integer=True)
    check_work(f"--synthetic {name} --world-size {world} --steps {steps}", steps, world,
               world * steps * PER_RANK[name], f"{world} ranks x {steps} steps x up to {PER_RANK[name]} = ")
    rng = random.Random(f"{name}-{world}-{seed}")
    return [SYNTHETIC[name](rng, world) for _ in range(steps)]


def _is_length(v) -> bool:
    # bool is an int subclass (JSON true would count as 1); numbers past MAX_TOKENS overflowed numpy
    return type(v) is int and 0 <= v <= MAX_TOKENS


def read_trace(path: str | Path) -> Trace:
    data = read_json_file(path, f"trace {path}", MAX_TRACE_BYTES)
    if isinstance(data, list) and data and isinstance(data[0], list) and data[0] and all(_is_length(v) for v in data[0]):
        data = [data]  # one step given without the outer list
    ok = isinstance(data, list) and all(
        isinstance(step, list) and all(isinstance(r, list) and all(_is_length(v) for v in r) for r in step)
        for step in data
    )
    if not ok or not data or not all(data) or len({len(step) for step in data}) != 1:
        raise MinfmError(f"trace {path}: expected a JSON list of steps, each a list of per-rank lists of lengths "
                         f"(whole numbers from 0 to {MAX_TOKENS}), every step with the same number of ranks")
    check_work(f"trace {path}", len(data), len(data[0]), sum(len(r) for step in data for r in step))
    return data


def ulysses_bytes(plan: planner.Plan, d: int, bytes_per_value: int = 2) -> int:
    """Bytes all GPUs send per layer in Ulysses all-to-alls (q, k, v out and o back): 4 d per token sent."""
    sizes = np.asarray(plan.spec.bag_sizes)
    g = sizes[plan.bag_of]
    sent = (plan.lens * (g - 1) // np.maximum(g, 1)).sum()  # each GPU keeps 1/G of heads of its own chunk
    return int(sent) * 4 * d * bytes_per_value


def _timed(repeats: int, fn, *args):
    """``fn(*args)`` and its CPU time in ms, the least of ``repeats`` runs: process time is
    what the planner itself spends, whatever else the machine runs."""
    best = None
    for _ in range(repeats):
        t0 = time.process_time()
        out = fn(*args)
        ms = (time.process_time() - t0) * 1e3
        best = ms if best is None else min(best, ms)
    return out, best


def _ratios(load: np.ndarray) -> tuple[float, float]:
    """max/mean and max/min of per-rank ``load``: a rank with nothing while others work is
    infinitely imbalanced; ranks that all hold nothing are balanced (1.0, as max/mean)."""
    mean, low, high = load.mean(), load.min(), load.max()
    return (float(high / mean) if mean > 0 else 1.0), (float(high / low) if low > 0 else
                                                         float("inf") if high > 0 else 1.0)


def _none_metrics(lens: list[list[int]], d: int, gamma: float) -> dict[str, float]:
    """No balancing: every rank computes its own sequences."""
    load = np.array([float(planner.workloads(np.asarray(r, dtype=np.int64), d, gamma).sum()) for r in lens])
    max_mean, max_min = _ratios(load)
    return {"max_mean": max_mean, "gpu_max_mean": max_mean, "max_min": max_min, "moved": 0.0, "moved_lb": 0.0,
            "ulysses_mb": 0.0, "plan_ms": 0.0, "empty_chunks": 0}


def plan_metrics(p: planner.Plan, d: int, ms: float, lower_bound: bool = False) -> dict[str, float]:
    """One plan's scores: max/mean per bag share and per GPU (from the chunks), max/min per
    GPU, tokens moved (and, with ``lower_bound``, the fewest that a plan within the
    target, chunked as ours, must move), Ulysses MB per layer, planning ms, zero-length chunks."""
    gpu = p.gpu_load()
    gpu_max_mean, max_min = _ratios(gpu)
    total = p.total_tokens
    return {
        "max_mean": _ratios(p.load_after())[0],
        "gpu_max_mean": gpu_max_mean,
        "max_min": max_min,
        "moved": p.moved_fraction,
        "moved_lb": planner.lower_bound_moved(p) / total if lower_bound and total else 0.0,
        "ulysses_mb": ulysses_bytes(p, d) / 2**20,
        "plan_ms": ms,
        "empty_chunks": int((p.chunks[:, 4] == 0).sum()),
    }


def evaluate_steps(trace: Trace, bags: str, d: int = 3072, gamma: float = 0.5, tolerance: float = 0.0,
                   methods=("none", "original", "ours"), repeats: int = 1) -> list[dict[str, dict[str, float]]]:
    """Every step's (and balance group's) scores, per method; ours also gets ``strategy``.
    Planning times are CPU ms, the least of ``repeats`` runs."""
    spec = parse_bags(bags)
    out = []
    for step in trace:
        if len(step) % spec.size:
            raise MinfmError(f"trace step has {len(step)} ranks, not a multiple of the bag spec's S = {spec.size}")
        for g0 in range(0, len(step), spec.size):  # independent balance groups
            lens = step[g0 : g0 + spec.size]
            row: dict[str, dict[str, float]] = {}
            for m in methods:
                if m == "none":
                    row[m] = _none_metrics(lens, d, gamma)
                elif m == "original":
                    p, ms = _timed(repeats, original.plan, lens, spec, d, gamma)
                    row[m] = plan_metrics(p, d, ms)
                else:
                    p, ms = _timed(repeats, planner.plan, lens, spec, d, gamma, tolerance)
                    row[m] = {**plan_metrics(p, d, ms, lower_bound=True), "strategy": p.strategy,
                              "problems": p.problems()}
            out.append(row)
    return out


def summarize(rows: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Mean over steps of each metric (plan ms: the median; max/mean: also the worst step)."""
    out: dict[str, dict[str, float]] = {}
    for m in rows[0]:
        vals = [r[m] for r in rows]
        keys = [k for k, v in vals[0].items() if isinstance(v, (int, float))]
        agg = {k: (statistics.median if k == "plan_ms" else statistics.fmean)([v[k] for v in vals]) for k in keys}
        agg["gpu_max_mean_worst"] = max(v["gpu_max_mean"] for v in vals)
        out[m] = agg
    return out


def evaluate(trace: Trace, bags: str, d: int = 3072, gamma: float = 0.5, tolerance: float = 0.0,
             methods=("none", "original", "ours")) -> dict[str, dict[str, float]]:
    """Mean over steps of each metric, per method (see :func:`summarize`)."""
    return summarize(evaluate_steps(trace, bags, d, gamma, tolerance, methods))


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [(f"{'bags':<20} {'method':<9} {'max/mean':>9} {'per GPU':>8} {'max/min':>9} {'moved':>7} {'>= moved':>8} "
              f"{'ulysses MB':>11} {'plan ms':>9}")]
    for bags, rows in results.items():
        for m, r in rows.items():
            lb = f"{r['moved_lb']:>8.1%}" if m == "ours" else f"{'':>8}"
            lines.append(
                f"{bags:<20} {m:<9} {r['max_mean']:>9.3f} {r['gpu_max_mean']:>8.3f} {r['max_min']:>9.3f} "
                f"{r['moved']:>7.1%} {lb} {r['ulysses_mb']:>11.1f} {r['plan_ms']:>9.2f}"
            )
    return "\n".join(lines)


#: Flags that only a RECIPE's draw reads, and those a --trace file makes moot (it is the draw).
RECIPE_ONLY = (("overrides", "--set"), ("batch_size", "--batch-size"), ("text_range", "--text-range"),
               ("clip_frames", "--clip-frames"))
NOT_WITH_TRACE = (("steps", "--steps"), ("seed", "--seed"))


def _check_args(args) -> None:
    """What the flags' own ranges (checked as they are parsed, cli.py) cannot say: how they relate.
    A flag the chosen source does not read is refused, not ignored; then the defaults are filled in."""
    if args.clips and not args.recipe:
        raise MinfmError("balance simulate: --clips mixes clips into a RECIPE's data; for a synthetic trace with "
                         "clips next to images use --synthetic video")
    source = f"--trace {args.trace}" if args.trace else f"--synthetic {args.synthetic}"
    unread = [] if args.recipe else [flag for key, flag in RECIPE_ONLY if getattr(args, key)]
    unread += [flag for key, flag in NOT_WITH_TRACE if args.trace and getattr(args, key) is not None]
    if unread:
        raise MinfmError(f"balance simulate: {', '.join(unread)} would be ignored with {source} "
                         f"({'the trace file holds the steps' if args.trace else 'read only when drawing from a RECIPE'})")
    args.steps = 4 if args.steps is None else args.steps
    if args.seed is None and not args.recipe:  # (a recipe's data is dealt as its run.seed deals it)
        args.seed = 0
    args.text_range = tuple(args.text_range or (77, 512))
    args.clip_frames = tuple(args.clip_frames or (17, 33, 49))
    lo, hi = args.text_range
    if hi < lo:
        raise MinfmError(f"--text-range: MAX {hi} is below MIN {lo}")
    if args.trace_out:
        _check_trace_out(Path(args.trace_out), [x for x in (args.recipe, args.trace) if x])


def _check_trace_out(out: Path, inputs: list[str]) -> None:
    """--trace-out replaces a trace file, and nothing else: it overwrote its own RECIPE (and, run
    as root, /etc/passwd) with JSON. A link there is replaced, never written through: its
    target is safe whatever it is."""
    if out.is_symlink():
        return
    for given in inputs:
        if out.exists() and Path(given).exists() and os.path.samefile(out, given):
            raise MinfmError(f"--trace-out {out}: that is the input {given}; name another file")
    if out.is_dir():
        raise MinfmError(f"--trace-out {out}: a folder, not a file")
    if out.exists():
        try:
            read_trace(out)
        except MinfmError:
            raise MinfmError(f"--trace-out {out}: the file exists and is not a trace this command wrote; "
                             "refusing to replace it (name a new file, or remove it first)") from None


def _count(trace: Trace) -> int:
    return sum(len(r) for step in trace for r in step)


def _check_scan(specs: list[str], n_seq: int, source: str) -> None:
    """The one cost the trace's own bounds leave open grows with the bags too: refuse it before planning."""
    for b in specs:
        n_bags = len(parse_bags(b).bag_sizes)
        if n_seq * n_bags > MAX_ORIGINAL_SCAN:
            raise MinfmError(f"--bags {b}: {source} has {n_seq} sequences; the original rule scans the {n_bags} bags "
                             f"for each, {n_seq * n_bags} steps, at most {MAX_ORIGINAL_SCAN} (fewer steps or bags)")
        g = parse_bags(b).max_gpus
        if n_seq * g > MAX_CHUNK_ROWS:
            raise MinfmError(f"--bags {b}: {source} has {n_seq} sequences; cut for bags of {g} GPUs they are "
                             f"{n_seq * g} chunk rows, at most {MAX_CHUNK_ROWS} (fewer steps, or smaller bags)")


def _spec_size(text: str | None) -> int | None:
    """A bag spec's GPU count S; None for none or a bad one (refused where it is read)."""
    try:
        return parse_bags(text).size if isinstance(text, str) else None
    except MinfmError:
        return None


def run(args) -> int:
    sources = [x for x in (args.recipe, args.trace, args.synthetic) if x]
    if len(sources) != 1:
        raise MinfmError("balance simulate: give exactly one of RECIPE, --trace FILE or --synthetic NAME")
    _check_args(args)
    d, gamma, tolerance, bags = args.d, args.gamma, args.tolerance, list(args.bags or [])
    resolved = None
    if args.recipe:
        from minfm_core.recipe import load_recipe, load_recipe_dict

        from .config import KnapformerConfig

        # Read at the simulated ranks (the recipe's balancer and parallel are checked against a
        # world size): at this process's own 1, any multi-GPU bag spec was refused.
        raw = load_recipe_dict(args.recipe, args.overrides)
        table = raw.get("balancer") if isinstance(raw.get("balancer"), dict) else {}
        world = args.world_size or _spec_size(bags[0] if bags else table.get("bags"))
        # (a one-process recipe, such as the quickstart, stands for its multi-GPU form here)
        multi = ["parallel.name=fsdp2"] if (world or 1) > 1 and (raw.get("parallel") or {}).get("name") == "none" else []
        resolved = load_recipe(args.recipe, [*args.overrides, *multi], world_size=world)
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
    specs = []
    for b in bags:
        try:
            specs.append(str(parse_bags(b)))
        except MinfmError as exc:  # the recipe's own spec was checked when it loaded: this is the flag's
            raise MinfmError(f"--bags: {exc}") from None
    world = args.world_size or parse_bags(specs[0]).size
    for b in specs if not args.trace else ():  # (a trace's own ranks are checked below)
        if world % parse_bags(b).size:
            raise MinfmError(f"--bags {b}: its {parse_bags(b).size} GPUs do not divide the {world} ranks "
                             f"({'--world-size' if args.world_size else 'the first --bags'}): a rank would be in no bag")
    if args.trace:
        trace = read_trace(args.trace)
        ranks = len(trace[0])
        if args.world_size and args.world_size != ranks:  # the trace decides the ranks: say so, do not ignore
            raise MinfmError(f"--world-size {args.world_size}: the trace {args.trace} has {ranks} ranks per step")
        for b in specs:
            if ranks % parse_bags(b).size:
                raise MinfmError(f"trace {args.trace}: {ranks} ranks per step, not a multiple of bag spec {b}'s "
                                 f"S = {parse_bags(b).size}")
        _check_scan(specs, _count(trace), f"trace {args.trace}")
    elif args.synthetic:
        trace = synthetic(args.synthetic, world, args.steps, args.seed)  # cheap, bounded by check_work
        _check_scan(specs, _count(trace), f"--synthetic {args.synthetic}")
    else:
        from .data_trace import recipe_trace

        bs = args.batch_size or resolved.recipe.train.batch_size  # both checks before any sample is read
        check_work(f"--world-size {world} --steps {args.steps} --batch-size {bs}", args.steps, world, world * args.steps * bs)
        _check_scan(specs, world * args.steps * bs, f"{args.recipe} ({world} ranks x {args.steps} steps x {bs})")
        seed = resolved.recipe.run.seed if args.seed is None else args.seed
        trace = recipe_trace(resolved, world, args.steps, seed, args.batch_size, args.text_range,
                             args.clips, args.clip_frames)
    if args.trace_out:
        try:
            write_text_atomic(Path(args.trace_out), json.dumps(trace))
        except OSError as exc:
            raise MinfmError(f"--trace-out {os_error_line(exc)}") from None
    results = {b: evaluate(trace, b, d, gamma, tolerance) for b in specs}
    lens = [v for step in trace for r in step for v in r]
    source = args.recipe or args.trace or args.synthetic
    print(f"trace: {source}, {len(trace)} steps x {len(trace[0])} ranks, {len(lens)} sequences of "
          f"{min(lens, default=0)}-{max(lens, default=0)} tokens; d={d}, gamma={gamma}, tolerance={tolerance}")
    print("none = before balancing; max/mean = bag loads shared by their GPUs, per GPU = from the chunks; "
          ">= moved = the fewest tokens a plan within the longest-first max, chunked as ours, must move; "
          "ulysses MB = bytes all GPUs send per layer in Ulysses all-to-alls (bf16)")
    print(format_table(results))
    return 0
