"""Clips on disk, and which frame counts a model can draw.

A clip is a uint8 array ``(F, H, W, 3)``. It is written twice:

- **MP4** (H.264, yuv420p, through PyAV, the ``video`` extra): what players, the demo and
  people downloading samples want. yuv420p halves the colour resolution, so it is not exact;
  odd heights or widths are padded by one repeated row or column, since 4:2:0 needs even sides.
- **animated WebP, lossless**: what HTML pages show in an ``<img>`` (it loops, needs no
  player, and scales up pixelated like a PNG), and the exact copy that ``samples.npz`` is
  rebuilt from. Encoders merge a frame identical to the one before it into a longer
  frame; :func:`read_webp` undoes that from the frame times, so the count stays exact.
  A clip whose frames are *all* identical collapses further: libwebp turns a one-frame
  animation into a still image with no frame times (no encoder option stops it), so the
  frame count is also written into the file's XMP and a still is repeated to that count.

Nothing here imports torch or PyAV at module level: the hub's card renderer reads
:func:`recipe_makes_clips` without either.
"""

from __future__ import annotations

import io
import itertools
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MinfmError
from ..safepath import write_atomic
from ..validators import MAX_FRAMES

#: Frames per second of written clips unless told otherwise (8 fps: 125 ms, a whole number of ms).
DEFAULT_FPS = 8
MAX_FPS = 60
#: H.264 constant rate factor: 12 is far below visible loss; samples are small, size matters little.
MP4_CRF = 12


def require_av():
    """PyAV, imported when a clip is written (it is the optional ``video`` extra)."""
    try:
        import av
    except ImportError:
        raise MinfmError("writing clips as MP4 needs PyAV: pip install 'minfm[video]'") from None
    return av


def check_clip(frames: np.ndarray) -> np.ndarray:
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f"a clip is a non-empty uint8 array (F, H, W, 3), got {frames.dtype} {frames.shape}")
    return np.ascontiguousarray(frames)


def frame_durations_ms(n: int, fps: int) -> list[int]:
    """How long each of n frames shows, in whole milliseconds (WebP and APNG count time in ms).

    Differences of rounded start times rather than one rounded duration: no drift over a long
    clip, and a merged run of frames keeps the start of its first frame, which is how
    read_webp finds every frame again.
    """
    starts = [round(i * 1000 / _check_fps(fps)) for i in range(n + 1)]
    return [b - a for a, b in itertools.pairwise(starts)]


def _check_fps(fps: int) -> int:
    if isinstance(fps, bool) or not isinstance(fps, int) or not 1 <= fps <= MAX_FPS:
        raise MinfmError(f"fps: expected a whole number in 1..{MAX_FPS}, got {fps!r}")
    return fps


#: XMP packet carrying the clip's frame count. libwebp writes a clip of identical frames as a
#: single still image (its animation encoder merges repeats, then converts a one-frame result,
#: and neither step can be switched off), and a still has no frame times to split it by.
_XMP_FRAMES = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
               '<rdf:Description xmlns:minfm="https://github.com/minfm/ns/1.0/" minfm:frames="{n}"/>'
               '</rdf:RDF></x:xmpmeta>')
_XMP_FRAMES_RE = re.compile(rb'minfm:frames="(\d{1,7})"')


def encode_webp(frames: np.ndarray, fps: int = DEFAULT_FPS) -> bytes:
    """An endlessly looping lossless animated WebP (a still WebP when every frame is the same)."""
    from PIL import Image

    frames = check_clip(frames)
    pics = [Image.fromarray(f, "RGB") for f in frames]
    buf = io.BytesIO()
    pics[0].save(buf, format="WEBP", save_all=True, append_images=pics[1:], duration=frame_durations_ms(len(pics), fps),
                 loop=0, lossless=True, quality=100, method=4, xmp=_XMP_FRAMES.format(n=len(pics)).encode())
    return buf.getvalue()


def _recorded_frames(path: Path | str, xmp: Any) -> int | None:
    """The frame count encode_webp wrote into the XMP, or None when there is none (another writer)."""
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8", "replace")
    m = _XMP_FRAMES_RE.search(xmp) if isinstance(xmp, bytes) else None
    if m is None:
        return None
    n = int(m.group(1))
    # The file may come from anywhere: a huge count would repeat one frame into all memory.
    if not 1 <= n <= MAX_FRAMES:
        raise MinfmError(f"{path}: its WebP metadata says {n} frames: expected 1..{MAX_FRAMES}")
    return n


def read_webp(path: Path | str, fps: int = DEFAULT_FPS) -> np.ndarray:
    """The clip :func:`encode_webp` wrote at ``fps``, frame for frame, as (F, H, W, 3) uint8."""
    from PIL import Image, ImageSequence

    out: list[np.ndarray] = []
    step = 1000 / _check_fps(fps)
    with Image.open(path) as im:
        recorded = _recorded_frames(path, im.info.get("xmp"))
        animated = bool(getattr(im, "is_animated", False))
        for frame in ImageSequence.Iterator(im):
            arr = np.asarray(frame.convert("RGB"))  # decoding the frame is what fills in its times
            start, dur = int(frame.info.get("timestamp", 0)), int(frame.info.get("duration", step))
            # Every source frame whose start falls inside this (possibly merged) frame.
            first, end = len(out), start + dur
            out.append(arr)
            while round((first + 1) * step) < end:
                out.append(arr)
                first += 1
    if not animated and len(out) == 1 and recorded is not None:
        # A still clip that libwebp stored as one image: only the XMP knows how many frames it had.
        out *= recorded
    return np.stack(out)


def _even(frames: np.ndarray) -> np.ndarray:
    """Pad an odd height or width by repeating the last row/column (yuv420p needs even sides)."""
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return frames


def _mux_mp4(filename: str, frames: np.ndarray, fps: int, crf: int) -> None:
    av = require_av()
    frames = _even(check_clip(frames))
    with av.open(filename, "w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=_check_fps(fps))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        # swscale converts RGB with BT.601 coefficients; say so in the stream, or players
        # that assume BT.709 shift the colours.
        stream.options = {"crf": str(crf), "preset": "medium",
                          "x264-params": "colorprim=smpte170m:transfer=smpte170m:colormatrix=smpte170m"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)


def write_mp4(path: Path, frames: np.ndarray, fps: int = DEFAULT_FPS, crf: int = MP4_CRF) -> None:
    """H.264 in MP4, yuv420p (what every browser plays), written whole or not at all."""
    path = Path(path)
    # The muxer rewrites the file's head at the end (faststart: playable while it downloads),
    # so it needs a real file: encode next to the target, then rename into place.
    write_atomic(path, lambda tmp: _mux_mp4(str(tmp), frames, fps, crf))


def encode_mp4(frames: np.ndarray, fps: int = DEFAULT_FPS, crf: int = MP4_CRF) -> bytes:
    """The bytes :func:`write_mp4` would write (for servers that store files their own way)."""
    with tempfile.TemporaryDirectory(prefix="minfm-mp4-") as tmp:
        name = os.path.join(tmp, "clip.mp4")
        _mux_mp4(name, frames, fps, crf)
        with open(name, "rb") as f:
            return f.read()


def read_mp4(path: Path | str) -> tuple[np.ndarray, float]:
    """Every frame of an MP4 as (F, H, W, 3) uint8, and its frame rate."""
    av = require_av()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return np.stack(frames), float(stream.average_rate)


# ---- which frame counts a model can draw ---------------------------------------------------


def frame_rule(resolved) -> tuple[int, int]:
    """(VAE time compression, patch frames) of a resolved recipe: what decides valid frame counts."""
    cf = int(resolved.config("model.vae").compression[0])
    patch = getattr(resolved.config("model.patchifier"), "patch_size", (1, 1, 1))
    return cf, int(patch[0])


def frames_ok(frames: int, cf: int, pf: int) -> bool:
    """Whether a clip of ``frames`` frames becomes whole latent frames and whole patches.

    A VAE compressing time ``cf``-fold keeps the first frame apart (as Wan and most causal
    video VAEs do), so it takes ``1 + cf * k`` frames; the patchifier then cuts latent
    frames ``pf`` at a time.
    """
    if frames < 1:
        return False
    if cf > 1:
        if (frames - 1) % cf:
            return False
        latent = 1 + (frames - 1) // cf
    else:
        latent = frames
    return latent % pf == 0


def valid_frames(cf: int, pf: int, count: int = 5, upto: int = MAX_FRAMES) -> list[int]:
    return [f for f in range(1, upto + 1) if frames_ok(f, cf, pf)][:count]


def check_frames(frames: int, cf: int, pf: int, *, what: str) -> int:
    """``frames`` if this model can draw it, else a one-line MinfmError naming ``what`` and the valid counts."""
    if not 1 <= frames <= MAX_FRAMES:
        raise MinfmError(f"{what}: {frames} frames: expected 1..{MAX_FRAMES}")
    if not frames_ok(frames, cf, pf):
        why = []
        if cf > 1:
            why.append(f"its VAE keeps the first frame and compresses time {cf}x")
        if pf > 1:
            why.append(f"its patches span {pf} latent frames")
        shown = valid_frames(cf, pf)
        raise MinfmError(f"{what}: {frames} frames: this model cannot draw that ({' and '.join(why)}); "
                         f"valid frame counts are {', '.join(map(str, shown))}, ...")
    return frames


# ---- which recipes describe a video model --------------------------------------------------


def _positive_frames(node: Any, depth: int = 0) -> bool:
    if depth > 8:  # a recipe's data table is shallow; a deeper one is not ours to walk
        return False
    if isinstance(node, Mapping):
        f = node.get("frames")
        if isinstance(f, int) and not isinstance(f, bool) and f > 1:
            return True
        return any(_positive_frames(v, depth + 1) for v in node.values() if isinstance(v, (Mapping, list, tuple)))
    if isinstance(node, (list, tuple)):
        return any(_positive_frames(v, depth + 1) for v in node if isinstance(v, (Mapping, list, tuple)))
    return False


def recipe_makes_clips(recipe: Mapping[str, Any]) -> bool:
    """The one rule for "this is a video model", read from a recipe as a plain dict.

    True when the recipe samples clips (``sample.size`` has more than one frame) or trains
    on them (a ``frames`` value above 1 anywhere in its ``[data]`` table, dataset mixtures
    included). Used by the Hub card (``pipeline_tag``) and the demo (the frame control).
    """
    sample = recipe.get("sample")
    size = sample.get("size") if isinstance(sample, Mapping) else None
    if isinstance(size, (list, tuple)) and len(size) == 3 and isinstance(size[0], int) and size[0] > 1:
        return True
    return _positive_frames(recipe.get("data"))
