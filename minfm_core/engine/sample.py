"""Sampling runs: ``minfm sample SRC`` and ``job = "sample"`` recipes.

    minfm sample experiments/quickstart --prompt "a red circle" --n 4
    minfm sample hf://org/model --prompt-file prompts.txt --npz --nproc-per-node 2

Prompts x samples-per-prompt are cut into fixed batches, handed to ranks round robin:
an image is the same whatever the number of processes. Ranks short of a batch run a
dummy one (never written), so every rank makes the same number of denoiser calls, as a
sharded (``fsdp2``) denoiser needs. Batches whose images all exist are skipped, so an
interrupted run resumes; images are written atomically. Writes images, an HTML gallery,
``metadata.json`` and optionally ``samples.npz`` (the ADM evaluation layout).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import checkpoint as ckpt_mod
from ..errors import MinfmError
from ..weights import has_weights, load_safetensors_into
from .gallery import write_sample_index
from .generate import generate, to_pil
from .pipeline import build_pipeline, sharded_denoiser
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
    if has_weights(src_path):
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
    name = "ema" if use_ema and has_weights(where, "ema") else "model"
    load_safetensors_into(model, where, name)
    return name


def sample_cli(args) -> int:
    from ..recipe import load_recipe
    from ..sources import resolve_source

    src = resolve_source(args.source)
    recipe_path, kind, where = locate(src)
    overrides = ["job=sample", *args.overrides]
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


def plan_batches(n_prompts: int, samples_per_prompt: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """All (prompt, sample) items cut into batches of ``batch_size``, independent of the world size.

    A batch is generated together, so fixing batches here (and handing whole batches to
    ranks) makes an image identical whether one process or many drew it.
    """
    if batch_size < 1:
        raise MinfmError(f"sample.batch_size: expected a positive integer, got {batch_size}")
    items = [(i, k) for i in range(n_prompts) for k in range(samples_per_prompt)]
    return [items[b : b + batch_size] for b in range(0, len(items), batch_size)]


def image_name(i: int, k: int, ext: str) -> str:
    return f"{i:05d}_{k:02d}.{ext}"


def rank_share(pending: list[int], rank: int, world: int) -> tuple[list[int], int]:
    """This rank's batches (round robin) and the number of rounds every rank runs.

    Ranks with fewer batches run dummy batches for the remaining rounds: with a sharded
    denoiser every rank must make the same number of forward calls (each one gathers
    parameters collectively).
    """
    return pending[rank::world], -(-len(pending) // world)


def run_sampling(resolved, prompts: list[str], out: Path, *, weights, source: str | None) -> int:
    rt = init_runtime(resolved.recipe.run.device)
    try:
        s = resolved.recipe.sample
        denoiser = None
        if rt.world_size > 1 and resolved["parallel"].component.name != "none":
            # Sharded before any weights arrive: only rank 0 ever holds a full copy.
            denoiser = sharded_denoiser(resolved, world_size=rt.world_size, device=rt.device, rank=rt.rank,
                                        trainable=False)
        pipe = build_pipeline(resolved, rt.device, load_weights=True, world_size=rt.world_size, denoiser=denoiser)
        loaded = "pretrained"
        if weights is not None:
            loaded = load_denoiser_weights(pipe.denoiser, *weights, use_ema=s.use_ema)
        batches = plan_batches(len(prompts), s.samples_per_prompt, s.batch_size)
        images_dir = out / "images"
        name = lambda i, k: image_name(i, k, s.file_ext)  # noqa: E731
        seed_of = lambda i, k: s.seed + i * s.samples_per_prompt + k  # noqa: E731
        pending = None
        if rt.is_main:
            images_dir.mkdir(parents=True, exist_ok=True)
            # A batch with any image missing is drawn again whole (same composition: same pixels).
            pending = [b for b, chunk in enumerate(batches) if not all((images_dir / name(i, k)).exists() for i, k in chunk)]
        pending = _broadcast(pending)
        mine, rounds = rank_share(pending, rt.rank, rt.world_size)
        if rt.is_main:
            done = len(batches) - len(pending)
            print(f"minfm: {len(batches)} batches, {done} already done, {len(pending)} to draw on "
                  f"{rt.world_size} rank(s)", flush=True)
        for r in range(rounds):
            if r < len(mine):
                chunk = batches[mine[r]]
                batch_prompts, seeds = [prompts[i] for i, _ in chunk], [seed_of(i, k) for i, k in chunk]
            else:  # dummy work: keeps the collective calls in step, never written
                chunk, batch_prompts, seeds = [], [prompts[0]], [s.seed]
            imgs = generate(pipe, batch_prompts, sizes=[tuple(s.size)] * len(seeds), seeds=seeds, steps=s.steps,
                            neg_prompt=s.neg_prompt, distilled_guidance=s.distilled_guidance)
            for (i, k), img in zip(chunk, imgs):
                _save_atomic(to_pil(img), images_dir / name(i, k))
            if rt.is_main:
                print(f"minfm: round {r + 1}/{rounds}", flush=True)
        ckpt_mod.barrier()
        if rt.is_main:
            items = [ik for chunk in batches for ik in chunk]
            settings = {"source": source, "weights": loaded, "steps": s.steps, "size": list(s.size),
                        "sampler": resolved["sample.sampler"].component.name,
                        "guidance": resolved["sample.guidance"].component.name,
                        "guidance_scale": getattr(resolved.config("sample.guidance"), "scale", None),
                        "distilled_guidance": s.distilled_guidance, "neg_prompt": s.neg_prompt,
                        "seed": s.seed, "samples_per_prompt": s.samples_per_prompt, "batch_size": s.batch_size}
            records = [{"path": f"images/{name(i, k)}", "prompt": prompts[i], "prompt_index": i, "sample": k,
                        "seed": seed_of(i, k)} for i, k in items]
            ckpt_mod.write_json_atomic(out / "metadata.json", {"settings": settings, "images": records})
            write_sample_index(out, records)
            if s.save_npz:
                write_npz(out / "samples.npz", [images_dir / name(i, k) for i, k in items])
            print(f"minfm: wrote {len(items)} images to {out}")
    finally:
        shutdown_runtime()
    return 0


def _broadcast(obj):
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def _save_atomic(image, path: Path) -> None:
    """Write then rename: an interrupted run never leaves a truncated image that looks done."""
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
    os.replace(tmp, path)


def write_npz(path: Path, files: list[Path]) -> None:
    """``arr_0``: uint8 (N, H, W, 3), the layout the ADM evaluation suite reads.

    Streamed into the zip one image at a time (50k ImageNet samples are ~10 GB), then
    renamed into place.
    """
    import zipfile

    first = np.asarray(_open(files[0]))
    shape = (len(files), *first.shape)
    tmp = path.with_name(f".{path.name}.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            for p in files:
                arr = np.asarray(_open(p), dtype=np.uint8)
                if arr.shape != first.shape:
                    raise MinfmError(f"{p}: is {arr.shape[0]}x{arr.shape[1]}, the others {first.shape[0]}x{first.shape[1]}; "
                                     ".npz needs one size")
                f.write(np.ascontiguousarray(arr).tobytes())
    os.replace(tmp, path)


def _open(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB").copy()
