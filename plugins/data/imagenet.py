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
import re
from collections import Counter
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image

from minfm_core.errors import MinfmError
from minfm_core.images import read_rgb
from minfm_core.safepath import came_from_outside, is_inside
from minfm_core.textfiles import read_text

from .configs import ImagenetConfig
from .image_folder import _is
from .images import Flips, center_square, to_tensor
from .latents import CachedLatentsDataset

CLASSES_FILE = Path(__file__).with_name("imagenet_classes.txt")
#: The val labels list (LOC_val_solution.csv is ~2 MB for 50,000 images).
MAX_LABELS_BYTES = 64 << 20
_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[tuple[str, str], ...]:
    """The 1000 (wnid, name) pairs in label order. The name is the first lemma, or all of
    them where an earlier class has that first lemma: as the seed's class prompts,
    "maillot" and "maillot, tank suit" (one prompt, one row of the class table, merged
    two classes). The two "crane"s (bird, machine) have one lemma each and stay one
    prompt, as in the seed."""
    rows, seen = [], set()
    for line in CLASSES_FILE.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            wnid, lemmas = line.split("\t", 1)
            name = lemmas.split(",")[0].strip()
            if name in seen:
                name = ", ".join(x.strip() for x in lemmas.split(","))
            seen.add(name)
            rows.append((wnid, name))
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
        folder = Path(os.path.expanduser(cfg.root)) / split
        if not folder.is_dir():
            raise MinfmError(f"imagenet: {str(folder)!r} is not a folder (expected <root>/{split}/<wnid>/*.JPEG)")
        if split == "val" and cfg.val_labels:
            self.items = _flat_val(folder, Path(os.path.expanduser(cfg.val_labels)))
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


def is_image(name: str) -> bool:
    return name.lower().endswith(_IMAGE_SUFFIXES)


def _confine(split_folder: Path) -> Path | None:
    """The ILSVRC root a downloaded tree's symlinks must stay in (None: a tree of one's own)."""
    if not came_from_outside(split_folder):
        return None
    _stays_in(split_folder, split_folder.parent)
    return split_folder.parent


def _stays_in(path: Path, confine: Path | None) -> None:
    if confine is not None and not is_inside(path, confine):
        raise MinfmError(f"imagenet: {path}: refusing a symlink that leads outside {confine} "
                         "(a downloaded dataset's links must stay inside it)")


def _pictures(folder: Path, confine: Path | None) -> Iterator[os.DirEntry]:
    """The entries of ``folder`` named like pictures, each checked to be one now: a folder or a
    broken link named x.JPEG failed only when the loader reached it, after ``prepare`` had written
    its tables. With ``confine`` (a downloaded tree) a symlink may not lead out of it."""
    with os.scandir(folder) as it:
        entries = [e for e in it if is_image(e.name)]
    for e in entries:
        if e.is_symlink():
            _stays_in(Path(e.path), confine)
        if not _is(e.is_file):
            raise MinfmError(f"imagenet: {e.path}: not a picture file (a folder, a special file, or a symlink "
                             "leading nowhere)")
        yield e


def _class_folder_files(folder: Path) -> Iterator[tuple[Path, int, list[str]]]:
    """(class folder, label, sorted picture names) for each <wnid>/ under ``folder``; pictures lying
    directly in ``folder`` are not read."""
    labels = _label_of_wnid()
    confine = _confine(folder)
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if sub.name not in labels:
            raise MinfmError(f"imagenet: {str(sub)!r} is not an ILSVRC-2012 class folder (unknown WordNet id)")
        if sub.is_symlink():
            _stays_in(sub, confine)
        yield sub, labels[sub.name], sorted(e.name for e in _pictures(sub, confine))


def _class_folders(folder: Path) -> list[tuple[Path, int]]:
    return [(sub / n, label) for sub, label, names in _class_folder_files(folder) for n in names]


def count_images(folder: Path, val_labels: Path | None = None) -> int:
    """How many pictures the dataset reads from a split folder: those its ``val_labels`` list when
    given, else those in class folders (the same walk and checks, without keeping every path)."""
    if val_labels is not None:
        return len(_flat_val(folder, val_labels))
    return sum(len(names) for _, _, names in _class_folder_files(folder))


def _shown(text: str, limit: int = 60) -> str:
    """``text`` for an error line: a 100,000-character field would make a line nobody can read."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _label_rows(labels_file: Path, text: str) -> list[tuple[int, str, str]]:
    """(line, file, wnid or label) for each entry of a val labels file."""
    rows: list[tuple[int, str, str]] = []
    if labels_file.suffix.lower() == ".csv":  # Kaggle LOC_val_solution.csv: ImageId,PredictionString
        reader = csv.DictReader(io.StringIO(text, newline=""))
        start = 1
        try:
            while reader.fieldnames is not None:  # None: an empty file
                start = reader.line_num + 1  # where a failing row began (an unclosed quote runs on to the end)
                row = next(reader, None)
                if row is None:
                    break
                box = (row.get("PredictionString") or "").split()
                if not row.get("ImageId") or not box:
                    raise MinfmError(f"imagenet: {labels_file}:{reader.line_num}: expected columns ImageId and "
                                     "PredictionString (Kaggle's LOC_val_solution.csv)")
                rows.append((reader.line_num, row["ImageId"], box[0]))
        except csv.Error as exc:  # a field past csv's limit of 131,072 characters, ...
            raise MinfmError(f"imagenet: {labels_file}:{start}: not a readable CSV row ({exc})") from None
    else:  # "<file> <wnid or label index>" per line
        # Lines end at "\n" only, and fields part at ASCII blanks: str.splitlines() and str.split()
        # also broke at U+2028, U+0085, ... (a file name may hold them), and the line numbers moved.
        for lineno, line in enumerate(text.split("\n"), 1):
            parts = re.split(r"[ \t\f\v]+", line.removesuffix("\r").strip(" \t\f\v"))
            if parts != [""]:
                if len(parts) < 2:
                    raise MinfmError(f"imagenet: {labels_file}:{lineno}: expected '<file> <wnid or label>', "
                                     f"got {_shown(line)}")
                rows.append((lineno, parts[0], parts[1]))
    return rows


def _flat_val(folder: Path, labels_file: Path) -> list[tuple[Path, int]]:
    if not labels_file.is_file():
        raise MinfmError(f"imagenet: val_labels {str(labels_file)!r} not found")
    by_wnid = _label_of_wnid()
    text = read_text(labels_file, f"imagenet: {labels_file}", MAX_LABELS_BYTES)
    rows = _label_rows(labels_file, text)
    pictures = [Path(e.path) for e in _pictures(folder, _confine(folder))]
    by_name = {p.name: p for p in pictures}
    by_stem: dict[str, list[Path]] = {}
    for p in pictures:
        by_stem.setdefault(p.stem, []).append(p)
    # Counted in one pass: stems.count(s) per stem took hours on a 64 MiB list.
    twice = sorted(s for s, n in Counter(Path(name).stem for _, name, _ in rows).items() if n > 1)
    if twice:  # the same picture in the split twice, perhaps under two labels
        raise MinfmError(f"imagenet: {labels_file}: image {_shown(twice[0])} is labelled more than once")
    items = []
    for lineno, name, token in sorted(rows, key=lambda row: row[1]):
        # The file named, else (Kaggle's ImageId has no extension) the one picture of that stem:
        # with x.JPEG and x.png both there, matching by stem alone picked either.
        path = by_name.get(name)
        if path is None:
            found = sorted(by_stem.get(Path(name).stem, []))
            if len(found) > 1:
                raise MinfmError(f"imagenet: {labels_file}:{lineno}: image {_shown(name)} could be any of "
                                 f"{', '.join(p.name for p in found[:3])} in {str(folder)!r}: name the file whole, "
                                 "or keep one picture of that name")
            path = found[0] if found else None
        if path is None:
            raise MinfmError(f"imagenet: {labels_file}:{lineno}: image {_shown(name)} not found in {str(folder)!r}")
        if token in by_wnid:
            label = by_wnid[token]
        # The length first: int() of a 5000-digit token raises ValueError (Python's digit limit).
        elif token.isascii() and token.isdigit() and len(token.lstrip("0")) <= 3:
            label = int(token)
        else:
            raise MinfmError(f"imagenet: {labels_file}:{lineno}: {_shown(token)} is neither a WordNet id nor a label 0-999")
        items.append((path, label))
    return items


def build(cfg: ImagenetConfig, *, split: str = "train") -> torch.utils.data.Dataset:
    if cfg.use_cached_latents:
        # prompts are made eagerly so a bad template fails here, not in a loader worker
        return CachedLatentsDataset("imagenet", cfg.latents_dir, split, flips=Flips(cfg.p_flip, cfg.seed, split),
                                    label_prompts=_prompts(cfg.prompt_template))
    return ImagenetDataset(cfg, split)
