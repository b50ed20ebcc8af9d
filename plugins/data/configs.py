"""Configs of the built-in datasets (no torch here: plugin loading stays fast)."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

from minfm_core.config import config, field
from minfm_core.validators import (
    MAX_FRAMES,
    MAX_SAMPLES,
    MAX_SIDE,
    SEED,
    Range,
    probability,
)

#: Colours and shapes the ``shapes`` dataset knows how to draw (the palette is in shapes.py).
SHAPE_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "cyan", "magenta")
SHAPE_KINDS = ("circle", "square", "triangle")
SHAPE_BACKGROUNDS = ("white", "black", "gray")
SHAPE_SIZES = ("small", "large")
#: Radius of a drawn shape as a fraction of the canvas's shorter side (drawn at 0.9-1.1 times this).
SCALE_RADIUS = {"small": 0.225, "large": 0.375}
#: A moving_shapes clip displaced less than this fraction of the side reads as standing still
#: (``classify_clip``); the dataset's moving shapes must cover at least this much.
STILL_BELOW = 0.12
#: Pixels a side of a drawn canvas: shapes are drawn 4x larger and filtered down, so a 2048 x 2048
#: picture takes 200 MB while it is drawn (16,384 a side took 13 GB a sample).
MAX_SHAPE_SIDE = 2048


def _multiple_of_size_multiple(inst, attribute, value) -> None:
    m = inst.size_multiple
    if not (isinstance(m, int) and SIDE.ok(m)):
        return  # size_multiple's own range check names it (attrs validates fields in order)
    if not value:  # an empty list passed the loop, and the dataset then drew from nothing
        raise ValueError(f"{attribute.name}: give at least one (height, width)")
    for hw in value:
        if len(hw) != 2 or any(v <= 0 or v % m for v in hw):
            raise ValueError(
                f"{attribute.name}: {tuple(hw)} must be (height, width), both positive multiples "
                f"of size_multiple={m}"
            )


#: Characters of a prompt template: a prompt is read by a text encoder of at most a few hundred
#: tokens, and 1000 of them are made at once.
MAX_TEMPLATE = 4096


def _class_template(inst, attribute, value) -> None:
    """Only ``{name}``, plainly: ``{nme}`` raised at prepare, ``{name.upper}`` made prompts of a
    method's repr (different in every process), and a format spec such as ``{name:>1000000000}``
    made a gigabyte per prompt (checked here without formatting anything)."""
    import string

    if len(value) > MAX_TEMPLATE:
        raise ValueError(f"{attribute.name}: {len(value):,} characters; at most {MAX_TEMPLATE:,}")
    try:
        parts = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(value) if f is not None]
    except ValueError as exc:
        raise ValueError(f"{attribute.name}: {value!r} is not a template of {{name}} ({exc})") from None
    bad = [f for f, _, _ in parts if f != "name"]
    if bad:
        raise ValueError(f"{attribute.name}: {value!r} may use {{name}} only, not {{{bad[0]}}}")
    if any(spec or conv for _, spec, conv in parts):
        raise ValueError(f"{attribute.name}: {value!r} is not a template of {{name}} "
                         "(no format spec or conversion after the name: write {name} plainly)")


def _choices(allowed: tuple[str, ...]):
    def check(inst, attribute, value) -> None:
        if not value:
            raise ValueError(f"{attribute.name}: must name at least one of {', '.join(allowed)}")
        bad = [v for v in value if v not in allowed]
        if bad:
            raise ValueError(f"{attribute.name}: unknown {', '.join(map(repr, bad))}; known: {', '.join(allowed)}")

    return check


def _multiple(inst, attribute, value) -> None:
    if not (isinstance(inst.size_multiple, int) and SIDE.ok(inst.size_multiple)):
        return  # size_multiple's own range check names it
    if value % inst.size_multiple:
        raise ValueError(f"{attribute.name}: {value} is not a multiple of size_multiple={inst.size_multiple}")


def _use_cached_latents():
    return field(False, doc="read the VAE latents `minfm cache latents` wrote to latents_dir instead of the images")


def _latents_dir():
    return field(
        None, doc="folder of the latent cache: <split>/index.json + safetensors shards (docs/data.md)", file="file"
    )


#: A height, width or "multiple of" in pixels.
SIDE = Range(1, MAX_SIDE)
#: A pixel budget: at most a MAX_SIDE square.
PIXELS = Range(1, MAX_SIDE**2)
#: Samples in a split.
SAMPLES = Range(1, MAX_SAMPLES)
_probability = probability


def _size_multiple():
    return field(16, doc="every height and width must divide by this (VAE x patch)", validator=SIDE)


def _colours():
    return field(("red", "green", "blue", "yellow"), doc="colours to draw from", validator=_choices(SHAPE_COLOURS))


def _kinds():
    return field(SHAPE_KINDS, doc="shapes to draw from", validator=_choices(SHAPE_KINDS))


def _backgrounds():
    return field(("white",), doc="plain background colours to draw from", validator=_choices(SHAPE_BACKGROUNDS))


# Fields the two drawn datasets share (their docs name a sample or a clip).
def _sizes(per: str):
    return field(((32, 32), (32, 48), (48, 32)), doc=f"(height, width) canvases drawn from at random per {per}",
                 validator=[Range(1, MAX_SHAPE_SIDE), _multiple_of_size_multiple])


def _num_samples(what: str):
    return field(10_000, doc=f"{what} in the train split", validator=SAMPLES)


def _num_val_samples(what: str):
    return field(512, doc=f"{what} in the val split (drawn with a disjoint seed)", validator=SAMPLES)


def _seed(item: str):
    return field(0, doc=f"seed of the whole dataset; the same (seed, split, index) draws the same {item}",
                 validator=SEED)


@config
class ShapesConfig:
    """Built-in synthetic text-image data: coloured shapes on plain backgrounds (no downloads)."""

    sizes: tuple[tuple[int, int], ...] = _sizes("sample; mixed aspect ratios exercise packing")
    size_multiple: int = _size_multiple()
    num_samples: int = _num_samples("samples")
    num_val_samples: int = _num_val_samples("samples")
    seed: int = _seed("picture")
    colours: tuple[str, ...] = _colours()
    shapes: tuple[str, ...] = _kinds()
    backgrounds: tuple[str, ...] = _backgrounds()
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


def _budget_holds_a_multiple(cfg) -> None:
    """The smallest crop is one size_multiple square: a budget below it gave crops over the budget."""
    m = cfg.size_multiple
    if m * m > cfg.max_pixels:
        raise ValueError(f"max_pixels: {cfg.max_pixels} is less than one size_multiple square ({m} x {m} = {m * m}): "
                         "every crop would be over the budget; raise max_pixels or lower size_multiple")


class _ReadsRoot:
    """A dataset reading files under ``root`` (or its cached latents instead)."""

    __slots__ = ()

    @property
    def unset(self) -> tuple[str, ...]:
        # An empty root with the files themselves to read: a recipe mistake a train job
        # refuses (a recipe from outside has its roots emptied, and may still be sampled from).
        return ("root",) if not self.root and not self.use_cached_latents else ()


@config
class ImageFolderConfig(_ReadsRoot):
    """Images with captions from metadata.jsonl (HF imagefolder) or .txt sidecars."""

    root: str = field(
        "", doc="folder of images; <root>/<split>/ is used when it exists (unused with cached latents)", file="file"
    )
    captions: Literal["auto", "metadata", "sidecar"] = field(
        "auto", doc="where captions come from; 'auto' prefers metadata.jsonl, else .txt sidecars"
    )
    caption_column: str = field("text", doc="metadata.jsonl key that holds the caption")
    max_pixels: int = field(
        256 * 256, doc="token budget: images are resized (aspect kept) to about this many pixels", validator=PIXELS
    )
    size_multiple: int = field(
        16, doc="height and width are center-cropped to multiples of this (VAE x patch)", validator=SIDE
    )
    p_flip: float = field(0.0, doc="probability of a horizontal flip (train split only)", validator=_probability)
    val_fraction: float = field(
        0.01, doc="share of images held out for 'val' when the root has no split folders",
        validator=Range(0, 1, hi_open=True),
    )
    seed: int = field(0, doc="seed of the flips (the held-out split is a hash of each path: no seed moves it)",
                      validator=SEED)
    use_cached_latents: bool = _use_cached_latents()
    latents_dir: str | None = _latents_dir()

    def __attrs_post_init__(self) -> None:
        _budget_holds_a_multiple(self)


@config
class ImagenetConfig(_ReadsRoot):
    """ILSVRC-2012 (folder layout or cached latents) with class-name prompts."""

    #: The original minFM's ImageNet keys: an unknown key answers with its name here (docs/plugins.md).
    former_names: ClassVar[dict[str, str]] = {"p_horizon_flip": "p_flip", "data_root_dir": "root",
                                              "use_precomputed_latents": "use_cached_latents",
                                              "batch_size": "train.batch_size"}

    root: str = field(
        "", doc="ILSVRC root holding train/<wnid>/*.JPEG and val/ (unused with cached latents)", file="file"
    )
    resolution: int = field(256, doc="side of the square crop", validator=[SIDE, _multiple])
    size_multiple: int = field(16, doc="the resolution must divide by this (VAE x patch)", validator=SIDE)
    p_flip: float = field(0.5, doc="probability of a horizontal flip (train split only)", validator=_probability)
    val_labels: str = field(
        "",
        doc="labels of a flat val/ folder: LOC_val_solution.csv, or lines 'file wnid' / 'file index'; "
        "empty when val/ has class folders",
        file="file",
    )
    prompt_template: str = field("{name}", doc="prompt made from the class; {name} is its name (first WordNet lemma; docs/data.md)",
                                 validator=_class_template)
    seed: int = field(0, doc="seed of the flips", validator=SEED)
    use_cached_latents: bool = _use_cached_latents()
    latents_dir: str | None = _latents_dir()


#: Motions of the ``moving_shapes`` clips ("still": the shape stands in place).
MOTIONS = ("left", "right", "up", "down", "still")


@config
class MovingShapesConfig:
    """Built-in synthetic text-video data: one coloured shape moving left/right/up/down or standing still."""

    frames: int = field(
        9, doc="frames per clip (a video VAE with 4x time compression wants 1 + 4k: 5, 9, 17, ...)",
        validator=Range(2, 257),
    )
    sizes: tuple[tuple[int, int], ...] = _sizes("clip")
    size_multiple: int = _size_multiple()
    num_samples: int = _num_samples("clips")
    num_val_samples: int = _num_val_samples("clips")
    seed: int = _seed("clip")
    colours: tuple[str, ...] = _colours()
    shapes: tuple[str, ...] = _kinds()
    motions: tuple[str, ...] = field(MOTIONS, doc="motions to draw from", validator=_choices(MOTIONS))
    backgrounds: tuple[str, ...] = _backgrounds()
    scales: tuple[str, ...] = field(
        ("small",), doc="shape sizes: small ~45%, large ~75% of the shorter side (small leaves room to move)",
        validator=_choices(SHAPE_SIZES),
    )
    travel: float = field(
        0.45, doc="distance a moving shape covers over the clip, as a fraction of the side it moves along "
        "(shortened where the shape would leave the canvas; less than 0.12 reads as standing still)",
        validator=Range(STILL_BELOW, 1),
    )
    jitter: float = field(
        0.05, doc="random offset of the path across its direction, as a fraction of the side", validator=_probability
    )
    use_cached_latents: bool = _use_cached_latents()
    latents_dir: str | None = _latents_dir()

    def __attrs_post_init__(self) -> None:
        # A shape too large for its canvas had no room to move (0 pixels with scales = ['large']),
        # yet its clip was captioned "moving left": the worst case of each canvas and scale must
        # still cover what classify_clip reads as motion.
        axes = {m: (1 if m in ("left", "right") else 0) for m in self.motions if m != "still"}
        grow = 1.15 if "triangle" in self.shapes else 1.0  # a triangle reaches further from its centre
        for scale in self.scales:
            for hw in self.sizes:
                for axis in sorted(set(axes.values())):
                    side = hw[axis]
                    reach = SCALE_RADIUS[scale] * min(hw) * 1.1 * grow + 1
                    room = min(self.travel * side, side - 2 * reach)
                    if room < STILL_BELOW * side:
                        raise ValueError(
                            f"scales: a {scale} shape on a {hw[0]} x {hw[1]} canvas can move "
                            f"{max(room, 0) / side:.0%} of the side at most, less than the {STILL_BELOW:.0%} that "
                            "reads as motion: its clips captioned 'moving' would stand still; use scales = ['small'] "
                            "or larger sizes, or motions = ['still']")


def _dataset_table(inst, attribute, value) -> None:
    """A mix source's ``dataset`` table is a whole dataset table: resolved as a recipe slot is now,
    so ``minfm check`` names a bad nested field by its full path (data.sources[1].dataset.frames)."""
    from minfm_core.errors import MinfmError
    from minfm_core.registry import get_registry
    from minfm_core.validators import RangeError

    if isinstance(value, dict) and value.get("name") == "mix":
        raise RangeError("dataset.name", "a mix cannot hold another mix: list its sources here instead")
    try:
        get_registry().resolve_table("dataset", value, "dataset")
    except MinfmError as exc:  # a RecipeError lists its problems; an unknown name is one line
        # Keep each problem's own path, under this source.
        problems = getattr(exc, "problems", None) or [str(exc)]
        where, _, msg = problems[0].partition(": ")
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise RangeError(where, msg + more) from None


@config
class MixSource:
    """One dataset of a mix and its share of the samples."""

    weight: float = field(1.0, doc="relative share of this dataset's samples in the mix", validator=Range(0, 1e6, lo_open=True))
    dataset: dict = field(
        factory=lambda: {"name": "shapes"}, doc="the dataset's own table: name = '<dataset>' and its fields",
        validator=_dataset_table, component="dataset",
    )


def _drawn_sizes(sources, field_name: str) -> list[int | None]:
    """Each source's size where its config says it (drawn datasets: ``num_samples``), else None."""
    from minfm_core.registry import get_registry

    sizes = []
    for src in sources:
        conf = get_registry().resolve_table("dataset", src.dataset).config
        cached = getattr(conf, "use_cached_latents", False)
        n = getattr(conf, field_name, None)
        sizes.append(n if type(n) is int and not cached else None)
    return sizes


def _sources(inst, attribute, value) -> None:
    if not value:
        raise ValueError(f"{attribute.name}: list at least one [[data.sources]] table")


def quotas(weights: list[float], period: int) -> list[int]:
    """Whole slots per period for each weight (largest remainder; every source keeps at least one)."""
    from minfm_core.errors import MinfmError

    if period < len(weights):
        raise MinfmError(f"mix: period {period} is shorter than the {len(weights)} sources")
    total = sum(weights)
    exact = [w / total * period for w in weights]
    got = [max(1, math.floor(e)) for e in exact]
    # Hand out (or take back) the remaining slots by largest (smallest) remainder.
    order = sorted(range(len(weights)), key=lambda k: exact[k] - math.floor(exact[k]), reverse=True)
    i = 0
    while sum(got) < period:
        got[order[i % len(order)]] += 1
        i += 1
    while sum(got) > period:
        k = max((k for k in range(len(got)) if got[k] > 1), key=lambda k: got[k] - exact[k])
        got[k] -= 1
    return got


def mix_epoch_problem(num_samples: int | None, period: int, quota: list[int], lengths: list[int | None],
                      split: str) -> str | None:
    """Why a mix's epoch cannot be made (None: it can). Unset ``num_samples`` makes the epoch enough
    whole periods to cover every source; ``lengths`` are the sources' sizes (None: not known yet).
    A source of many items but one slot a period made that 10**14 samples: the run died making an
    epoch's order with advice about memory."""
    if num_samples is not None:
        return None
    known = [(k, n, q) for k, (n, q) in enumerate(zip(lengths, quota)) if n]
    if not known:
        return None
    k, n, q = max(known, key=lambda t: math.ceil(t[1] / t[2]))
    total = math.ceil(n / q) * period
    if total <= MAX_SAMPLES:
        return None
    return (f"num_samples: unset, so an epoch covers every source whole: {total:,} samples, as sources[{k}]'s "
            f"{n:,} {split} items take {q:,} of every {period:,} slots; at most {MAX_SAMPLES:,}: set num_samples, "
            f"or raise sources[{k}].weight")


@config
class MixConfig:
    """Several datasets in one stream, by weight: images and clips land in the same batches."""

    num_samples: int | None = field(
        None, doc="samples per epoch of the mix (None: enough that every source is seen whole once)",
        validator=SAMPLES,
    )
    period: int = field(
        1000, doc="the weights are met exactly in every run of this many consecutive indices",
        validator=Range(1, 1_000_000),
    )
    sources: tuple[MixSource, ...] = field(
        factory=lambda: (MixSource(weight=1.0, dataset={"name": "shapes"}),
                         MixSource(weight=1.0, dataset={"name": "moving_shapes"})),
        doc="the datasets and their weights ([[data.sources]] tables: weight, dataset = {name = ..., ...})",
        validator=_sources,
    )
    use_cached_latents: bool = _use_cached_latents()
    latents_dir: str | None = _latents_dir()

    def __attrs_post_init__(self) -> None:
        if self.period < len(self.sources):
            raise ValueError(f"period: {self.period} is shorter than the {len(self.sources)} sources "
                             "(every source needs a slot in each period)")
        if self.num_samples is None and not self.use_cached_latents:
            quota = quotas([s.weight for s in self.sources], self.period)
            for split, field_name in (("train", "num_samples"), ("val", "num_val_samples")):
                problem = mix_epoch_problem(None, self.period, quota, _drawn_sizes(self.sources, field_name), split)
                if problem:  # "num_samples: ..." names data.num_samples
                    raise ValueError(problem)


@config
class VideoFolderConfig(_ReadsRoot):
    """Video clips (mp4, webm, ...; read with PyAV) with captions from .txt sidecars."""

    root: str = field(
        "", doc="folder of videos; <root>/<split>/ is used when it exists (unused with cached latents)", file="file"
    )
    frames: int = field(
        17, doc="frames per clip (a video VAE with 4x time compression wants 1 + 4k: 5, 9, 17, ...)",
        validator=Range(1, MAX_FRAMES),  # what --size and --clip-frames accept too
    )
    stride: int = field(1, doc="take every stride-th frame of the video (2 halves the frame rate)", validator=Range(1, 64))
    clip_start: Literal["first", "random"] = field(
        "random", doc="where a clip starts: the first frame, or anywhere it fits, drawn per (seed, epoch, index); "
        "the val split always starts at the first frame",
    )
    max_pixels: int = field(
        128 * 128, doc="token budget per frame: frames are resized (aspect kept) to about this many pixels",
        validator=PIXELS,
    )
    size_multiple: int = field(
        16, doc="height and width are center-cropped to multiples of this (VAE x patch)", validator=SIDE
    )
    p_flip: float = field(0.0, doc="probability of flipping a clip horizontally (train split only)", validator=_probability)
    val_fraction: float = field(
        0.01, doc="share of videos held out for 'val' when the root has no split folders",
        validator=Range(0, 1, hi_open=True),
    )
    seed: int = field(0, doc="seed of the clip starts and the flips (the held-out split is a hash of each path)",
                      validator=SEED)
    use_cached_latents: bool = _use_cached_latents()
    latents_dir: str | None = _latents_dir()

    def __attrs_post_init__(self) -> None:
        _budget_holds_a_multiple(self)
