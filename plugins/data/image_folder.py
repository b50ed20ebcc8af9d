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
import os
import warnings
from pathlib import Path

import torch

from minfm_core.errors import MinfmError, MinfmWarning, os_error_line
from minfm_core.images import read_rgb
from minfm_core.jsonio import parse_json
from minfm_core.safepath import came_from_outside, contained, is_inside, relative_inside
from minfm_core.textfiles import read_text

from .captions import MAX_CAPTION_BYTES, bounded_caption
from .configs import ImageFolderConfig
from .images import Flips, budget_size, resize_and_center_crop, to_tensor
from .latents import CachedLatentsDataset

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_SPLIT_DIRS = {"train": ("train",), "val": ("val", "validation")}
#: A metadata.jsonl is read whole: a line (~200 bytes) per image, 10 M images in 2 GiB.
MAX_METADATA_BYTES = 2 << 30


class ImageFolderDataset(torch.utils.data.Dataset):
    def __init__(self, cfg: ImageFolderConfig, split: str = "train") -> None:
        root, confine, split_dir = open_root("image_folder", cfg.root, split, "images")
        self.cfg = cfg
        self.split = split
        self.flips = Flips(cfg.p_flip, cfg.seed, split)
        if split_dir is not None:
            items = _scan(split_dir, cfg, confine, beside=root / "metadata.jsonl")
        else:  # the rest of the root: another split's folder is not entered (a link to it neither)
            items = _hold_out(_scan(root, cfg, confine, exclude=split_folders(root)), root, split, cfg.val_fraction)
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


def _is(test) -> bool:
    """``DirEntry.is_dir`` / ``is_file``, False for a symlink loop (which raises OSError, not False)."""
    try:
        return test()
    except OSError:
        return False


def open_root(dataset: str, root: str, split: str, what: str) -> tuple[Path, Path | None, Path | None]:
    """A folder dataset's ``root``, checked; the folder its symlinks must stay in (None:
    anywhere); and ``split``'s own folder (None: the split is held out of the whole root)."""
    if split not in _SPLIT_DIRS:
        raise MinfmError(f"{dataset}: unknown split {split!r}; expected 'train' or 'val'")
    if not root:
        raise MinfmError(f"{dataset}: set 'root' to the folder of {what} (or use_cached_latents = true)")
    path = Path(os.path.expanduser(root))
    if not path.is_dir():
        raise MinfmError(f"{dataset}: root {str(path)!r} is not a folder")
    # A downloaded dataset's symlinks must stay inside it; a folder of one's own may link in from anywhere.
    confine = path if came_from_outside(path) else None
    return path, confine, next((path / d for d in _SPLIT_DIRS[split] if (path / d).is_dir()), None)


def split_folders(root: Path) -> list[Path]:
    """The split folders (``train/``, ``val/``, ``validation/``) that exist under ``root``."""
    return [root / d for names in _SPLIT_DIRS.values() for d in names if (root / d).is_dir()]


def walk(folder: Path, confine: Path | None, dataset: str, exclude: list[Path] = ()) -> tuple[list[Path], set[Path]]:
    """(every file below ``folder``, sorted; those of them that are symlinks leading nowhere).

    Symlinked folders are followed (Path.rglob in Python 3.11 does not: sidecar mode skipped
    them while metadata rows reached through them), each real folder once: a link back to a
    folder already read (a loop, or a second link to one folder) is skipped with a warning.
    The folders in ``exclude`` (another split's) are not entered, by any path. With ``confine``
    (a downloaded root), a symlink leading outside it is refused.
    """
    files: list[Path] = []
    dangling: set[Path] = set()
    seen: set[tuple[int, int]] = set()
    skipped: list[Path] = []
    unreadable: list[Path] = []

    def key(d: Path) -> tuple[int, int]:
        st = os.stat(d)
        return st.st_dev, st.st_ino

    def visit(d: Path) -> None:
        try:
            k = key(d)
            if k in seen:
                if k not in excluded:
                    skipped.append(d)
                return
            seen.add(k)
            with os.scandir(d) as it:
                entries = list(it)
        except PermissionError:  # lost+found at a disk's root: skipped, as rglob did, but said
            unreadable.append(d)
            return
        except OSError as exc:
            raise MinfmError(f"{dataset}: {d}: {os_error_line(exc)}") from None
        for e in entries:
            path = Path(e.path)
            link = e.is_symlink()
            if link and confine is not None and not is_inside(path, confine):
                raise MinfmError(f"{dataset}: {path}: refusing a symlink that leads outside {confine} "
                                 "(a downloaded dataset's links must stay inside it)")
            if _is(e.is_dir):  # a link to a folder counts
                visit(path)
                continue
            files.append(path)
            if link and not os.path.exists(path):
                dangling.add(path)

    excluded = {key(d) for d in exclude}
    seen.update(excluded)
    visit(folder)
    if skipped:
        warnings.warn(f"{dataset}: not reading {len(skipped)} symlinked folder(s) read already (a loop, or a "
                      f"second link to one folder), such as {str(skipped[0])!r}", MinfmWarning)
    if unreadable:
        warnings.warn(f"{dataset}: skipping {len(unreadable)} folder(s) it may not read, such as "
                      f"{str(unreadable[0])!r}", MinfmWarning)
    return sorted(files), dangling


def _scan(folder: Path, cfg: ImageFolderConfig, confine: Path | None = None, exclude: list[Path] = (),
          beside: Path | None = None) -> list[tuple[Path, str]]:
    """(picture, caption) of every captioned picture below ``folder``. ``beside``: the root's
    metadata.jsonl, which a split folder's scan does not read (named when captions are missing)."""
    files, dangling = walk(folder, confine, "image_folder", exclude)
    metadata = [p for p in files if p.name == "metadata.jsonl"]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    unread = beside if beside is not None and beside.is_file() and not metadata else None
    not_here = (f"image_folder: {unread} is not read: this split's pictures are in {str(folder)!r}, which needs "
                "its own metadata.jsonl (file names relative to it)")
    mode = cfg.captions
    if mode == "auto":
        mode = "metadata" if metadata else "sidecar"
    if mode == "metadata":
        if not metadata:
            raise MinfmError(not_here if unread else
                             f"image_folder: captions = 'metadata' but no metadata.jsonl under {str(folder)!r}")
        items: list[tuple[Path, str]] = []
        seen: dict[Path, tuple[Path, int]] = {}  # across the files: one picture, one caption
        for meta in metadata:
            items += _read_metadata(meta, cfg.caption_column, seen, confine)
        if cfg.captions == "auto":
            _no_sidecars_left_out(images, seen, metadata[0])
        return items
    broken = [p for p in images if p in dangling]
    if broken:  # found now, not by the loader at the first batch that holds it
        raise MinfmError(f"image_folder: {broken[0]}: a symlink that leads nowhere (its target is missing, or a loop)")
    items = []
    missing = []
    for path in images:
        sidecar = path.with_suffix(".txt")
        if sidecar.is_file():
            items.append((path, read_caption(sidecar, "image_folder")))
        else:
            missing.append(path.name)
    if missing and items:
        warnings.warn(f"image_folder: skipping {len(missing)} images without a .txt caption under {str(folder)!r}",
                      MinfmWarning)
    elif missing:
        raise MinfmError(not_here if unread and cfg.captions == "auto" else
            f"image_folder: {len(missing)} images under {str(folder)!r} have no caption "
            f"(no metadata.jsonl, no .txt sidecar such as {missing[0]!r} -> {Path(missing[0]).stem + '.txt'!r})"
        )
    return items


def _no_sidecars_left_out(images: list[Path], listed: dict, meta: Path) -> None:
    """captions = 'auto' read metadata: a picture it does not list but that has a ``.txt`` caption
    would be dropped without a word (a folder captioned both ways), so the folder is refused."""
    for path in images:
        if path not in listed and path.with_suffix(".txt").is_file():
            raise MinfmError(f"image_folder: {meta} captions this folder, but {path} has a .txt caption and no "
                             "metadata.jsonl lists it: use one kind of caption, or set captions = 'metadata' "
                             "or 'sidecar' to read only that kind")


def read_caption(sidecar: Path, dataset: str) -> str:
    """The caption in a ``.txt`` sidecar (UTF-8, at most MAX_CAPTION_BYTES)."""
    return read_text(sidecar, f"{dataset}: {sidecar}", MAX_CAPTION_BYTES).strip()


def _read_metadata(meta: Path, column: str, seen: dict[Path, tuple[Path, int]] | None = None,
                   confine: Path | None = None) -> list[tuple[Path, str]]:
    """The (picture, caption) rows of one metadata.jsonl. ``seen`` (picture -> (file, line)) is
    shared by the caller across every metadata.jsonl it reads: a picture listed twice is refused."""
    items = []
    seen = {} if seen is None else seen
    text = read_text(meta, f"image_folder: {meta}", MAX_METADATA_BYTES)
    # JSON Lines ends a line at "\n" only: str.splitlines() also split at U+2028, U+0085, ...
    # which JSON strings may hold unescaped.
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        where = f"{meta}:{lineno}"
        row = parse_json(line, f"image_folder: {where}")
        if not isinstance(row, dict) or "file_name" not in row or column not in row:
            raise MinfmError(f"image_folder: {where}: expected keys 'file_name' and {column!r}")
        # Relative to the metadata file and below it, as Hugging Face's imagefolder layout says:
        # a downloaded dataset cannot reach /home/you/private.png (links of your own still work;
        # a downloaded one's may not lead out of it either).
        if not isinstance(row[column], str):  # null or a list would train on "None" or its repr
            raise MinfmError(f"image_folder: {where}: {column!r} must be text, got {type(row[column]).__name__}")
        inside = relative_inside if confine is None else contained
        path = inside(meta.parent, row["file_name"], what=f"image_folder: {where}: file_name")
        if not path.is_file():
            raise MinfmError(f"image_folder: {where}: image {row['file_name']!r} not found")
        if path in seen:  # one picture twice: drawn twice as often, maybe under two captions
            first, first_line = seen[path]
            at = f"line {first_line}" if first == meta else f"{first}:{first_line}"
            raise MinfmError(f"image_folder: {where}: {row['file_name']!r} is listed again (first at {at})")
        seen[path] = (meta, lineno)
        caption = bounded_caption(row[column], f"image_folder: {where}: {column!r}")
        items.append((path, caption.strip()))  # stripped, as sidecar captions are
    return items


def _hold_out(items: list[tuple[Path, str]], root: Path, split: str, fraction: float) -> list[tuple[Path, str]]:
    """Split one folder: a stable hash of each file name picks the held-out share for 'val'.

    A file is held out when its path's hash falls in the lowest ``fraction`` of the hash range,
    so its split depends on its own path alone: adding pictures never moves one already trained
    on into 'val' (taking the first ceil(fraction * n) by hash did). A folder of two or more
    pictures of which none falls there holds out the one of lowest hash, so 'val' is never empty.

    Files inside a split folder that exists (``train/``, ``val/``) belong to that split only:
    with ``train/`` alone, hashing the whole root put some of its pictures in 'val' too. The
    caller asks for a split that has no folder of its own, so when the other one has, this
    split is every file outside it, unhashed: hashing them too lost the share that fell to
    the split whose folder was read instead (in neither split, without a word)."""
    taken = split_folders(root)
    if taken:
        return [it for it in items if not any(d in it[0].parents for d in taken)]
    if fraction <= 0 or len(items) < 2:
        return items if split == "train" else []
    # The name's bytes as the OS gives them: a file name that is not UTF-8 has no str.encode().
    digests = {p: int.from_bytes(hashlib.sha1(os.fsencode(p.relative_to(root).as_posix())).digest(), "big")
               for p, _ in items}
    val = {p for p, h in digests.items() if h < fraction * 2**160}
    if not val:
        val = {min(digests, key=digests.get)}
    return [it for it in items if (it[0] in val) == (split == "val")]


def build(cfg: ImageFolderConfig, *, split: str = "train") -> torch.utils.data.Dataset:
    if cfg.use_cached_latents:
        return CachedLatentsDataset("image_folder", cfg.latents_dir, split, flips=Flips(cfg.p_flip, cfg.seed, split))
    return ImageFolderDataset(cfg, split)
