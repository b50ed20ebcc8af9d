"""HTML galleries: in-training samples (raw and EMA weights) and sampling runs.

Clips (more than one frame) play in the pages as looping animated pictures in ``<img>``:
no player, no codec, and they scale up pixelated like the stills. A training gallery of
clips is an animated PNG (APNG) under the same name a still grid has (``raw.png``,
``ema.png``): every browser plays it, viewers that do not animate show the first frame,
and the Hub export (``samples.png``) carries the animation onto the model card unchanged.
"""

from __future__ import annotations

import html
import io
import json
from contextlib import nullcontext
from pathlib import Path

from ..errors import MinfmError
from ..jsonio import read_json_file
from ..safepath import write_bytes_atomic, write_text_atomic
from .generate import generate, grid, grid_frames, image_seed, to_pil, to_uint8
from .video_io import DEFAULT_FPS, frame_durations_ms
from .prompts import gallery_prompts


def training_gallery(pipe, model, ema, recipe, step: int, *, is_main: bool) -> dict[str, tuple[list, list[str]]]:
    """Sample the gallery prompts with raw and (if given) EMA weights; rank 0 writes the
    pictures and the index. Returns ``{"raw" | "ema": (PIL images, prompts)}`` for the
    caller to log."""
    s = recipe.sample
    prompts = gallery_prompts(recipe)
    per = max(1, min(s.samples_per_prompt, 4))
    all_prompts = [p for p in prompts for _ in range(per)]
    # as `minfm sample` numbers them, so a gallery cell is redrawn by sampling its checkpoint
    seeds = [image_seed(s.seed, p, k, s.samples_per_prompt) for p in range(len(prompts)) for k in range(per)]
    sizes = [tuple(s.size)] * len(all_prompts)
    out = Path(recipe.run.exp_dir) / "samples" / f"step_{step:08d}"
    variants = [("raw", None)] + ([("ema", ema)] if ema is not None else [])
    made: dict[str, tuple[list, list[str]]] = {}
    for name, weights in variants:
        ctx = weights.swapped_in(model) if weights is not None else nullcontext()
        with ctx:
            images = []
            for i in range(0, len(all_prompts), s.batch_size):
                images += generate(pipe, all_prompts[i : i + s.batch_size], sizes=sizes[i : i + s.batch_size],
                                   seeds=seeds[i : i + s.batch_size], steps=s.steps, neg_prompt=s.neg_prompt,
                                   distilled_guidance=s.distilled_guidance)
        if is_main:
            out.mkdir(parents=True, exist_ok=True)
            pil = [to_pil(im) for im in images]  # loggers get the first frame of a clip
            cols = per * min(len(prompts), 4) if per > 1 else min(len(pil), 8)
            if any(im.shape[1] > 1 for im in images):
                data = animated_png(grid_frames([to_uint8(im) for im in images], cols=cols))
            else:
                buf = io.BytesIO()
                grid(pil, cols=cols).save(buf, format="PNG")
                data = buf.getvalue()
            write_bytes_atomic(out / f"{name}.png", data)  # a browser never sees half a picture
            write_text_atomic(out / "prompts.json", json.dumps(all_prompts, indent=1))
            made[name] = (pil, all_prompts)
    model.train()
    if is_main:
        write_training_index(Path(recipe.run.exp_dir) / "samples")
    return made


def animated_png(frames: list, fps: int = DEFAULT_FPS) -> bytes:
    """Grid frames (PIL) as an endlessly looping APNG."""
    buf = io.BytesIO()
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:], loop=0,
                   duration=frame_durations_ms(len(frames), fps))
    return buf.getvalue()


def _step_prompts(path: Path) -> list[str]:
    """A gallery step's prompts, as the index captions them; a damaged or foreign file (a crash
    mid-write, a copied folder) captions nothing rather than ending the run's gallery."""
    try:
        prompts = read_json_file(path, str(path), 1 << 20) if path.is_file() else []
    except (MinfmError, OSError):
        return []
    return [p for p in prompts if isinstance(p, str)] if isinstance(prompts, list) else []


def write_training_index(root: Path) -> None:
    steps = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")), reverse=True)
    parts = ["<!doctype html><meta charset=utf-8><title>minFM samples</title>",
             "<style>body{font-family:sans-serif;margin:2em}img{image-rendering:pixelated;max-width:100%}"
             "figure{display:inline-block;margin:0 1em 1em 0}</style><h1>Samples during training</h1>"]
    for d in steps:
        prompts = _step_prompts(d / "prompts.json")
        parts.append(f"<h2>{html.escape(d.name)}</h2>")
        for name in ("raw", "ema"):
            if (d / f"{name}.png").exists():
                parts.append(f"<figure><img src='{d.name}/{name}.png' width=512><figcaption>{name} weights</figcaption></figure>")
        if prompts:
            parts.append("<p>" + html.escape(" | ".join(dict.fromkeys(prompts))) + "</p>")
    write_text_atomic(root / "index.html", "\n".join(parts))


def _sample_figure(r: dict) -> str:
    caption = f"{html.escape(r['prompt'])}<br><small>seed {r['seed']}"
    if "preview" in r:  # a clip: its animated WebP, linking to the MP4
        path = html.escape(r["path"])
        return (f"<figure><a href='{path}'><img src='{html.escape(r['preview'])}' width=256></a>"
                f"<figcaption>{caption} · {r['frames']} frames · <a href='{path}'>MP4</a></small></figcaption></figure>")
    return f"<figure><img src='{html.escape(r['path'])}' width=256><figcaption>{caption}</small></figcaption></figure>"


def write_sample_index(out: Path, records: list[dict]) -> None:
    rows = "\n".join(_sample_figure(r) for r in records)
    write_text_atomic(
        out / "index.html",
        "<!doctype html><meta charset=utf-8><title>minFM samples</title>"
        "<style>body{font-family:sans-serif;margin:2em}figure{display:inline-block;width:256px;margin:0 1em 1em 0;"
        "vertical-align:top}img{image-rendering:pixelated}</style><h1>Samples</h1>\n" + rows
    )
