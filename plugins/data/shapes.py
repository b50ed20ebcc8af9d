"""``shapes``: coloured shapes on plain backgrounds, drawn on the fly, captioned by their attributes.

Every sample is a pure function of (seed, split, index): nothing is downloaded or stored, and
all processes and workers see the same picture for the same index. Colours are saturated and
shapes large so a tiny model learns "a {colour} {shape}" in a few hundred CPU steps.
:func:`classify_image` reads colour and shape back from a picture (generated ones included),
which is how the quickstart measures prompt fidelity. With ``use_cached_latents`` the items are
the latents ``minfm cache latents`` wrote (latents.py) instead.
"""

from __future__ import annotations

import math

import attrs
import numpy as np
import torch
from PIL import Image, ImageDraw

from minfm_core import protocols
from minfm_core.errors import MinfmError

from .configs import SCALE_RADIUS, SHAPE_BACKGROUNDS, SHAPE_COLOURS, SHAPE_KINDS, ShapesConfig
from .images import rng_for, to_tensor
from .latents import CachedLatentsDataset

#: RGB of each colour name: saturated and far apart, so the nearest name is unambiguous.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 20, 20),
    "green": (20, 180, 20),
    "blue": (20, 40, 230),
    "yellow": (245, 215, 0),
    "orange": (255, 130, 0),
    "purple": (120, 20, 170),
    "cyan": (0, 200, 220),
    "magenta": (230, 0, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
_SPLIT_CODE = {"train": 0, "val": 1}
_SUPERSAMPLE = 4  # draw large, then box-filter down: clean anti-aliased edges
assert set(PALETTE) == set(SHAPE_COLOURS) and set(BACKGROUNDS) == set(SHAPE_BACKGROUNDS)


@attrs.frozen
class ShapeSpec:
    """Everything about one sample; the picture and caption are drawn from it."""

    colour: str
    shape: str
    background: str
    scale: str
    height: int
    width: int
    cx: float  # centre in pixels (x right, y down)
    cy: float
    radius: float
    caption: str
    label: int


class SyntheticSplit(torch.utils.data.Dataset, protocols.Dataset):  # protocols: set_epoch / prompt defaults
    """A drawn split: ``cfg.num_samples`` items (train) or ``cfg.num_val_samples`` (val), each a
    pure function of (seed, split, index); subclasses name themselves and draw an item."""

    #: For errors: "<name>: index 9 out of range for 8 <unit>".
    name: str
    unit: str

    def __init__(self, cfg, split: str = "train") -> None:
        if split not in _SPLIT_CODE:
            raise MinfmError(f"{self.name}: unknown split {split!r}; expected 'train' or 'val'")
        self.cfg = cfg
        self.split = split
        self._len = cfg.num_samples if split == "train" else cfg.num_val_samples

    def __len__(self) -> int:
        return self._len

    def _rng(self, index: int, *stream: int) -> np.random.Generator:
        """The generator of item ``index`` (``stream``: keys that keep another dataset's draws apart)."""
        if not 0 <= index < self._len:
            raise IndexError(f"{self.name}: index {index} out of range for {self._len} {self.unit}")
        return rng_for(self.cfg.seed, *stream, _SPLIT_CODE[self.split], index)


class ShapesDataset(SyntheticSplit):
    name, unit = "shapes", "samples"

    def short_prompts(self) -> list[str]:
        """Every "a {colour} {shape}" this dataset draws (e.g. for a sample gallery)."""
        return [f"a {c} {s}" for c in self.cfg.colours for s in self.cfg.shapes]

    def spec(self, index: int) -> ShapeSpec:
        """The attributes of sample ``index`` (cheap: nothing is drawn)."""
        cfg = self.cfg
        rng = self._rng(index)
        height, width = cfg.sizes[rng.integers(len(cfg.sizes))]
        ci = int(rng.integers(len(cfg.colours)))
        si = int(rng.integers(len(cfg.shapes)))
        colour, shape = cfg.colours[ci], cfg.shapes[si]
        background = cfg.backgrounds[rng.integers(len(cfg.backgrounds))]
        scale = cfg.scales[rng.integers(len(cfg.scales))]
        radius = SCALE_RADIUS[scale] * min(height, width) * rng.uniform(0.9, 1.1)
        reach = radius * (1.15 if shape == "triangle" else 1.0) + 1  # keep the whole shape on the canvas
        jx, jy = rng.uniform(-cfg.jitter, cfg.jitter, size=2)
        cx = float(np.clip(width / 2 + jx * width, min(reach, width / 2), max(width - reach, width / 2)))
        cy = float(np.clip(height / 2 + jy * height, min(reach, height / 2), max(height - reach, height / 2)))
        long = cfg.caption == "long" or (cfg.caption == "mixed" and rng.random() < 0.5)
        caption = f"a {scale} {colour} {shape} on a {background} background" if long else f"a {colour} {shape}"
        return ShapeSpec(
            colour=colour, shape=shape, background=background, scale=scale, height=int(height), width=int(width),
            cx=cx, cy=cy, radius=float(radius), caption=caption, label=ci * len(cfg.shapes) + si,
        )

    def __getitem__(self, index: int) -> dict:
        spec = self.spec(int(index))
        return {"image": to_tensor(draw(spec)), "prompt": spec.caption, "label": spec.label}


def draw(spec: ShapeSpec) -> Image.Image:
    """Render a :class:`ShapeSpec` as an RGB PIL image of its (width, height)."""
    s = _SUPERSAMPLE
    image = Image.new("RGB", (spec.width * s, spec.height * s), BACKGROUNDS[spec.background])
    pen = ImageDraw.Draw(image)
    cx, cy, r, fill = spec.cx * s, spec.cy * s, spec.radius * s, PALETTE[spec.colour]
    if spec.shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif spec.shape == "square":
        h = r * 0.9  # a little smaller than the circle's box so both look equally big
        pen.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif spec.shape == "triangle":
        big = r * 1.15  # equilateral, centroid at the centre, pointing up
        pts = [(cx + big * math.cos(a), cy + big * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        pen.polygon(pts, fill=fill)
    else:  # guarded by the config validator
        raise ValueError(f"unknown shape {spec.shape!r}")
    return image.resize((spec.width, spec.height), Image.Resampling.BOX)


def classify_image(image) -> dict[str, str | None]:
    """Colour, shape and background of a (possibly generated) shapes picture.

    ``image``: a PIL image, or a tensor (3, H, W) / (3, 1, H, W) in [-1, 1]. The background is
    the median border colour; the shape is every pixel far from it. Its colour is the palette
    entry nearest to the median shape pixel; its kind comes from how much of its bounding box
    it fills (triangle ~0.5, circle ~0.79, square ~1) and, between circle and square, from
    whether it fills the box's corners. ``None`` where no shape is found.
    """
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.dim() == 4:
            t = t[:, 0]
        rgb = ((t.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()
    else:
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    bg = np.median(border, axis=0)
    mask = np.linalg.norm(rgb - bg, axis=-1) > 90
    background = _nearest(bg, BACKGROUNDS)
    if mask.sum() < max(4, 0.01 * mask.size):
        return {"colour": None, "shape": None, "background": background}
    colour = _nearest(np.median(rgb[mask], axis=0), PALETTE)
    ys, xs = np.nonzero(mask)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    fill = box.mean()
    # Squares fill their box's corners, circles leave them empty: corner occupancy tells the two
    # apart even when a generated square's edges are ragged (its overall fill then drops to ~0.85).
    ch, cw = max(1, box.shape[0] // 4), max(1, box.shape[1] // 4)
    corners = np.mean([box[:ch, :cw].mean(), box[:ch, -cw:].mean(), box[-ch:, :cw].mean(), box[-ch:, -cw:].mean()])
    shape = "triangle" if fill < 0.64 else "square" if corners > 0.6 else "circle"
    return {"colour": colour, "shape": shape, "background": background}


def _nearest(rgb: np.ndarray, table: dict[str, tuple[int, int, int]]) -> str:
    return min(table, key=lambda name: float(np.sum((np.asarray(table[name], dtype=np.float32) - rgb) ** 2)))


def build(cfg: ShapesConfig, *, split: str = "train") -> torch.utils.data.Dataset:
    if cfg.use_cached_latents:
        return CachedLatentsDataset("shapes", cfg.latents_dir, split)
    return ShapesDataset(cfg, split)


__all__ = ["BACKGROUNDS", "PALETTE", "SHAPE_KINDS", "ShapeSpec", "ShapesDataset", "build", "classify_image", "draw"]
