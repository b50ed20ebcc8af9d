"""Do the video quickstart's clips follow their prompts (colour, shape, motion)?

    minfm run recipes/quickstart_video.toml
    python bench/video_fidelity.py experiments/quickstart_video [--seeds 4] [--steps N] [--cfg X] [--raw]
        [--grid docs/img/quickstart_video_grid.png]

Samples "a {colour} {shape} moving {left|right|up|down}" / "... standing still" prompts of the
recipe's `moving_shapes` data (its own or a `mix` source's): every motion with every colour, the
shapes taken in turn, several seeds each, EMA weights, the recipe's sampler and guidance, clips of
the dataset's frames and first size. Each clip is read back with the dataset's own classifier
(`classify_clip`: centroid track -> motion, median shape pixel -> colour, per-frame fill -> shape).
Prints motion, colour and shape accuracy with per-motion rows and the motion confusion, and the
same classifier's accuracy on real clips of the val split as the reference. Samples come from the
engine (`generate`) as tensors: no video files are written or read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

from minfm_core.engine.generate import generate
from minfm_core.engine.pipeline import build_pipeline
from minfm_core.engine.runtime import init_runtime, shutdown_runtime
from minfm_core.engine.sample import load_denoiser_weights, locate
from minfm_core.recipe import load_recipe
from minfm_core.registry import get_registry
from minfm_plugins.data.mix import dataset_config
from minfm_plugins.data.moving_shapes import caption, classify_clip
from minfm_core.sources import resolve_source


def prompts_for(cfg, seeds: int) -> list[tuple[str, str, str]]:
    """(colour, shape, motion) per clip: every motion x every colour, shapes in turn, ``seeds`` each."""
    out = []
    for mi, motion in enumerate(cfg.motions):
        for ci, colour in enumerate(cfg.colours):
            shape = cfg.shapes[(mi + ci) % len(cfg.shapes)]
            out += [(colour, shape, motion)] * seeds
    return out


def score(reads: list[dict], wants: list[tuple[str, str, str]]) -> dict:
    n = len(wants)
    res = {key: sum(r[key] == w[i] for r, w in zip(reads, wants)) / n for i, key in enumerate(("colour", "shape", "motion"))}
    per: dict[str, list[bool]] = {}
    confusion: dict[str, dict[str, int]] = {}
    for r, w in zip(reads, wants):
        per.setdefault(w[2], []).append(r["motion"] == w[2])
        row = confusion.setdefault(w[2], {})
        row[str(r["motion"])] = row.get(str(r["motion"]), 0) + 1
    res["motion_by_prompt"] = {m: sum(v) / len(v) for m, v in per.items()}
    res["motion_confusion"] = confusion
    return res


def write_grid(path: str, clips: list, cols: int, scale: int) -> None:
    """Clips (one per prompt, prompt order: a motion per row) as a looping APNG, upscaled."""
    from minfm_core.engine.gallery import animated_png
    from minfm_core.engine.generate import grid_frames, to_uint8

    frames = [to_uint8(c).repeat(scale, axis=1).repeat(scale, axis=2) for c in clips]
    with open(path, "wb") as fh:
        fh.write(animated_png(grid_frames(frames, cols=cols, pad=2 * scale)))


def main() -> None:
    with contextlib.ExitStack() as stack:  # keeps the checkpoint from a live run's pruning (locate)
        _main(stack)


def _main(stack: contextlib.ExitStack) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("source", help="run dir, checkpoint or hf:// model trained on moving_shapes")
    ap.add_argument("--seeds", type=int, default=4, help="clips per prompt")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--cfg", type=float, default=None)
    ap.add_argument("--raw", action="store_true", help="raw weights instead of EMA")
    ap.add_argument("--batch", type=int, default=20, help="clips per sampler call")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    ap.add_argument("--grid", default=None, help="also write an animated PNG: one clip per prompt, a row per motion")
    ap.add_argument("--grid-scale", type=int, default=4, help="pixel upscale of the grid (nearest), 1..16")
    args = ap.parse_args()
    if not 1 <= args.seeds <= 64 or not 1 <= args.batch <= 1024 or not 1 <= args.grid_scale <= 16:
        ap.error("--seeds must be 1..64, --batch 1..1024, --grid-scale 1..16")

    recipe_path, kind, where = locate(resolve_source(args.source), stack)
    overrides = []
    if args.steps:
        overrides.append(f"sample.steps={args.steps}")
    if args.cfg is not None:
        overrides.append(f"sample.guidance.scale={args.cfg}")
    resolved = load_recipe(recipe_path, overrides)
    cfg = dataset_config(resolved.get("data"), "moving_shapes")
    rt = init_runtime("cpu")
    try:
        pipe = build_pipeline(resolved, rt.device)
        used = load_denoiser_weights(pipe.denoiser, kind, where, use_ema=not args.raw)
        s = resolved.recipe.sample
        wants = prompts_for(cfg, args.seeds)
        prompts = [caption(*w) for w in wants]
        size = (cfg.frames, *cfg.sizes[0])
        t0 = time.perf_counter()
        clips = []
        for i in range(0, len(prompts), args.batch):
            j = min(i + args.batch, len(prompts))
            clips += generate(pipe, prompts[i:j], sizes=[size] * (j - i), seeds=list(range(i, j)),
                              steps=s.steps, neg_prompt=s.neg_prompt)
        dt = time.perf_counter() - t0
        res = score([classify_clip(c) for c in clips], wants)
        print(f"{len(prompts)} clips of {size[0]}x{size[1]}x{size[2]} for {len(set(prompts))} prompts "
              f"({used} weights, {s.steps} steps, {dt / len(prompts) * 1000:.0f} ms/clip)")
        print(f"motion accuracy {res['motion']:.1%}  colour accuracy {res['colour']:.1%}  shape accuracy {res['shape']:.1%}")
        print("motion accuracy by prompt: " + ", ".join(f"{m} {v:.0%}" for m, v in res["motion_by_prompt"].items()))
        print("motions read back (prompted -> read): " + "; ".join(f"{k}: {v}" for k, v in res["motion_confusion"].items()))
        ds = get_registry().get("dataset", "moving_shapes").build(cfg, split="val")
        n = min(200, len(ds))
        real = [ds.spec(i) for i in range(n)]
        ref = score([classify_clip(ds[i]["image"]) for i in range(n)], [(r.colour, r.shape, r.motion) for r in real])
        print(f"reference: the classifier on {n} real val clips: motion {ref['motion']:.1%}, colour "
              f"{ref['colour']:.1%}, shape {ref['shape']:.1%}")
        if args.grid:
            write_grid(args.grid, clips[:: args.seeds], cols=len(cfg.colours), scale=args.grid_scale)
            print(f"wrote {args.grid}")
        if args.json:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump({"samples": res, "reference": ref, "clips": len(prompts), "weights": used}, fh, indent=1)
    finally:
        shutdown_runtime()


if __name__ == "__main__":
    main()
