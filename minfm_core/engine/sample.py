"""Sampling runs: ``minfm sample SRC`` and ``job = "sample"`` recipes.

    minfm sample experiments/quickstart --prompt "a red circle" --n 4
    minfm sample hf://org/model --prompt-file prompts.txt --npz --nproc-per-node 2

Prompts x samples-per-prompt are split over ranks (no dummy outputs); images that
already exist are skipped, so an interrupted run resumes. Writes images, an HTML
gallery, ``metadata.json`` and optionally ``samples.npz`` (the ADM evaluation layout).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import checkpoint as ckpt_mod
from ..errors import MinfmError
from .gallery import write_sample_index
from .generate import generate, to_pil
from .pipeline import build_pipeline
from .runtime import init_runtime, shutdown_runtime


def read_prompt_file(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise MinfmError(f"{path}: prompt file not found")
    try:
        prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise MinfmError(f"{path}: prompt file is not UTF-8 text") from None
    if not prompts:
        raise MinfmError(f"{path}: prompt file has no prompts (one per line)")
    return prompts


def locate(src_path: Path) -> tuple[Path, str, Path]:
    """(recipe.toml, kind, weights location) for a run dir, a checkpoint, or an exported folder.

    kind is "safetensors" (a Hub-style folder with model.safetensors) or "dcp".
    """
    if (src_path / "model.safetensors").is_file() or (src_path / "model.safetensors.index.json").is_file():
        recipe = src_path / "recipe.toml"
        if not recipe.is_file():
            raise MinfmError(f"{src_path}: has model weights but no recipe.toml")
        return recipe, "safetensors", src_path
    ckpt = ckpt_mod.find_checkpoint(src_path)
    return ckpt_mod.recipe_for(ckpt), "dcp", ckpt


def load_denoiser_weights(model: torch.nn.Module, kind: str, where: Path, use_ema: bool) -> str:
    """Load raw or EMA weights; returns which were loaded."""
    if kind == "dcp":
        source = "ema" if use_ema and ckpt_mod.has_part(where, "ema") else "model"
        ckpt_mod.load_weights(where, model, source=source)
        return source
    from ..weights import load_safetensors_into

    name = "ema" if use_ema and ((where / "ema.safetensors").is_file() or (where / "ema.safetensors.index.json").is_file()) else "model"
    load_safetensors_into(model, where, name)
    return name


def sample_cli(args) -> int:
    from ..recipe import load_recipe
    from ..sources import resolve_source

    src = resolve_source(args.source)
    recipe_path, kind, where = locate(src)
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"sample.steps={args.steps}")
    if args.cfg is not None:
        overrides.append(f"sample.guidance.scale={args.cfg}")
    if args.size is not None:
        h, _, w = args.size.partition("x")
        if not (h.isdigit() and w.isdigit()):
            raise MinfmError(f"--size {args.size!r}: expected HEIGHTxWIDTH, e.g. 256x256")
        overrides.append(f"sample.size=[1, {int(h)}, {int(w)}]")
    if args.n is not None:
        overrides.append(f"sample.samples_per_prompt={args.n}")
    if args.seed is not None:
        overrides.append(f"sample.seed={args.seed}")
    if args.npz:
        overrides.append("sample.save_npz=true")
    if args.no_ema:
        overrides.append("sample.use_ema=false")
    resolved = load_recipe(recipe_path, overrides)
    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts += read_prompt_file(args.prompt_file)
    if not prompts:
        prompts = list(resolved.recipe.sample.prompts) or (
            read_prompt_file(resolved.recipe.sample.prompt_file) if resolved.recipe.sample.prompt_file else []
        )
    if not prompts:
        raise MinfmError("no prompts: pass --prompt or --prompt-file (or set sample.prompts in the recipe)")
    out = Path(args.out) if args.out else Path(src if src.is_dir() else src.parent) / "samples_cli"
    return run_sampling(resolved, prompts, out, weights=(kind, where), source=args.source)


def sample_recipe(resolved) -> int:
    """``job = "sample"``: from ``sample.source`` if set, else the recipe's pretrained weights."""
    from ..sources import resolve_source

    s = resolved.recipe.sample
    prompts = list(s.prompts) + (read_prompt_file(s.prompt_file) if s.prompt_file else [])
    if not prompts:
        raise MinfmError("sample.prompts / sample.prompt_file: a sample job needs prompts")
    weights = None
    if s.source:
        _, kind, where = locate(resolve_source(s.source))
        weights = (kind, where)
    out = Path(s.out_dir) if s.out_dir else Path(resolved.recipe.run.exp_dir) / "samples"
    return run_sampling(resolved, prompts, out, weights=weights, source=s.source)


def run_sampling(resolved, prompts: list[str], out: Path, *, weights, source: str | None) -> int:
    rt = init_runtime(resolved.recipe.run.device)
    try:
        s = resolved.recipe.sample
        pipe = build_pipeline(resolved, rt.device, load_weights=True)
        loaded = "pretrained"
        if weights is not None:
            loaded = load_denoiser_weights(pipe.denoiser, *weights, use_ema=s.use_ema)
        items = [(i, k) for i in range(len(prompts)) for k in range(s.samples_per_prompt)]
        mine = items[rt.rank :: rt.world_size]
        images_dir = out / "images"
        if rt.is_main:
            images_dir.mkdir(parents=True, exist_ok=True)
        _barrier()
        name = lambda i, k: f"{i:05d}_{k:02d}.{s.file_ext}"  # noqa: E731
        todo = [(i, k) for i, k in mine if not (images_dir / name(i, k)).exists()]
        seed_of = lambda i, k: s.seed + i * s.samples_per_prompt + k  # noqa: E731
        for b in range(0, len(todo), s.batch_size):
            chunk = todo[b : b + s.batch_size]
            imgs = generate(pipe, [prompts[i] for i, _ in chunk], sizes=[tuple(s.size)] * len(chunk),
                            seeds=[seed_of(i, k) for i, k in chunk], steps=s.steps, neg_prompt=s.neg_prompt,
                            distilled_guidance=s.distilled_guidance)
            for (i, k), img in zip(chunk, imgs):
                to_pil(img).save(images_dir / name(i, k))
        _barrier()
        if rt.is_main:
            settings = {"source": source, "weights": loaded, "steps": s.steps, "size": list(s.size),
                        "sampler": resolved["sample.sampler"].component.name,
                        "guidance": resolved["sample.guidance"].component.name,
                        "guidance_scale": getattr(resolved.config("sample.guidance"), "scale", None),
                        "distilled_guidance": s.distilled_guidance, "neg_prompt": s.neg_prompt}
            records = [{"path": f"images/{name(i, k)}", "prompt": prompts[i], "seed": seed_of(i, k)} for i, k in items]
            ckpt_mod.write_json_atomic(out / "metadata.json", {"settings": settings, "images": records})
            write_sample_index(out, records)
            if s.save_npz:
                arr = np.stack([np.asarray(_open(images_dir / name(i, k))) for i, k in items])
                np.savez(out / "samples.npz", arr_0=arr)
            print(f"minfm: wrote {len(items)} images to {out}")
    finally:
        shutdown_runtime()
    return 0


def _open(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB").copy()


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
