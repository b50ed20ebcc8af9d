"""``video_folder``: a folder of video clips with ``.txt`` caption sidecars, read with PyAV.

``cat.mp4`` + ``cat.txt`` is one item (any container FFmpeg reads: mp4, webm, mkv, mov, avi).
A clip is ``frames`` frames taken every ``stride``-th frame of the video, from the first frame or
from a start drawn per (seed, epoch, index); each frame is resized (aspect kept) as it is decoded
to about ``max_pixels`` pixels and center-cropped to multiples of ``size_multiple``, like
``image_folder`` does for pictures. A video too short for ``(frames - 1) * stride + 1`` frames is an error naming
the file and the two settings. Splits: ``root/train`` and ``root/val`` when they exist, else a
stable hash of each path holds out ``val_fraction``; with one of them only, the other split is
every clip outside it. PyAV is the ``video`` extra
(``pip install 'minfm[video]'``); it is imported when a clip is read.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from minfm_core.errors import MinfmError, MinfmWarning, first_line
from minfm_core.images import require_regular_file
from minfm_core.validators import MAX_SIDE

from .configs import VideoFolderConfig
from .image_folder import _hold_out, open_root, read_caption, split_folders, walk
from .images import Flips, budget_size, resize_and_center_crop, rng_for, to_tensor
from .latents import CachedLatentsDataset

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".gif")


def _av():
    try:
        import av
    except ImportError:
        raise MinfmError("video_folder: reading videos needs PyAV: pip install 'minfm[video]'") from None
    return av


def _check_size(path: Path, w: int, h: int) -> None:
    from PIL import Image

    if max(w, h) > MAX_SIDE:
        raise MinfmError(f"video_folder: {path} has {w}x{h} frames; at most {MAX_SIDE} pixels a side are read")
    limit = Image.MAX_IMAGE_PIXELS  # where PIL starts to suspect a decompression bomb (None: turned off)
    if limit is not None and w * h > limit:
        raise MinfmError(f"video_folder: {path} has {w}x{h} frames ({w * h:,} pixels); at most {int(limit):,} "
                         "pixels a frame are read (PIL's Image.MAX_IMAGE_PIXELS)")


@contextlib.contextmanager
def _first_video_stream(path: Path):
    """(container, stream) of ``path``'s first video stream; whatever goes wrong reading it inside
    the block (not a video, no video stream, undecodable data) is one error naming the file.

    Frames wider or taller than MAX_SIDE, or of more pixels than PIL's decompression-bomb bound
    for pictures (``Image.MAX_IMAGE_PIXELS``), are refused before they are converted (and, where the container's header
    gives the size, before any is decoded): a small file can declare 65,535 x 65,535 frames,
    12 GB each once decoded.
    """
    av = _av()
    try:
        require_regular_file(path)  # a FIFO named x.mp4 would block av.open forever
    except MinfmError as exc:  # named by the dataset, as every other fault of the file is
        raise MinfmError(f"video_folder: {exc}") from None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MinfmError(f"video_folder: {path} has no video stream")
            stream = container.streams.video[0]
            _check_size(path, stream.codec_context.width, stream.codec_context.height)
            yield container, stream
    except (av.error.FFmpegError, IndexError, ValueError) as exc:
        raise MinfmError(f"video_folder: {path}: not a readable video ({first_line(exc, 200)})") from None


def count_frames(path: Path) -> int:
    """Frames in the first video stream: the container's count, else counted by demuxing (no decoding)."""
    with _first_video_stream(path) as (container, stream):
        return _frame_count(container, stream)


def _frame_count(container, stream) -> int:
    if stream.frames:
        return int(stream.frames)
    return sum(1 for packet in container.demux(stream) if packet.size)


def _upright(frame):
    """PIL's transpose that shows the frame as a player does, or None: a phone clip is stored
    sideways with a display matrix (PyAV's ``frame.rotation``: degrees counter-clockwise, as
    FFmpeg turns it on playback), as a phone photo is with its EXIF orientation, which
    pictures are turned upright by. Quarter turns only (flips and odd angles are kept as
    stored, as FFmpeg's own autorotate keeps them)."""
    from PIL import Image

    return {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180,
            270: Image.Transpose.ROTATE_270}.get(round(frame.rotation) % 360)


def _decode(path: Path, container, stream, indices: list[int], budget: tuple[int, int] | None = None) -> list:
    from PIL import Image

    want = set(indices)
    out = {}
    size = None
    stream.thread_type = "AUTO"
    for i, frame in enumerate(container.decode(stream)):
        _check_size(path, frame.width, frame.height)  # some headers (GIF) leave the size to the frames
        if i in want:
            turn = _upright(frame)
            sideways = turn in (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270)
            if budget is None:
                image = frame.to_image()
            else:
                # Each frame is made small as it comes: keeping them all at full size for a resize
                # afterwards cost 2.6 GB for a 5-frame 8192 x 8192 GIF. The size is the upright one.
                shown = (frame.height, frame.width) if sideways else (frame.width, frame.height)
                size = size or budget_size(*shown, *budget)
                image = _shrunk_image(frame, *(size[::-1] if sideways else size))
            if turn is not None:
                image = image.transpose(turn)
            out[i] = image if budget is None else resize_and_center_crop(image, *size)
            if len(out) == len(want):
                break
    return [out[i] for i in indices if i in out]


def _shrunk_image(frame, width: int, height: int):
    """The frame as an RGB PIL image, scaled down by FFmpeg while it converts (box filter) to twice
    what a (width, height) crop needs where it is larger: PyAV's full-size conversion holds about
    four RGB copies of the frame (840 MB for one 8192 x 8192 frame). resize_and_center_crop then
    makes the crop from that, as it does for pictures."""
    r = 2 * max(width / frame.width, height / frame.height)
    if r >= 1:
        return frame.to_image()
    return frame.to_image(width=max(1, round(frame.width * r)), height=max(1, round(frame.height * r)),
                          interpolation="AREA")


def read_frames(path: Path, indices: list[int], budget: tuple[int, int] | None = None):
    """The PIL frames at ``indices`` (sorted, distinct) of the first video stream, decoded in one pass.

    With ``budget = (max_pixels, multiple)`` each frame is resized (aspect kept) and center-cropped
    as it is decoded, to the size :func:`budget_size` gives the first one (what a dataset item holds).
    """
    with _first_video_stream(path) as (container, stream):
        return _decode(path, container, stream, indices, budget)


def read_clip(path: Path, pick, budget: tuple[int, int] | None = None) -> tuple[list[int], list]:
    """``(indices, frames)`` with ``indices = pick(frame_count)``, opening the file once where the
    container's header gives the frame count (mp4, mkv, webm...). Without one, counting demuxes the
    stream to its end, and the file is opened again to decode. ``budget``: as for :func:`read_frames`."""
    with _first_video_stream(path) as (container, stream):
        if stream.frames:
            indices = pick(int(stream.frames))
            return indices, _decode(path, container, stream, indices, budget)
        indices = pick(_frame_count(container, stream))
    return indices, read_frames(path, indices, budget)


class VideoFolderDataset(torch.utils.data.Dataset):
    def __init__(self, cfg: VideoFolderConfig, split: str = "train") -> None:
        root, confine, split_dir = open_root("video_folder", cfg.root, split, "videos")
        self.cfg = cfg
        self.split = split
        self.flips = Flips(cfg.p_flip, cfg.seed, split)
        self.epoch = 0
        if split_dir is not None:
            items = _scan(split_dir, confine)
        else:
            items = _hold_out(_scan(root, confine, split_folders(root)), root, split, cfg.val_fraction)
        if not items:
            raise MinfmError(f"video_folder: no captioned videos for split {split!r} under {str(root)!r}")
        self.items = items  # [(path, caption)] in a fixed order

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Clip starts and flips depend on (seed, epoch, index)."""
        self.epoch = self.flips.epoch = int(epoch)

    def prompt(self, index: int) -> str:
        return self.items[index][1]

    def frame_indices(self, index: int, available: int) -> list[int]:
        """Which frames of the video clip ``index`` reads (``available`` frames in the video)."""
        cfg = self.cfg
        span = (cfg.frames - 1) * cfg.stride + 1
        if available < span:
            # No recipe path reaches a dataset (a mix's source is data.sources[k].dataset): the
            # settings go by their own names.
            raise MinfmError(
                f"video_folder: {self.items[index][0]} has {available} frame{'s' * (available != 1)}; "
                f"frames = {cfg.frames} at stride = {cfg.stride} needs {span}: lower one of them"
            )
        start = 0
        if cfg.clip_start == "random" and self.split == "train" and available > span:
            start = int(rng_for(cfg.seed, 0x51, self.epoch, index).integers(available - span + 1))
        return [start + k * cfg.stride for k in range(cfg.frames)]

    def __getitem__(self, index: int) -> dict:
        path, caption = self.items[index]
        counted = []  # the container's frame count, for the message below

        def pick(available: int) -> list[int]:
            counted.append(available)
            return self.frame_indices(index, available)

        indices, frames = read_clip(path, pick, budget=(self.cfg.max_pixels, self.cfg.size_multiple))
        if len(frames) < len(indices):  # the container over-counted; frames come in order, so the
            # first one missing is where the video ends (numbers from 1, as the count is)
            raise MinfmError(f"video_folder: {path} decodes fewer frames than the {counted[0]} its container says: "
                             f"it ends before frame {indices[len(frames)] + 1}, and this clip needs frame "
                             f"{indices[-1] + 1}")
        clip = torch.cat([to_tensor(f) for f in frames], dim=1)
        if self.flips(index):
            clip = clip.flip(-1)
        return {"image": clip, "prompt": caption}


def _scan(folder: Path, confine: Path | None = None, exclude: list[Path] = ()) -> list[tuple[Path, str]]:
    items, missing = [], []
    files, dangling = walk(folder, confine, "video_folder", exclude)
    videos = [p for p in files if p.suffix.lower() in VIDEO_SUFFIXES]
    broken = sorted(dangling.intersection(videos))
    if broken:  # found now, not by the loader at the first batch that holds it
        raise MinfmError(f"video_folder: {broken[0]}: a symlink that leads nowhere (its target is missing, or a loop)")
    for path in videos:
        sidecar = path.with_suffix(".txt")
        if sidecar.is_file():
            items.append((path, read_caption(sidecar, "video_folder")))
        else:
            missing.append(path.name)
    if missing and not items:
        raise MinfmError(
            f"video_folder: {len(missing)} videos under {str(folder)!r} have no caption "
            f"(no .txt sidecar such as {missing[0]!r} -> {Path(missing[0]).stem + '.txt'!r})"
        )
    if missing:
        import warnings

        warnings.warn(f"video_folder: skipping {len(missing)} videos without a .txt caption under {str(folder)!r}",
                      MinfmWarning)
    return items


def build(cfg: VideoFolderConfig, *, split: str = "train") -> torch.utils.data.Dataset:
    if cfg.use_cached_latents:
        return CachedLatentsDataset("video_folder", cfg.latents_dir, split, flips=Flips(cfg.p_flip, cfg.seed, split))
    return VideoFolderDataset(cfg, split)


__all__ = ["VIDEO_SUFFIXES", "VideoFolderDataset", "build", "count_frames", "read_clip", "read_frames"]
