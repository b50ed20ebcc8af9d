"""``imagenet``: ILSVRC-2012 from its folder layout, or VAE latents cached in safetensors shards.

Folder layout::

    root/train/n01440764/*.JPEG ...        one folder per WordNet id
    root/val/n01440764/*.JPEG ...          class folders, or a flat val/ with ``val_labels``

Labels are the standard ILSVRC order (sorted WordNet ids, as torchvision and timm use), read
from the bundled ``imagenet_classes.txt`` so a partial tree still gets the canonical labels;
prompts are made from the class's first lemma ("tench", "goldfish", ...). Images are
center-cropped to a square and resized to ``resolution``, then flipped with ``p_flip``
(train only), as the seed did.

Cached latents: ``latents_dir/[<split>/]index.json`` lists entries
``{"shard": "part-00000.safetensors", "key": "n01440764_10026", "prompt": ..., "label": ...}``
(optionally ``"split"``, default ``"train"``, to share one index between splits and ``"flip_key"`` naming the
latent of the flipped image). Shards are resolved relative to the index file.
"""

from __future__ import annotations

import csv
import json
import os
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image

from minfm_core.errors import MinfmError

from .configs import ImagenetConfig
from .images import center_square, open_rgb, rng_for, to_tensor

CLASSES_FILE = Path(__file__).with_name("imagenet_classes.txt")
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


class _Flip:
    """Flip decisions that depend on (seed, epoch, index) only: exact across resumes and workers."""

    def __init__(self, cfg: ImagenetConfig, split: str) -> None:
        self.p = cfg.p_flip if split == "train" else 0.0  # validation stays comparable across runs
        self.seed = cfg.seed
        self.epoch = 0

    def __call__(self, index: int) -> bool:
        return self.p > 0 and rng_for(self.seed, self.epoch, index).random() < self.p


class ImagenetDataset(torch.utils.data.Dataset):
    """Decoded ILSVRC images: {"image": (3, 1, R, R) in [-1, 1], "prompt", "label"}."""

    def __init__(self, cfg: ImagenetConfig, split: str = "train") -> None:
        if split not in ("train", "val"):
            raise MinfmError(f"imagenet: unknown split {split!r}; expected 'train' or 'val'")
        if not cfg.root:
            raise MinfmError("imagenet: set 'root' to the ILSVRC-2012 folder (or use_cached_latents = true)")
        self.cfg = cfg
        self.flip = _Flip(cfg, split)
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
        self.flip.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict:
        path, label = self.items[index]
        r = self.cfg.resolution
        image = center_square(open_rgb(path)).resize((r, r), Image.Resampling.LANCZOS)
        pixels = to_tensor(image)
        if self.flip(index):
            pixels = pixels.flip(-1)
        return {"image": pixels, "prompt": self.prompts[label], "label": label}


class CachedLatentsDataset(torch.utils.data.Dataset):
    """Latents from safetensors shards: {"latent": (C, F, h, w), "prompt", "label"?}."""

    def __init__(self, cfg: ImagenetConfig, split: str = "train") -> None:
        if not cfg.latents_dir:
            raise MinfmError("imagenet: use_cached_latents = true needs 'latents_dir'")
        base = Path(cfg.latents_dir).expanduser()
        index = base / split / "index.json"
        if not index.is_file():
            index = base / "index.json"
        if not index.is_file():
            raise MinfmError(f"imagenet: no index.json in {str(base)!r} (or its {split}/ folder)")
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise MinfmError(f"imagenet: {index}: not JSON ({exc.msg})") from None
        entries = data.get("entries") if isinstance(data, dict) else data
        if not isinstance(entries, list):
            raise MinfmError(f"imagenet: {index}: expected a list of entries (or {{'entries': [...]}})")
        if not all(isinstance(e, dict) for e in entries):
            raise MinfmError(f"imagenet: {index}: every entry must be an object with 'shard' and 'key'")
        entries = [e for e in entries if e.get("split", "train") == split]
        if not entries:
            raise MinfmError(f"imagenet: {index}: no entries for split {split!r}")
        prompts = _prompts(cfg.prompt_template)
        self.entries = []
        for i, e in enumerate(entries):
            if "shard" not in e or "key" not in e:
                raise MinfmError(f"imagenet: {index}: entry {i} needs 'shard' and 'key'")
            label = e.get("label")
            prompt = e.get("prompt")
            if prompt is None:
                if label is None:
                    raise MinfmError(f"imagenet: {index}: entry {i} has neither 'prompt' nor 'label'")
                prompt = prompts[int(label)]
            self.entries.append((str(index.parent / e["shard"]), e["key"], e.get("flip_key"), prompt, label))
        self.flip = _Flip(cfg, split)
        self._handles: dict[str, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        self.flip.epoch = int(epoch)

    def _tensor(self, shard: str, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if self._pid != os.getpid():  # a forked worker opens its own memory maps
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(shard)
        if handle is None:
            if not os.path.isfile(shard):
                raise MinfmError(f"imagenet: latent shard {shard!r} not found")
            handle = self._handles[shard] = safe_open(shard, framework="pt")
        try:
            return handle.get_tensor(key)
        except Exception:  # safetensors raises its own error types for a missing key
            raise MinfmError(f"imagenet: key {key!r} not found in {shard!r}") from None

    def __getitem__(self, index: int) -> dict:
        shard, key, flip_key, prompt, label = self.entries[index]
        flip = self.flip(index)
        latent = self._tensor(shard, flip_key if flip and flip_key else key).float()
        if flip and not flip_key:
            # Convolutional VAEs are close to flip-equivariant: flipping the latent stands in
            # for encoding the flipped image when the cache holds no flipped copy.
            latent = latent.flip(-1)
        if latent.dim() == 3:
            latent = latent.unsqueeze(1)  # (C, h, w) -> (C, 1, h, w)
        sample = {"latent": latent, "prompt": prompt}
        if label is not None:
            sample["label"] = int(label)
        return sample


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
    if labels_file.suffix.lower() == ".csv":  # Kaggle LOC_val_solution.csv: ImageId,PredictionString
        with labels_file.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                pairs.append((row["ImageId"], row["PredictionString"].split()[0]))
    else:  # "<file> <wnid or label index>" per line
        for line in labels_file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                name, token = line.split()[:2]
                pairs.append((name, token))
    files = {p.stem: p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES}
    items = []
    for name, token in sorted(pairs):
        path = files.get(Path(name).stem)
        if path is None:
            raise MinfmError(f"imagenet: {labels_file}: image {name!r} not found in {str(folder)!r}")
        if token in by_wnid:
            label = by_wnid[token]
        elif token.isdigit() and int(token) < 1000:
            label = int(token)
        else:
            raise MinfmError(f"imagenet: {labels_file}: {token!r} is neither a WordNet id nor a label 0-999")
        items.append((path, label))
    return items


def build(cfg: ImagenetConfig, *, split: str = "train") -> torch.utils.data.Dataset:
    return CachedLatentsDataset(cfg, split) if cfg.use_cached_latents else ImagenetDataset(cfg, split)
