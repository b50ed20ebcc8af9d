"""Cross-component checks, run before any model is built.

Components describe themselves through a few documented config attributes
(docs/plugins.md, "Config attributes the core reads"); a component that does not
expose one is simply not checked on it. Plugins add their own checks through the
``check_recipe`` hook.
"""

from __future__ import annotations

import math
import os
from typing import Any


def _attr(resolved, path: str, name: str) -> Any:
    cfg = resolved.config(path)
    return getattr(cfg, name, None) if cfg is not None else None


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def cross_checks(resolved, world_size: int | None = None) -> list[str]:
    problems: list[str] = []
    world = world_size or world_size_from_env()

    d_img = _attr(resolved, "model.denoiser", "d_img")
    channels = _attr(resolved, "model.vae", "latent_channels")
    patch = _attr(resolved, "model.patchifier", "patch_size")
    if d_img is not None and channels is not None and patch is not None:
        want = channels * math.prod(patch)
        if d_img != want:
            problems.append(
                f"model.denoiser.d_img: {d_img} does not match the VAE's {channels} latent channels x "
                f"patch {tuple(patch)} = {want}"
            )

    d_head = _attr(resolved, "model.denoiser", "d_head")
    axes = _attr(resolved, "model.denoiser", "rope_axes")
    if d_head is not None and axes is not None and sum(axes) != d_head:
        problems.append(f"model.denoiser.rope_axes: sum {sum(axes)} must equal d_head = {d_head}")
    if axes is not None and patch is not None and len(axes) != len(patch):
        problems.append(f"model.denoiser.rope_axes: {len(axes)} axes but the patch has {len(patch)} dims (t, y, x)")

    for enc_path, den_attr in (("model.text_encoder", "d_txt"), ("model.clip_encoder", "d_vec")):
        dim = _attr(resolved, enc_path, "dim")
        want = _attr(resolved, "model.denoiser", den_attr)
        if dim is not None and want is not None and dim != want:
            problems.append(f"{enc_path}: its output dim {dim} does not match model.denoiser.{den_attr} = {want}")

    comp = _attr(resolved, "model.vae", "compression")
    pcomp = _attr(resolved, "model.patchifier", "vae_compression")
    if comp is not None and pcomp is not None and tuple(comp) != tuple(pcomp):
        problems.append(
            f"model.patchifier.vae_compression: {tuple(pcomp)} does not match the VAE's compression {tuple(comp)}"
        )

    train = resolved.recipe.train
    if train.fid_every > 0 and not train.fid_ref:
        problems.append("train.fid_ref: train.fid_every > 0 needs reference images (an .npz or a folder)")
    if train.fid_every > 0 and train.fid_num_samples < 2:
        problems.append(f"train.fid_num_samples: FID needs at least 2 samples, got {train.fid_num_samples}")

    shard = _attr(resolved, "parallel", "shard_size")
    if shard is not None and shard > 0 and world % shard:
        problems.append(f"parallel.shard_size: world size {world} is not divisible by shard_size {shard}")

    from ..plugins import load_plugins

    for extra in load_plugins().pm.hook.check_recipe(recipe=resolved, world_size=world):
        problems.extend(extra or [])
    return problems
