"""Do the quickstart's pictures follow their prompts?

    minfm run recipes/quickstart.toml
    python bench/quickstart_fidelity.py experiments/quickstart [--seeds 8] [--steps N] [--cfg X]

Samples every "a {colour} {shape}" prompt of the recipe's `shapes` data with several
seeds (EMA weights, the recipe's sampler and guidance) and reads each picture back with
the dataset's own classifier (`classify_image`: background = median border colour, shape
colour = nearest palette entry, kind from how much of its bounding box it fills). Prints
colour and shape accuracy against the prompts, and the same classifier's accuracy on real
dataset pictures as the reference.
"""

from __future__ import annotations

import argparse
import contextlib
import time

from minfm_core.engine.generate import generate
from minfm_core.engine.pipeline import build_pipeline
from minfm_core.engine.runtime import init_runtime, shutdown_runtime
from minfm_core.engine.sample import load_denoiser_weights, locate
from minfm_core.recipe import load_recipe
from minfm_core.registry import get_registry
from minfm_plugins.data.mix import dataset_config
from minfm_plugins.data.shapes import classify_image
from minfm_core.sources import resolve_source


def main() -> None:
    with contextlib.ExitStack() as stack:  # keeps the checkpoint from a live run's pruning (locate)
        _main(stack)


def _main(stack: contextlib.ExitStack) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("source", help="run dir, checkpoint or hf:// model trained on shapes")
    ap.add_argument("--seeds", type=int, default=8, help="samples per prompt")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--cfg", type=float, default=None)
    ap.add_argument("--raw", action="store_true", help="raw weights instead of EMA")
    args = ap.parse_args()

    recipe_path, kind, where = locate(resolve_source(args.source), stack)
    overrides = []
    if args.steps:
        overrides.append(f"sample.steps={args.steps}")
    if args.cfg is not None:
        overrides.append(f"sample.guidance.scale={args.cfg}")
    resolved = load_recipe(recipe_path, overrides)
    # The [data] table itself, or the shapes source of a mix (the video quickstart's pictures).
    data_cfg = dataset_config(resolved.get("data"), "shapes")
    rt = init_runtime("cpu")
    try:
        pipe = build_pipeline(resolved, rt.device)
        used = load_denoiser_weights(pipe.denoiser, kind, where, use_ema=not args.raw)
        s = resolved.recipe.sample
        pairs = [(c, k) for c in data_cfg.colours for k in data_cfg.shapes]
        prompts = [f"a {c} {k}" for c, k in pairs for _ in range(args.seeds)]
        size = tuple(s.size) if s.size[0] == 1 else (1, *data_cfg.sizes[0])  # pictures, also from a video model
        sizes = [size] * len(prompts)
        t0 = time.perf_counter()
        images = []
        for i in range(0, len(prompts), 32):
            images += generate(pipe, prompts[i : i + 32], sizes=sizes[i : i + 32], seeds=list(range(i, min(i + 32, len(prompts)))),
                               steps=s.steps, neg_prompt=s.neg_prompt)
        dt = time.perf_counter() - t0
        got = [classify_image(im) for im in images]
        want = [p for p in pairs for _ in range(args.seeds)]
        colour = sum(g["colour"] == w[0] for g, w in zip(got, want)) / len(want)
        shape = sum(g["shape"] == w[1] for g, w in zip(got, want)) / len(want)
        both = sum(g["colour"] == w[0] and g["shape"] == w[1] for g, w in zip(got, want)) / len(want)
        print(f"{len(prompts)} samples ({used} weights, {s.steps} steps, {dt / len(prompts) * 1000:.0f} ms/image)")
        print(f"colour accuracy {colour:.1%}  shape accuracy {shape:.1%}  both {both:.1%}")
        per = {}
        for g, w in zip(got, want):
            per.setdefault(w[0], []).append(g["colour"] == w[0])
        print("colour accuracy by colour: " + ", ".join(f"{c} {sum(v) / len(v):.0%}" for c, v in per.items()))
        confusion: dict[str, dict] = {}
        for g, w in zip(got, want):
            row = confusion.setdefault(w[1], {})
            row[g["shape"]] = row.get(g["shape"], 0) + 1
        print("shapes read back (prompted -> read): " + "; ".join(f"{k}: {v}" for k, v in confusion.items()))
        ds = get_registry().get("dataset", "shapes").build(data_cfg, split="val")
        items = [ds[i] for i in range(200)]
        reads = [classify_image(it["image"]) for it in items]
        ok = sum(r["colour"] in it["prompt"] and r["shape"] in it["prompt"] for r, it in zip(reads, items)) / 200
        print(f"reference: the classifier on 200 real val pictures: {ok:.1%}")
    finally:
        shutdown_runtime()


if __name__ == "__main__":
    main()
