"""A simulator trace drawn from a recipe's training data.

Each step, every rank gets ``train.batch_size`` samples exactly as the data loader
deals them (one seeded permutation per epoch, rank r takes items r, r + W, ...). A
sample's packed length is its text tokens plus its image tokens: image tokens from
the picture's (frames, height, width) through the VAE's compression and the
patchifier's patch size (or from a cached latent's shape); text tokens from the text
encoder's own tokenizer (vocab words, an HF tokenizer from the local cache, one
token per class for class tables), else a seeded draw from a fixed range.
"""

from __future__ import annotations

import random
import sys

import torch

from minfm_core.data_loader import epoch_order
from minfm_core.errors import MinfmError


def image_tokens(sample: dict, compression, patch) -> int:
    """Image tokens of one dataset item (``image`` (3, F, H, W) or cached ``latent`` (C, F, h, w))."""
    pf, ph, pw = patch
    if "latent" in sample:
        _, f, h, w = sample["latent"].shape
    else:
        _, F, H, W = sample["image"].shape
        cf, ch, cw = compression
        f, h, w = (1 + (F - 1) // cf if cf > 1 else F), H // ch, W // cw
    return -(-f // pf) * -(-h // ph) * -(-w // pw)


def text_counter(resolved, text_range: tuple[int, int], seed: int):
    """A function prompt -> text tokens, from the recipe's text encoder when it can tell."""
    slot = resolved.get("model.text_encoder")
    if slot is None:
        return lambda prompt: 0
    cfg = slot.config
    note = None
    try:
        with torch.device("meta"):  # structure only: no weights, no downloads
            enc = slot.build(load_weights=False)
        if hasattr(enc, "ids"):  # word vocabulary
            return lambda prompt: len(enc.ids(prompt))
        if hasattr(enc, "indices"):  # class table: one token per prompt
            return lambda prompt: 1
        if hasattr(enc, "tokenizer"):
            tok = enc.tokenizer  # from the local Hugging Face cache
            max_len = int(getattr(cfg, "max_length", 512))
            if getattr(cfg, "keep_padding", False):
                return lambda prompt: max_len
            return lambda prompt: len(tok(prompt, truncation=True, max_length=max_len)["input_ids"])
    except Exception as exc:  # noqa: BLE001 - any failure falls back to the range, said aloud
        note = f"{type(exc).__name__}: {exc}"
    lo, hi = text_range
    print(f"text lengths: drawn from {lo}-{hi} tokens (text encoder gave none{': ' + note if note else ''})", file=sys.stderr)
    rng = random.Random(seed)
    return lambda prompt: rng.randint(lo, hi)


def recipe_trace(resolved, world: int, steps: int, seed: int = 0, batch_size: int | None = None,
                 text_range: tuple[int, int] = (77, 512)) -> list[list[list[int]]]:
    """``steps`` x ``world`` x ``batch_size`` packed lengths drawn from the recipe's train data."""
    dataset = resolved.build("data", split="train")
    n = len(dataset)
    if n == 0:
        raise MinfmError("data: the training set is empty")
    bs = batch_size or resolved.recipe.train.batch_size
    compression = resolved.config("model.vae").compression if resolved.get("model.vae") else (1, 1, 1)
    patch = resolved.config("model.patchifier").patch_size if resolved.get("model.patchifier") else (1, 1, 1)
    count_text = text_counter(resolved, text_range, seed)
    per_step = world * bs
    order, epoch = epoch_order(n, seed, 0), 0
    set_epoch = getattr(dataset, "set_epoch", None)
    trace = []
    for s in range(steps):
        items = []
        for k in range(s * per_step, (s + 1) * per_step):
            while k // n > epoch:
                epoch += 1
                order = epoch_order(n, seed, epoch)
            if set_epoch is not None:
                set_epoch(epoch)
            sample = dataset[int(order[k % n])]
            items.append(image_tokens(sample, compression, patch) + count_text(sample.get("prompt", "")))
        trace.append([items[r::world] for r in range(world)])
    return trace
