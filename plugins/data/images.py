"""Image helpers shared by the datasets: sizing to a token budget, cropping, tensors in [-1, 1]."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from minfm_core.data_loader import seed_sequence


def budget_size(width: int, height: int, max_pixels: int, multiple: int) -> tuple[int, int]:
    """(width, height) of the crop for an image under a pixel budget, both multiples of ``multiple``.

    The image is scaled (up or down, aspect kept) so its area is ``max_pixels``; the crop is
    then the largest multiple-of-``multiple`` box inside it, so every image costs about the same
    number of tokens whatever its aspect ratio.
    """
    scale = math.sqrt(max_pixels / (width * height))
    w = max(multiple, int(width * scale) // multiple * multiple)
    h = max(multiple, int(height * scale) // multiple * multiple)
    # A side raised to one multiple (extreme aspect ratios) must not push the other over budget.
    if w * h > max_pixels:
        if w == multiple:
            h = max(multiple, max_pixels // w // multiple * multiple)
        else:
            w = max(multiple, max_pixels // h // multiple * multiple)
    return w, h


#: Above this many pixels, the scaled image is not made whole before the crop (~48 MB in RGB).
MAX_RESIZED_PIXELS = 1 << 24


def resize_and_center_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize with the aspect kept so the image covers (width, height), then crop the centre."""
    scale = max(width / image.width, height / image.height)
    new_w = max(width, round(image.width * scale))
    new_h = max(height, round(image.height * scale))
    if new_w * new_h > MAX_RESIZED_PIXELS:
        # A thin image scaled to cover would be huge before the crop (a 1 x 2,000,000 PNG of a
        # few KB: 16 x 32 M pixels, 4 GB): resize only the centre region the crop keeps.
        src_w, src_h = width / scale, height / scale
        left, top = (image.width - src_w) / 2, (image.height - src_h) / 2
        return image.resize((width, height), Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS,
                            box=(left, top, left + src_w, top + src_h))
    if (new_w, new_h) != image.size:
        # Box reduces aliasing when shrinking a lot; bicubic when enlarging.
        resample = Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS
        image = image.resize((new_w, new_h), resample)
    left = (new_w - width) // 2
    top = (new_h - height) // 2
    return image.crop((left, top, left + width, top + height))


def center_square(image: Image.Image) -> Image.Image:
    side = min(image.size)
    left = (image.width - side) // 2
    top = (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> float tensor (3, 1, H, W) in [-1, 1] (one frame)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(1).div(127.5).sub(1.0).clamp(-1.0, 1.0)


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    """A generator that depends only on its keys: the same sample in every process and worker
    (all of the seed's bits count: :func:`minfm_core.data_loader.seed_sequence`)."""
    return np.random.default_rng(seed_sequence(seed, *keys))


class Flips:
    """Horizontal-flip decisions that depend on (seed, epoch, index) only: exact across resumes and workers.

    Only the train split flips: validation stays comparable across runs.
    """

    def __init__(self, p: float, seed: int, split: str = "train") -> None:
        self.p = p if split == "train" else 0.0
        self.seed = seed
        self.epoch = 0

    def __call__(self, index: int) -> bool:
        return self.p > 0 and rng_for(self.seed, self.epoch, index).random() < self.p
