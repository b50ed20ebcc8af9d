"""Image sets to evaluate: ``.npz`` batches (ADM layout) and image folders, read in bounded uint8 batches.

An ``.npz`` holds ``arr_0``, uint8 ``(N, H, W, 3)``, and comes from outside: a 1.5 MB
deflated member can declare gigabytes of zeros. So its ``.npy`` header is read from the
zip and checked against the member's size before any pixel is read; then a stored member
is memory-mapped and a compressed one streamed, a batch at a time, so 50k ImageNet samples
(~10 GB) are never all in memory. Either way the member's CRC-32 is checked once the last
batch has been read.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minfm_core.errors import MinfmError, first_line
from minfm_core.safepath import missing_folder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

#: Pixels in one batch at most: 2**25 is ~100 MB of uint8 RGB (~400 MB once the network
#: makes it float32), still 512 ImageNet-256 images or 64 of 724 x 724, so usual batch sizes
#: are unaffected; --batch-size alone would let 64 full-size photos take tens of GB.
BATCH_PIXELS = 2**25
#: A .npy header is a short dict literal; numpy itself refuses to parse one over 10,000 bytes.
_MAX_NPY_HEADER = 10_000
#: What a hostile zip or .npy makes zipfile, zlib, numpy or mmap raise.
_READ_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, EOFError, ValueError, TypeError,
                SyntaxError, RecursionError, OverflowError, RuntimeError, NotImplementedError)


def _max_pixels() -> int:
    from PIL import Image

    return int(Image.MAX_IMAGE_PIXELS)  # folders get the same limit through read_rgb


@dataclass(frozen=True)
class NpzImages:
    """The checked ``.npy`` header of one member of an .npz; :meth:`batches` reads its pixels."""

    path: Path
    name: str  # the member, e.g. "arr_0.npy"
    header: bytes  # the member's first bytes: magic, length and dict
    shape: tuple[int, int, int, int]
    stored: bool
    offset: int  # of the member's local file header in the file
    crc: int  # the CRC-32 the zip records for the whole member

    def batches(self, rows: int) -> Iterator[np.ndarray]:
        """uint8 (<= rows, H, W, 3) batches; a MinfmError naming the file if the data is bad."""
        try:
            yield from (self._mapped if self.stored else self._streamed)(rows)
        except _READ_ERRORS as exc:
            raise MinfmError(f"{self.path}: {self.name} is not readable ({first_line(exc, 200)})") from None

    def _mapped(self, rows: int) -> Iterator[np.ndarray]:
        with open(self.path, "rb") as raw:  # the local header's own name and extra lengths place the data
            raw.seek(self.offset)
            local = raw.read(30)
            size = raw.seek(0, io.SEEK_END)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise ValueError("bad local file header")
        start = self.offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
        n, h, w, _ = self.shape
        if start + len(self.header) + n * h * w * 3 > size:  # the size was checked against the member's
            raise ValueError("the member runs past the end of the file")
        # The zip's CRC covers the header bytes too; the pixels are added as they are read.
        crc = zlib.crc32(self.header)
        if self.shape[0]:
            mapped = np.memmap(self.path, dtype=np.uint8, mode="r", offset=start + len(self.header), shape=self.shape)
            for i in range(0, self.shape[0], rows):
                batch = mapped[i : i + rows]
                crc = zlib.crc32(batch, crc)
                yield batch
            del mapped
        if crc != self.crc:
            raise MinfmError(f"{self.path}: {self.name} fails its CRC-32 check (the file is corrupt)")

    def _streamed(self, rows: int) -> Iterator[np.ndarray]:
        n, h, w, _ = self.shape
        with zipfile.ZipFile(self.path) as zf, zf.open(self.name) as f:
            _read_exact(f, len(self.header))
            for i in range(0, n, rows):
                k = min(rows, n - i)
                yield np.frombuffer(_read_exact(f, k * h * w * 3), np.uint8).reshape(k, h, w, 3)
            # zipfile checks the CRC when a read reaches the member's end: make sure one does.
            if f.read(1):
                raise ValueError("more data than its header declares")


def _read_exact(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError(f"the data ends {n - len(data)} bytes early")
    return data


def _npy_header(f) -> tuple[bytes, tuple, bool, np.dtype]:
    """(header bytes, shape, fortran order, dtype) of the .npy stream ``f``, reading only the header.

    The length is bounded before the header is read: numpy's own reader takes a version-2
    header's 4-byte length at its word (4 GB) and checks its size only after reading it.
    """
    magic = _read_exact(f, 8)
    if magic[:6] != b"\x93NUMPY" or magic[6:] not in (b"\x01\x00", b"\x02\x00"):
        raise ValueError("not a .npy array of format version 1.0 or 2.0")
    length = _read_exact(f, 2 if magic[6] == 1 else 4)
    size = int.from_bytes(length, "little")
    if size > _MAX_NPY_HEADER:
        raise ValueError(f"a .npy header of {size} bytes (at most {_MAX_NPY_HEADER})")
    text = _read_exact(f, size)
    read = np.lib.format.read_array_header_1_0 if magic[6] == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(io.BytesIO(length + text))  # a literal dict, parsed without eval
    return magic + length + text, shape, fortran, dtype


def npz_images(path: str | Path, key: str = "arr_0") -> NpzImages:
    """``key`` of an .npz, its header checked as uint8 (N, H, W, 3) images; nothing else is read yet."""
    path = Path(path)
    if not path.is_file():
        raise MinfmError(f"{path}: no such .npz file")
    name = f"{key}.npy"
    try:
        with zipfile.ZipFile(path) as zf:
            try:
                info = zf.getinfo(name)
            except KeyError:
                have = ", ".join(n.removesuffix(".npy") for n in zf.namelist()[:10]) or "none"
                raise MinfmError(f"{path}: has no array {key!r} (has {have})") from None
            if info.flag_bits & 0x1:  # zipfile would say so too, quoting its ZipInfo's repr
                raise MinfmError(f"{path}: {name} is encrypted")
            with zf.open(info) as f:  # encrypted, unknown compression, a bad local header: raised here
                header, shape, fortran, dtype = _npy_header(f)
    except _READ_ERRORS as exc:
        raise MinfmError(f"{path}: not a readable .npz ({first_line(exc, 200)})") from None
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise MinfmError(f"{path}: {key} must be uint8 (N, H, W, 3) images, got {dtype} {shape}")
    if fortran:
        raise MinfmError(f"{path}: {key} is stored in Fortran order; save it C-ordered (np.ascontiguousarray)")
    n, h, w, _ = shape
    if min(shape) < 0 or h < 1 or w < 1:
        raise MinfmError(f"{path}: {key} has shape {shape}: images need at least 1 x 1 pixels")
    if h * w > _max_pixels():
        raise MinfmError(f"{path}: {key} holds images of {h} x {w} pixels, over the limit of {_max_pixels():,} "
                         "pixels an image may have (PIL's decompression-bomb limit)")
    expected = len(header) + n * h * w * 3
    if info.file_size != expected:  # a header that lies about its shape
        raise MinfmError(f"{path}: {name} holds {info.file_size:,} bytes, but its header declares {shape} "
                         f"({expected:,} bytes)")
    stored = info.compress_type == zipfile.ZIP_STORED
    if stored and info.compress_size != info.file_size:
        raise MinfmError(f"{path}: {name} is stored uncompressed but its compressed size "
                         f"{info.compress_size:,} differs from its size {info.file_size:,}")
    return NpzImages(path, name, header, shape, stored, info.header_offset, info.CRC)


def folder_images(path: str | Path) -> list[Path]:
    """The images below ``path``, sorted; hidden files and folders (.ipynb_checkpoints/, .Trash-0/) are not the set's."""
    root = Path(path)
    if problem := missing_folder(root):
        raise MinfmError(f"{path}: {problem}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise MinfmError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return files


def image_batches(source: str | Path, batch_size: int) -> tuple[int, Iterator[np.ndarray]]:
    """(count, iterator of uint8 (B, H, W, 3) batches) for an .npz file or an image folder.

    The count and every check that needs no pixels come first (a folder's: every file's
    header); images are decoded only as the iterator is. A batch holds at most
    ``batch_size`` images and :data:`BATCH_PIXELS` pixels (one image alone always); folder
    images of different sizes go in separate batches (the network resizes each to 299).
    Batches may be read-only (memory-mapped).
    """
    source = Path(source)
    if source.is_dir():
        from minfm_core.images import image_size

        files = folder_images(source)
        for p in files:  # headers only: a non-image at the end fails now, not after the rest's features
            image_size(p)
        return len(files), _folder_batches(files, batch_size)
    images = npz_images(source)
    n, h, w, _ = images.shape
    return n, images.batches(max(1, min(batch_size, BATCH_PIXELS // (h * w))))


def _folder_batches(files: list[Path], batch_size: int) -> Iterator[np.ndarray]:
    from minfm_core.images import read_rgb

    batch: list[np.ndarray] = []
    pixels = 0
    for p in files:
        a = np.asarray(read_rgb(p))
        full = len(batch) == batch_size or pixels + a.shape[0] * a.shape[1] > BATCH_PIXELS
        if batch and (full or a.shape != batch[0].shape):
            yield np.stack(batch)
            batch, pixels = [], 0
        batch.append(a)
        pixels += a.shape[0] * a.shape[1]
    if batch:
        yield np.stack(batch)
