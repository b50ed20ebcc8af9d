"""A simulator trace drawn from a recipe's training data.

Each step, every rank gets ``train.batch_size`` samples exactly as the data loader
deals them (one seeded permutation per epoch, rank r takes items r, r + W, ...). A
sample's packed length is its text tokens plus its image tokens (the text of a
``train.text_dropout`` share of them, a seeded draw, is the empty prompt's): image tokens from
the picture's (frames, height, width) through the VAE's compression and the
patchifier's patch size (or from a cached latent's shape); text tokens from the text
encoder's ``count_tokens`` (protocols.TextEncoder: vocab words, an HF tokenizer from the
local cache, one token per class for class tables), else a seeded draw from a fixed range.

Video clips next to images: with ``clips`` > 0 that share of the samples (a seeded draw)
count as clips of ``F`` frames (drawn from ``clip_frames``) at their own picture size,
through the VAE's time compression, so a picture dataset shows what mixing in video
would do to the balance.
"""

from __future__ import annotations

import functools
import random
import sys

import torch

from minfm_core.data_loader import epoch_order
from minfm_core.engine.pipeline import counted_tokens
from minfm_core.errors import MinfmError


def _latent_frames(frames: int, cf: int) -> int:
    """Latent frames of a clip of ``frames`` pictures: the first alone, then cf at a time."""
    return 1 + (frames - 1) // cf if cf > 1 else frames


def image_tokens(sample: dict, compression, patch, frames: int | None = None) -> int:
    """Image tokens of one dataset item (``image`` (3, F, H, W) or cached ``latent`` (C, F, h, w));
    ``frames`` counts it as a clip of that many pictures instead."""
    pf, ph, pw = patch
    cf, ch, cw = compression
    if "latent" in sample:
        _, f, h, w = sample["latent"].shape
        f = f if frames is None else _latent_frames(frames, cf)
    else:
        _, F, H, W = sample["image"].shape
        f, h, w = _latent_frames(F if frames is None else frames, cf), H // ch, W // cw
    return -(-f // pf) * -(-h // ph) * -(-w // pw)


def text_counter(resolved, text_range: tuple[int, int], seed: int):
    """A function prompt -> text tokens, from the recipe's text encoder when it can tell."""
    slot = resolved.get("model.text_encoder")
    if slot is None:
        return lambda prompt: 0
    note = None
    try:
        with torch.device("meta"):  # structure only: no weights, no downloads
            enc = slot.build(load_weights=False)
        # protocols.TextEncoder.count_tokens (None: it cannot tell); a tokenizer comes from
        # the local Hugging Face cache
        if enc.count_tokens([""]) is not None:
            return functools.partial(_count, enc, slot.component.describe())
    except Exception as exc:  # noqa: BLE001 - any failure falls back to the range, said aloud
        note = f"{type(exc).__name__}: {exc}"
    lo, hi = text_range
    print(f"text lengths: drawn from {lo}-{hi} tokens (text encoder gave none{': ' + note if note else ''})", file=sys.stderr)
    rng = random.Random(seed)
    return lambda prompt: rng.randint(lo, hi)


def _count(enc, who: str, prompt: str) -> int:
    """``prompt``'s text tokens, the answer checked as the engine checks it (a list one short was
    an IndexError here, blamed on minFM); a caption the encoder refuses stops the run too."""
    return counted_tokens(enc, who, [prompt], "model.text_encoder")[0]


def recipe_trace(resolved, world: int, steps: int, seed: int = 0, batch_size: int | None = None,
                 text_range: tuple[int, int] = (77, 512), clips: float = 0.0,
                 clip_frames: tuple[int, ...] = (17, 33, 49)) -> list[list[list[int]]]:
    """``steps`` x ``world`` x ``batch_size`` packed lengths drawn from the recipe's train data
    (a ``clips`` share of them as video clips of ``clip_frames`` frames)."""
    dataset = resolved.build("data", split="train")
    n = len(dataset)
    if n == 0:
        raise MinfmError("data: the training set is empty")
    bs = batch_size or resolved.recipe.train.batch_size
    compression = resolved.config("model.vae").compression if resolved.get("model.vae") else (1, 1, 1)
    patch = resolved.config("model.patchifier").patch_size if resolved.get("model.patchifier") else (1, 1, 1)
    count_text = text_counter(resolved, text_range, seed)
    clip_rng = random.Random(f"clips-{seed}")
    # the trainer trains that share of the samples on the empty prompt (its few tokens)
    dropout, drop_rng = resolved.recipe.train.text_dropout, random.Random(f"text-dropout-{seed}")
    per_step = world * bs
    order, epoch = epoch_order(n, seed, 0), 0
    trace = []
    for s in range(steps):
        items = []
        for k in range(s * per_step, (s + 1) * per_step):
            while k // n > epoch:
                epoch += 1
                order = epoch_order(n, seed, epoch)
            dataset.set_epoch(epoch)  # protocols.Dataset (optional member: inherited or defined)
            sample = dataset[int(order[k % n])]
            frames = clip_rng.choice(clip_frames) if clips and clip_rng.random() < clips else None
            prompt = "" if dropout and drop_rng.random() < dropout else sample.get("prompt", "")
            items.append(image_tokens(sample, compression, patch, frames) + count_text(prompt))
        trace.append([items[r::world] for r in range(world)])
    return trace
