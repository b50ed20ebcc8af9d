"""Reading image files that come from outside (datasets, folders to evaluate) as RGB.

One reader so that every such file gets the same treatment: a missing, truncated or
undecodable file, and one larger than PIL's decompression-bomb limit (``MAX_IMAGE_PIXELS``,
about 89 M pixels: a few-KB PNG can declare 20,000 x 20,000 pixels, gigabytes once decoded),
is a one-line error naming the file, never a traceback.
"""

from __future__ import annotations

import contextlib
import os
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import MinfmError, first_line, os_error_line

if TYPE_CHECKING:
    from PIL.Image import Image


def require_regular_file(path: str | Path) -> None:
    """A MinfmError unless ``path`` is a regular file (a link to one counts): a FIFO named
    ``x.png`` would block its reader forever, a device never ends."""
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError as exc:
        raise MinfmError(f"{path}: {os_error_line(exc)}") from None
    if not regular:
        raise MinfmError(f"{path}: not a regular file")


def _to_rgb(im: Image) -> Image:
    """RGB as the picture is meant to be seen: turned upright by its EXIF orientation (a phone
    photo stored sideways), and with 16-bit or float samples scaled into 8 bits rather than
    clipped (PIL's convert clips a 16-bit mid-grey of 32768 to white), and transparent
    pixels laid on white (PIL's convert drops alpha and keeps whatever colour a transparent
    pixel happens to store: often black, sometimes noise)."""
    import numpy as np
    from PIL import Image as PILImage
    from PIL import ImageOps

    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        raw = np.asarray(im)
        key = im.info.get("transparency")
        # A 16-bit grey PNG's tRNS names the one transparent sample value: the new 8-bit
        # image carries no info, so its pixels would have come out black, not on white.
        alpha = np.where(raw == key, 0, 255).astype(np.uint8) if isinstance(key, int) and im.mode != "F" else None
        # float32, scaled in place: float64 and a temporary for each step held five times an
        # 8-bit picture's memory (2.9 GB for a 9000 x 9900 16-bit PNG of 194 KB)
        a = raw.astype(np.float32)
        del raw
        finite = np.isfinite(a)
        if not finite.all():
            if not finite.any():  # nothing to show: it was read as black
                raise ValueError("no finite samples")
            a[~finite] = 0.0
        del finite
        peak = float(a.max()) if a.size else 0.0
        if im.mode == "F":
            scale = 255.0 if peak <= 1.0 else 1.0  # [0, 1] floats, else 8-bit values
        else:  # 16-bit samples ("I" holds them too once past 255), else 8-bit values
            scale = 255.0 / 65535.0 if im.mode.startswith("I;16") or peak > 255 else 1.0
        a *= scale
        np.clip(a, 0, 255, out=a)
        np.rint(a, out=a)
        grey = a.astype(np.uint8)
        del a
        im = PILImage.fromarray(grey if alpha is None else np.stack([grey, alpha], -1), mode="L" if alpha is None else "LA")
    if im.mode == "LAB":
        im = _lab_to_rgb(im)
    if im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
        im.alpha_composite(rgba)
    return im.convert("RGB")


def _lab_to_rgb(im: Image) -> Image:
    """A CIELab picture (a TIFF's photometric CIELab) in sRGB, through a colour transform: a
    channel copy would read L, a and b as red, green and blue."""
    try:
        from PIL import ImageCms
    except ImportError:  # Pillow built without littlecms
        raise ValueError("a CIELab image, and this Pillow has no ImageCms (littlecms) to convert it to RGB") from None
    transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
    return ImageCms.applyTransform(im, transform)


@contextlib.contextmanager
def _opened(path: str | Path) -> Iterator[Image]:
    """PIL's lazy open (the header read, the size held to the bomb limit); what PIL raises
    there or in the body, one line naming the file."""
    from PIL import Image as PILImage

    require_regular_file(path)
    try:
        with open(path, "rb") as fp:  # ours to close: PIL leaves it open when the check below raises
            with warnings.catch_warnings():
                # PIL only warns between its limit (MAX_IMAGE_PIXELS, 89 M pixels) and twice
                # that, in its own format naming no file, and decodes: the limit that .npz
                # images and video frames are held to, so it is one for every picture too.
                warnings.simplefilter("error", PILImage.DecompressionBombWarning)
                opened = PILImage.open(fp)
            with opened as im:
                yield im
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as exc:
        raise MinfmError(f"{path}: image too large to decode safely ({first_line(exc, 120)})") from None
    except PILImage.UnidentifiedImageError:  # (it names the file object it was given)
        raise MinfmError(f"{path}: not a readable image (cannot identify image file {os.fspath(path)!r})") from None
    except (OSError, ValueError, SyntaxError) as exc:  # PIL raises SyntaxError for some malformed headers
        raise MinfmError(f"{path}: not a readable image ({first_line(exc, 200)})") from None


def read_rgb(path: str | Path) -> Image:
    """The image at ``path``, decoded and converted to RGB."""
    with _opened(path) as im:
        return _to_rgb(im)


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` from the file's header alone: a cheap first check of a large set
    (a file that is no image, or too large, is refused before hours of work on the others;
    damage past the header shows only when :func:`read_rgb` decodes it)."""
    with _opened(path) as im:
        return im.size
