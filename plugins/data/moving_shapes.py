"""``moving_shapes``: clips of one coloured shape moving left, right, up or down, or standing still.

The text-to-video twin of ``shapes`` (same palette, shapes and drawing code): every clip is a
pure function of (seed, split, index), captioned "a red circle moving left" or "a red circle
standing still". A moving shape crosses ``travel`` of the side it moves along at constant speed,
its whole path on the canvas. :func:`classify_clip` reads colour, shape and motion back from a
clip (generated ones included): that is how ``bench/video_fidelity.py`` scores a video model.
"""

from __future__ import annotations

import attrs
import numpy as np
import torch

from .configs import STILL_BELOW, MovingShapesConfig
from .images import to_tensor
from .latents import CachedLatentsDataset
from .shapes import BACKGROUNDS, PALETTE, SCALE_RADIUS, ShapeSpec, SyntheticSplit, _nearest, classify_image, draw

#: Unit step of each motion in image coordinates (x right, y down).
STEP = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0), "still": (0.0, 0.0)}
#: STILL_BELOW (configs.py): a clip whose fitted displacement stays under this fraction of the side
#: reads as "still". The dataset's moving shapes cover at least that much (its config refuses less).


def caption(colour: str, shape: str, motion: str) -> str:
    """The dataset's caption for one (colour, shape, motion)."""
    return f"a {colour} {shape} standing still" if motion == "still" else f"a {colour} {shape} moving {motion}"


@attrs.frozen
class ClipSpec:
    """Everything about one clip; its frames are drawn from it."""

    colour: str
    shape: str
    motion: str
    background: str
    scale: str
    frames: int
    height: int
    width: int
    path: tuple[tuple[float, float], ...]  # shape centre (x, y) per frame, in pixels
    radius: float
    caption: str
    label: int

    def frame(self, f: int) -> ShapeSpec:
        cx, cy = self.path[f]
        return ShapeSpec(colour=self.colour, shape=self.shape, background=self.background, scale=self.scale,
                         height=self.height, width=self.width, cx=cx, cy=cy, radius=self.radius,
                         caption=self.caption, label=self.label)


class MovingShapesDataset(SyntheticSplit):
    name, unit = "moving_shapes", "clips"

    def short_prompts(self) -> list[str]:
        """Every caption this dataset draws (e.g. for a sample gallery or a fidelity bench)."""
        return [caption(c, s, m) for m in self.cfg.motions for c in self.cfg.colours for s in self.cfg.shapes]

    def spec(self, index: int) -> ClipSpec:
        """The attributes of clip ``index`` (cheap: nothing is drawn)."""
        cfg = self.cfg
        # 7: a stream apart from `shapes` (keys (seed, split, index)), so mixing the two never
        # pairs an image with the clip of the same draw.
        rng = self._rng(index, 7)
        height, width = (int(v) for v in cfg.sizes[rng.integers(len(cfg.sizes))])
        ci, si, mi = (int(rng.integers(n)) for n in (len(cfg.colours), len(cfg.shapes), len(cfg.motions)))
        colour, shape, motion = cfg.colours[ci], cfg.shapes[si], cfg.motions[mi]
        background = cfg.backgrounds[rng.integers(len(cfg.backgrounds))]
        scale = cfg.scales[rng.integers(len(cfg.scales))]
        radius = SCALE_RADIUS[scale] * min(height, width) * rng.uniform(0.9, 1.1)
        reach = radius * (1.15 if shape == "triangle" else 1.0) + 1  # the whole shape stays on the canvas
        dx, dy = STEP[motion]
        along_x = dx != 0
        side, across = (width, height) if along_x else (height, width)
        dist = 0.0 if motion == "still" else max(0.0, min(cfg.travel * side, side - 2 * reach))
        # Start anywhere the whole path fits (a still shape: anywhere it fits), then move at constant speed.
        lo, hi = min(reach, side / 2), max(side - reach - dist, side / 2 - dist)
        start = float(rng.uniform(lo, max(lo, hi)))
        if (dx + dy) < 0:  # moving left/up: start at the far end
            start += dist
        jit = float(rng.uniform(-cfg.jitter, cfg.jitter))
        off = float(np.clip(across / 2 + jit * across, min(reach, across / 2), max(across - reach, across / 2)))
        sign = dx + dy
        path = []
        for f in range(cfg.frames):
            a = start + sign * dist * f / (cfg.frames - 1)
            path.append((a, off) if along_x else (off, a))
        label = (ci * len(cfg.shapes) + si) * len(cfg.motions) + mi
        return ClipSpec(colour=colour, shape=shape, motion=motion, background=background, scale=scale,
                        frames=cfg.frames, height=height, width=width, path=tuple(path), radius=float(radius),
                        caption=caption(colour, shape, motion), label=label)

    def prompt(self, index: int) -> str:
        return self.spec(int(index)).caption

    def __getitem__(self, index: int) -> dict:
        spec = self.spec(int(index))
        return {"image": draw_clip(spec), "prompt": spec.caption, "label": spec.label}


def draw_clip(spec: ClipSpec) -> torch.Tensor:
    """The clip as a float tensor (3, F, H, W) in [-1, 1]."""
    return torch.cat([to_tensor(draw(spec.frame(f))) for f in range(spec.frames)], dim=1)


def _as_frames(clip) -> np.ndarray:
    """(F, H, W, 3) float RGB in [0, 255] from a tensor (3, F, H, W) in [-1, 1] or uint8 (F, H, W, 3)."""
    if isinstance(clip, torch.Tensor):
        t = clip.detach().float().cpu()
        if t.dim() != 4 or t.shape[0] != 3:
            raise ValueError(f"classify_clip: expected a (3, F, H, W) tensor, got {tuple(t.shape)}")
        return ((t.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 3, 0).numpy()
    arr = np.asarray(clip)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"classify_clip: expected a (F, H, W, 3) array, got {arr.shape}")
    return arr.astype(np.float32)


def classify_clip(clip) -> dict[str, str | None]:
    """Colour, shape, motion and background of a (possibly generated) moving-shapes clip.

    ``clip``: a tensor (3, F, H, W) in [-1, 1] or a uint8 array (F, H, W, 3). The background is
    the median border colour over all frames; the shape is every pixel far from it. Colour: the
    palette entry nearest to the median shape pixel of the whole clip; kind: the majority of the
    per-frame reads of :func:`minfm_plugins.data.shapes.classify_image`; motion: a least-squares
    line through the per-frame centroids gives the displacement over the clip, "still" when it
    is under ``STILL_BELOW`` of the side, else the direction of its larger component (x right,
    y down). ``None`` for what cannot be read (no shape found; fewer than two frames with one).
    """
    rgb = _as_frames(clip)
    f, h, w, _ = rgb.shape
    border = np.concatenate([rgb[:, 0].reshape(-1, 3), rgb[:, -1].reshape(-1, 3),
                             rgb[:, :, 0].reshape(-1, 3), rgb[:, :, -1].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    mask = np.linalg.norm(rgb - bg, axis=-1) > 90
    background = _nearest(bg, BACKGROUNDS)
    enough = mask.reshape(f, -1).sum(1) >= max(4, 0.01 * h * w)
    if not enough.any():
        return {"colour": None, "shape": None, "motion": None, "background": background}
    colour = _nearest(np.median(rgb[mask], axis=0), PALETTE)
    from PIL import Image

    kinds = [classify_image(Image.fromarray(rgb[i].round().clip(0, 255).astype(np.uint8)))["shape"]
             for i in np.flatnonzero(enough)]
    kinds = [k for k in kinds if k is not None]
    shape = max(set(kinds), key=kinds.count) if kinds else None
    motion = None
    frames = np.flatnonzero(enough)
    if len(frames) >= 2:
        ys, xs = np.mgrid[0:h, 0:w]
        m = mask[frames].astype(np.float64)
        n = m.sum((1, 2))
        cx, cy = (m * xs).sum((1, 2)) / n, (m * ys).sum((1, 2)) / n
        # Displacement over the whole clip from the fitted slope: robust to a frame or two of noise.
        dx = np.polyfit(frames, cx, 1)[0] * (f - 1) / w
        dy = np.polyfit(frames, cy, 1)[0] * (f - 1) / h
        if max(abs(dx), abs(dy)) < STILL_BELOW:
            motion = "still"
        elif abs(dx) >= abs(dy):
            motion = "right" if dx > 0 else "left"
        else:
            motion = "down" if dy > 0 else "up"
    return {"colour": colour, "shape": shape, "motion": motion, "background": background}


def build(cfg: MovingShapesConfig, *, split: str = "train") -> torch.utils.data.Dataset:
    if cfg.use_cached_latents:
        return CachedLatentsDataset("moving_shapes", cfg.latents_dir, split)
    return MovingShapesDataset(cfg, split)


__all__ = ["STILL_BELOW", "ClipSpec", "MovingShapesDataset", "build", "caption", "classify_clip", "draw_clip"]
