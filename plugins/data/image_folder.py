"""``image_folder``: a folder of images with captions, resized to a token budget.

Captions come from ``metadata.jsonl`` (one ``{"file_name": ..., "text": ...}`` per line, the
Hugging Face imagefolder convention, file names relative to the folder holding the jsonl) or
from ``.txt`` sidecars (``cat.png`` + ``cat.txt``). Each image keeps its aspect ratio: it is
scaled to about ``max_pixels`` pixels and center-cropped to multiples of ``size_multiple``, so
a batch mixes shapes at a similar token count. With ``use_cached_latents`` the items are the
latents ``minfm cache latents`` wrote (latents.py), flipped by ``p_flip`` as the images would be.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from pathlib import Path

import torch

from minfm_core.errors import MinfmError, MinfmWarning
from minfm_core.images import read_rgb
from minfm_core.jsonio import parse_json
from minfm_core.safepath import relative_inside
from minfm_core.textfiles import read_text

from .configs import ImageFolderConfig
from .images import Flips, budget_size, resize_and_center_crop, to_tensor
from .latents import CachedLatentsDataset

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_SPLIT_DIRS = {"train": ("train",), "val": ("val", "validation")}
#: A caption is a sentence or a paragraph: a larger sidecar is not one.
MAX_CAPTION_BYTES = 1 << 20
#: A metadata.jsonl is read whole: a line (~200 bytes) per image, 10 M images in 2 GiB.
MAX_METADATA_BYTES = 2 << 30


class ImageFolderDataset(torch.utils.data.Dataset):
    def __init__(self, cfg: ImageFolderConfig, split: str = "train") -> None:
        if split not in _SPLIT_DIRS:
            raise MinfmError(f"image_folder: unknown split {split!r}; expected 'train' or 'val'")
        if not cfg.root:
            raise MinfmError("image_folder: set 'root' to the folder of images (or use_cached_latents = true)")
        root = Path(os.path.expanduser(cfg.root))
        if not root.is_dir():
            raise MinfmError(f"image_folder: root {str(root)!r} is not a folder")
        self.cfg = cfg
        self.split = split
        self.flips = Flips(cfg.p_flip, cfg.seed, split)
        split_dir = next((root / d for d in _SPLIT_DIRS[split] if (root / d).is_dir()), None)
        if split_dir is not None:
            items = _scan(split_dir, cfg)
        else:
            items = _hold_out(_scan(root, cfg), root, split, cfg.val_fraction)
        if not items:
            raise MinfmError(f"image_folder: no captioned images for split {split!r} under {str(root)!r}")
        self.items = items  # [(path, caption)] in a fixed order

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Flips depend on (seed, epoch, index): the loader sets the epoch of each sample."""
        self.flips.epoch = int(epoch)

    def prompt(self, index: int) -> str:
        """The item's caption without decoding its picture."""
        return self.items[index][1]

    def __getitem__(self, index: int) -> dict:
        path, caption = self.items[index]
        image = read_rgb(path)
        w, h = budget_size(image.width, image.height, self.cfg.max_pixels, self.cfg.size_multiple)
        image = resize_and_center_crop(image, w, h)
        pixels = to_tensor(image)
        if self.flips(index):
            pixels = pixels.flip(-1)
        return {"image": pixels, "prompt": caption}


def _scan(folder: Path, cfg: ImageFolderConfig) -> list[tuple[Path, str]]:
    metadata = sorted(folder.rglob("metadata.jsonl"))
    mode = cfg.captions
    if mode == "auto":
        mode = "metadata" if metadata else "sidecar"
    if mode == "metadata":
        if not metadata:
            raise MinfmError(f"image_folder: captions = 'metadata' but no metadata.jsonl under {str(folder)!r}")
        items = []
        for meta in metadata:
            items += _read_metadata(meta, cfg.caption_column)
        return items
    items = []
    missing = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        sidecar = path.with_suffix(".txt")
        if sidecar.is_file():
            items.append((path, read_caption(sidecar, "image_folder")))
        else:
            missing.append(path.name)
    if missing and items:
        warnings.warn(f"image_folder: skipping {len(missing)} images without a .txt caption under {str(folder)!r}",
                      MinfmWarning)
    elif missing:
        raise MinfmError(
            f"image_folder: {len(missing)} images under {str(folder)!r} have no caption "
            f"(no metadata.jsonl, no .txt sidecar such as {missing[0]!r} -> {Path(missing[0]).stem + '.txt'!r})"
        )
    return items


def read_caption(sidecar: Path, dataset: str) -> str:
    """The caption in a ``.txt`` sidecar (UTF-8, at most MAX_CAPTION_BYTES)."""
    return read_text(sidecar, f"{dataset}: {sidecar}", MAX_CAPTION_BYTES).strip()


def _read_metadata(meta: Path, column: str) -> list[tuple[Path, str]]:
    items, seen = [], {}
    for lineno, line in enumerate(read_text(meta, f"image_folder: {meta}", MAX_METADATA_BYTES).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{meta}:{lineno}"
        row = parse_json(line, f"image_folder: {where}")
        if not isinstance(row, dict) or "file_name" not in row or column not in row:
            raise MinfmError(f"image_folder: {where}: expected keys 'file_name' and {column!r}")
        # Relative to the metadata file and below it, as Hugging Face's imagefolder layout says:
        # a downloaded dataset cannot reach /home/you/private.png (links of your own still work).
        if not isinstance(row[column], str):  # null or a list would train on "None" or its repr
            raise MinfmError(f"image_folder: {where}: {column!r} must be text, got {type(row[column]).__name__}")
        path = relative_inside(meta.parent, row["file_name"], what=f"image_folder: {where}: file_name")
        if not path.is_file():
            raise MinfmError(f"image_folder: {where}: image {row['file_name']!r} not found")
        if path in seen:  # one picture twice: drawn twice as often, maybe under two captions
            raise MinfmError(f"image_folder: {where}: {row['file_name']!r} is listed again (first at line {seen[path]})")
        seen[path] = lineno
        items.append((path, row[column].strip()))  # stripped, as sidecar captions are
    return items


def _hold_out(items: list[tuple[Path, str]], root: Path, split: str, fraction: float) -> list[tuple[Path, str]]:
    """Split one folder: a stable hash of each file name picks the held-out share for 'val'.

    Files inside a split folder that exists (``train/``, ``val/``) belong to that split only:
    with ``train/`` alone, hashing the whole root put some of its pictures in 'val' too."""
    taken = [root / d for names in _SPLIT_DIRS.values() for d in names if (root / d).is_dir()]
    if taken:
        items = [it for it in items if not any(d in it[0].parents for d in taken)]
    if fraction <= 0:
        return items if split == "train" else []
    n_val = max(1, math.ceil(fraction * len(items))) if len(items) > 1 else 0
    ranked = sorted(items, key=lambda it: hashlib.sha1(it[0].relative_to(root).as_posix().encode()).hexdigest())
    val = {p for p, _ in ranked[:n_val]}
    return [it for it in items if (it[0] in val) == (split == "val")]


def build(cfg: ImageFolderConfig, *, split: str = "train") -> torch.utils.data.Dataset:
    if cfg.use_cached_latents:
        return CachedLatentsDataset("image_folder", cfg.latents_dir, split, flips=Flips(cfg.p_flip, cfg.seed, split))
    return ImageFolderDataset(cfg, split)
