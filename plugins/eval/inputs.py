"""Image sets to evaluate: ``.npz`` batches (ADM layout) and image folders, read in uint8 batches.

An ``.npz`` holds ``arr_0``, uint8 ``(N, H, W, 3)``. A stored (uncompressed) member is
memory-mapped, so 50k ImageNet samples (~10 GB) are never all in memory.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from minfm_core.errors import MinfmError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def npz_images(path: str | Path, key: str = "arr_0") -> np.ndarray:
    """``key`` of an .npz as an (N, H, W, 3) uint8 array (memory-mapped when stored uncompressed)."""
    path = Path(path)
    if not path.is_file():
        raise MinfmError(f"{path}: no such .npz file")
    try:
        arr = _mapped(path, key)
        if arr is None:
            with np.load(path) as z:
                if key not in z:
                    raise MinfmError(f"{path}: has no array {key!r} (has {', '.join(z.keys()) or 'none'})")
                arr = z[key]
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise MinfmError(f"{path}: not a readable .npz ({exc})") from None
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise MinfmError(f"{path}: {key} must be uint8 (N, H, W, 3) images, got {arr.dtype} {arr.shape}")
    return arr


def _mapped(path: Path, key: str) -> np.ndarray | None:
    with zipfile.ZipFile(path) as zf:
        try:
            info = zf.getinfo(f"{key}.npy")
        except KeyError:
            return None
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            header_len = f.tell()
    if fortran or dtype.hasobject:
        return None
    with open(path, "rb") as raw:
        raw.seek(info.header_offset)
        local = raw.read(30)
        name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
    offset = info.header_offset + 30 + name_len + extra_len + header_len
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def folder_images(path: str | Path) -> list[Path]:
    root = Path(path)
    if not root.is_dir():
        raise MinfmError(f"{path}: no such folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise MinfmError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return files


def image_batches(source: str | Path, batch_size: int) -> tuple[int, Iterator[np.ndarray]]:
    """(count, iterator of uint8 (B, H, W, 3) batches) for an .npz file or an image folder.

    Folder images of different sizes go in separate batches (the network resizes each to 299).
    """
    source = Path(source)
    if source.is_dir():
        files = folder_images(source)
        return len(files), _folder_batches(files, batch_size)
    arr = npz_images(source)
    return arr.shape[0], (np.asarray(arr[i : i + batch_size]) for i in range(0, arr.shape[0], batch_size))


def _folder_batches(files: list[Path], batch_size: int) -> Iterator[np.ndarray]:
    from minfm_core.images import read_rgb

    batch: list[np.ndarray] = []
    for p in files:
        a = np.asarray(read_rgb(p))
        if batch and (len(batch) == batch_size or a.shape != batch[0].shape):
            yield np.stack(batch)
            batch = []
        batch.append(a)
    if batch:
        yield np.stack(batch)
