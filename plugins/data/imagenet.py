"""``imagenet``: ILSVRC-2012 from its folder layout, or VAE latents cached in safetensors shards.

Folder layout::

    root/train/n01440764/*.JPEG ...        one folder per WordNet id
    root/val/n01440764/*.JPEG ...          class folders, or a flat val/ with ``val_labels``

Labels are the standard ILSVRC order (sorted WordNet ids, as torchvision and timm use), read
from the bundled ``imagenet_classes.txt`` so a partial tree still gets the canonical labels;
prompts are made from the class's first lemma ("tench", "goldfish", ...). Images are
center-cropped to a square and resized to ``resolution``, then flipped with ``p_flip``
(train only), as the seed did.

With ``use_cached_latents`` the items come from the shared reader in latents.py (the cache
``minfm cache latents`` writes, or a hand-made index); an entry without a ``"prompt"`` gets the
prompt of its ``"label"``, and flips follow ``p_flip`` as for images.
"""

from __future__ import annotations

import csv
import io
import os
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image

from minfm_core.errors import MinfmError
from minfm_core.images import read_rgb
from minfm_core.textfiles import read_text

from .configs import ImagenetConfig
from .images import Flips, center_square, to_tensor
from .latents import CachedLatentsDataset

CLASSES_FILE = Path(__file__).with_name("imagenet_classes.txt")
#: The val labels list (LOC_val_solution.csv is ~2 MB for 50,000 images).
MAX_LABELS_BYTES = 64 << 20
_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[tuple[str, str], ...]:
    """The 1000 (wnid, first lemma) pairs in label order."""
    rows = []
    for line in CLASSES_FILE.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            wnid, lemmas = line.split("\t", 1)
            rows.append((wnid, lemmas.split(",")[0].strip()))
    return tuple(rows)


def class_names() -> list[str]:
    return [name for _, name in imagenet_classes()]


def _label_of_wnid() -> dict[str, int]:
    return {wnid: i for i, (wnid, _) in enumerate(imagenet_classes())}


class ImagenetDataset(torch.utils.data.Dataset):
    """Decoded ILSVRC images: {"image": (3, 1, R, R) in [-1, 1], "prompt", "label"}."""

    def __init__(self, cfg: ImagenetConfig, split: str = "train") -> None:
        if split not in ("train", "val"):
            raise MinfmError(f"imagenet: unknown split {split!r}; expected 'train' or 'val'")
        if not cfg.root:
            raise MinfmError("imagenet: set 'root' to the ILSVRC-2012 folder (or use_cached_latents = true)")
        self.cfg = cfg
        self.flips = Flips(cfg.p_flip, cfg.seed, split)
        self.prompts = _prompts(cfg.prompt_template)
        folder = Path(cfg.root).expanduser() / split
        if not folder.is_dir():
            raise MinfmError(f"imagenet: {str(folder)!r} is not a folder (expected <root>/{split}/<wnid>/*.JPEG)")
        if split == "val" and cfg.val_labels:
            self.items = _flat_val(folder, Path(cfg.val_labels).expanduser())
        else:
            self.items = _class_folders(folder)
        if not self.items:
            raise MinfmError(f"imagenet: no images under {str(folder)!r}")

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.flips.epoch = int(epoch)

    def prompt(self, index: int) -> str:
        """The item's prompt without decoding its picture."""
        return self.prompts[self.items[index][1]]

    def __getitem__(self, index: int) -> dict:
        path, label = self.items[index]
        r = self.cfg.resolution
        image = center_square(read_rgb(path)).resize((r, r), Image.Resampling.LANCZOS)
        pixels = to_tensor(image)
        if self.flips(index):
            pixels = pixels.flip(-1)
        return {"image": pixels, "prompt": self.prompts[label], "label": label}


def _prompts(template: str) -> list[str]:
    try:
        return [template.format(name=name) for name in class_names()]
    except (KeyError, IndexError, ValueError) as exc:
        raise MinfmError(f"imagenet: prompt_template {template!r} is invalid ({exc}); use {{name}}") from None


def _class_folders(folder: Path) -> list[tuple[Path, int]]:
    labels = _label_of_wnid()
    items = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if sub.name not in labels:
            raise MinfmError(f"imagenet: {str(sub)!r} is not an ILSVRC-2012 class folder (unknown WordNet id)")
        label = labels[sub.name]
        with os.scandir(sub) as it:
            names = sorted(e.name for e in it if e.name.lower().endswith(_IMAGE_SUFFIXES))
        items += [(sub / n, label) for n in names]
    return items


def _flat_val(folder: Path, labels_file: Path) -> list[tuple[Path, int]]:
    if not labels_file.is_file():
        raise MinfmError(f"imagenet: val_labels {str(labels_file)!r} not found")
    by_wnid = _label_of_wnid()
    pairs: list[tuple[str, str]] = []
    text = read_text(labels_file, f"imagenet: {labels_file}", MAX_LABELS_BYTES)
    if labels_file.suffix.lower() == ".csv":  # Kaggle LOC_val_solution.csv: ImageId,PredictionString
        for lineno, row in enumerate(csv.DictReader(io.StringIO(text, newline="")), 2):
            box = (row.get("PredictionString") or "").split()
            if not row.get("ImageId") or not box:
                raise MinfmError(f"imagenet: {labels_file}:{lineno}: expected columns ImageId and PredictionString "
                                 "(Kaggle's LOC_val_solution.csv)")
            pairs.append((row["ImageId"], box[0]))
    else:  # "<file> <wnid or label index>" per line
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                parts = line.split()
                if len(parts) < 2:
                    raise MinfmError(f"imagenet: {labels_file}:{lineno}: expected '<file> <wnid or label>', got {line[:80]!r}")
                pairs.append((parts[0], parts[1]))
    files = {p.stem: p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES}
    items = []
    stems = [Path(name).stem for name, _ in pairs]
    twice = sorted({s for s in stems if stems.count(s) > 1}) if len(set(stems)) < len(stems) else []
    if twice:  # the same picture in the split twice, perhaps under two labels
        raise MinfmError(f"imagenet: {labels_file}: image {twice[0]!r} is labelled more than once")
    for name, token in sorted(pairs):
        path = files.get(Path(name).stem)
        if path is None:
            raise MinfmError(f"imagenet: {labels_file}: image {name!r} not found in {str(folder)!r}")
        if token in by_wnid:
            label = by_wnid[token]
        elif token.isascii() and token.isdigit() and int(token) < 1000:
            label = int(token)
        else:
            raise MinfmError(f"imagenet: {labels_file}: {token!r} is neither a WordNet id nor a label 0-999")
        items.append((path, label))
    return items


def build(cfg: ImagenetConfig, *, split: str = "train") -> torch.utils.data.Dataset:
    if cfg.use_cached_latents:
        # prompts are made eagerly so a bad template fails here, not in a loader worker
        return CachedLatentsDataset("imagenet", cfg.latents_dir, split, flips=Flips(cfg.p_flip, cfg.seed, split),
                                    label_prompts=_prompts(cfg.prompt_template))
    return ImagenetDataset(cfg, split)
