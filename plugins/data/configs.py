"""Configs of the built-in datasets (no torch here: plugin loading stays fast)."""

from __future__ import annotations

from typing import Literal

from minfm_core.config import config, field
from minfm_core.validators import Range, non_negative, positive, probability

#: Colours and shapes the ``shapes`` dataset knows how to draw (the palette is in shapes.py).
SHAPE_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "cyan", "magenta")
SHAPE_KINDS = ("circle", "square", "triangle")
SHAPE_BACKGROUNDS = ("white", "black", "gray")
SHAPE_SIZES = ("small", "large")


def _multiple_of_size_multiple(inst, attribute, value) -> None:
    m = inst.size_multiple
    if not isinstance(m, int) or m <= 0:
        return  # size_multiple's own range check names it (attrs validates fields in order)
    for hw in value:
        if len(hw) != 2 or any(v <= 0 or v % m for v in hw):
            raise ValueError(
                f"{attribute.name}: {tuple(hw)} must be (height, width), both positive multiples "
                f"of size_multiple={m}"
            )


def _choices(allowed: tuple[str, ...]):
    def check(inst, attribute, value) -> None:
        if not value:
            raise ValueError(f"{attribute.name}: must name at least one of {', '.join(allowed)}")
        bad = [v for v in value if v not in allowed]
        if bad:
            raise ValueError(f"{attribute.name}: unknown {', '.join(map(repr, bad))}; known: {', '.join(allowed)}")

    return check


def _multiple(inst, attribute, value) -> None:
    if not isinstance(inst.size_multiple, int) or inst.size_multiple <= 0:
        return  # size_multiple's own range check names it
    if value % inst.size_multiple:
        raise ValueError(f"{attribute.name}: {value} is not a multiple of size_multiple={inst.size_multiple}")


def _use_cached_latents():
    return field(False, doc="read the VAE latents `minfm cache latents` wrote to latents_dir instead of the images")


def _latents_dir():
    return field(
        None, doc="folder of the latent cache: <split>/index.json + safetensors shards (docs/data.md)", file="file"
    )


_positive = positive
_probability = probability


@config
class ShapesConfig:
    """Built-in synthetic text-image data: coloured shapes on plain backgrounds (no downloads)."""

    sizes: tuple[tuple[int, int], ...] = field(
        ((32, 32), (32, 48), (48, 32)),
        doc="(height, width) canvases drawn from at random per sample; mixed aspect ratios exercise packing",
        validator=[positive, _multiple_of_size_multiple],
    )
    size_multiple: int = field(16, doc="every height and width must divide by this (VAE x patch)", validator=_positive)
    num_samples: int = field(10_000, doc="samples in the train split", validator=_positive)
    num_val_samples: int = field(512, doc="samples in the val split (drawn with a disjoint seed)", validator=_positive)
    seed: int = field(
        0, doc="seed of the whole dataset; the same (seed, split, index) draws the same picture", validator=non_negative
    )
    colours: tuple[str, ...] = field(
        ("red", "green", "blue", "yellow"), doc="colours to draw from", validator=_choices(SHAPE_COLOURS)
    )
    shapes: tuple[str, ...] = field(SHAPE_KINDS, doc="shapes to draw from", validator=_choices(SHAPE_KINDS))
    backgrounds: tuple[str, ...] = field(
        ("white",), doc="plain background colours to draw from", validator=_choices(SHAPE_BACKGROUNDS)
    )
    scales: tuple[str, ...] = field(
        SHAPE_SIZES, doc="shape sizes: small ~45%, large ~75% of the shorter side", validator=_choices(SHAPE_SIZES)
    )
    jitter: float = field(
        0.08, doc="random offset of the shape centre, as a fraction of each side", validator=_probability
    )
    caption: Literal["short", "long", "mixed"] = field(
        "mixed",
        doc="'short': 'a red circle'; 'long': 'a large red circle on a white background'; 'mixed': either, at random",
    )
    use_cached_latents: bool = _use_cached_latents()
    latents_dir: str | None = _latents_dir()


@config
class ImageFolderConfig:
    """Images with captions from metadata.jsonl (HF imagefolder) or .txt sidecars."""

    root: str = field(
        "", doc="folder of images; <root>/<split>/ is used when it exists (unused with cached latents)", file="file"
    )
    captions: Literal["auto", "metadata", "sidecar"] = field(
        "auto", doc="where captions come from; 'auto' prefers metadata.jsonl, else .txt sidecars"
    )
    caption_column: str = field("text", doc="metadata.jsonl key that holds the caption")
    max_pixels: int = field(
        256 * 256, doc="token budget: images are resized (aspect kept) to about this many pixels", validator=_positive
    )
    size_multiple: int = field(
        16, doc="height and width are center-cropped to multiples of this (VAE x patch)", validator=_positive
    )
    p_flip: float = field(0.0, doc="probability of a horizontal flip (train split only)", validator=_probability)
    val_fraction: float = field(
        0.01, doc="share of images held out for 'val' when the root has no split folders",
        validator=Range(0, 1, hi_open=True),
    )
    seed: int = field(0, doc="seed of the flips and the held-out selection", validator=non_negative)
    use_cached_latents: bool = _use_cached_latents()
    latents_dir: str | None = _latents_dir()


@config
class ImagenetConfig:
    """ILSVRC-2012 (folder layout or cached latents) with class-name prompts."""

    root: str = field(
        "", doc="ILSVRC root holding train/<wnid>/*.JPEG and val/ (unused with cached latents)", file="file"
    )
    resolution: int = field(256, doc="side of the square crop", validator=[positive, _multiple])
    size_multiple: int = field(16, doc="the resolution must divide by this (VAE x patch)", validator=_positive)
    p_flip: float = field(0.5, doc="probability of a horizontal flip (train split only)", validator=_probability)
    val_labels: str = field(
        "",
        doc="labels of a flat val/ folder: LOC_val_solution.csv, or lines 'file wnid' / 'file index'; "
        "empty when val/ has class folders",
        file="file",
    )
    prompt_template: str = field("{name}", doc="prompt made from the class; {name} is its first WordNet lemma")
    seed: int = field(0, doc="seed of the flips", validator=non_negative)
    use_cached_latents: bool = _use_cached_latents()
    latents_dir: str | None = _latents_dir()
