"""The model behind the demo: loading, size presets, input bounds, the model card, one batched call.

No gradio here: everything the app checks or computes is plain Python, so it is tested
without a server, and user mistakes raise :class:`MinfmError` (the app shows the message).

A video model (its recipe samples or trains on clips: ``recipe_makes_clips``) also takes a
frame count, in the steps its VAE and patchifier can cut; an image model draws one frame.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from minfm_core.errors import MinfmError, PluginError
from minfm_core.jsonio import last_jsonl_record
from minfm_core.secrets import mask_secrets

#: (height, width) aspect ratios offered at the model's base pixel count.
ASPECTS = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16))
# ASCII digits only, as the CLI's --size: int() reads "１６" (full-width) as 16
_SIZE = re.compile(r"^\s*([0-9]{1,5})\s*[xX]\s*([0-9]{1,5})\s*$")


@dataclass(frozen=True)
class Limits:
    """Bounds on one request; anything outside is refused with a message before sampling."""

    max_steps: int
    max_images: int
    max_prompt_chars: int
    max_cfg: float
    multiple: int  # height and width must be multiples of this (VAE compression x patch)
    max_side: int
    max_pixels: int
    max_frames: int = 1  # 1: an image model (the page offers no frame control)


@dataclass(frozen=True)
class Job:
    """One image to draw: what may differ between images of one sampler call."""

    prompt: str
    neg_prompt: str
    size: tuple[int, int, int]  # frames, height, width
    seed: int


@dataclass(frozen=True)
class Settings:
    """What one sampler call shares (the batch key): requests agreeing on it are sampled together."""

    steps: int
    sampler: str
    cfg_scale: float
    ep_cfg: bool


def size_label(h: int, w: int) -> str:
    return f"{h}x{w}"


def parse_size(text: str) -> tuple[int, int]:
    m = _SIZE.match(str(text))
    if not m:
        raise _err(f"Size {str(text)[:40]!r} is not HEIGHTxWIDTH (e.g. 256x256).")
    return int(m.group(1)), int(m.group(2))


def _err(msg: str) -> MinfmError:
    return MinfmError(msg)


def _round_to(x: float, m: int) -> int:
    return max(m, int(round(x / m)) * m)


def size_presets(base: tuple[int, int], trained: Sequence[tuple[int, int]], multiple: int) -> list[tuple[int, int]]:
    """The sizes the model was trained at, then common aspect ratios at its sampling pixel count.

    Aspect presets are rounded to a multiple of 8 pixels at least (a pixel-space model
    accepts any multiple of 2, but 18x14 is not a size anyone asks for).
    """
    area = base[0] * base[1]
    step = multiple * math.ceil(8 / multiple)
    out: list[tuple[int, int]] = []
    for h, w in [tuple(base), *map(tuple, trained)]:
        if h % multiple == 0 and w % multiple == 0 and (h, w) not in out:
            out.append((h, w))
    for ah, aw in ASPECTS:
        hw = (_round_to(math.sqrt(area * ah / aw), step), _round_to(math.sqrt(area * aw / ah), step))
        if hw not in out:
            out.append(hw)
    return out


class DemoModel:
    """One loaded pipeline (EMA weights by default) plus what the app shows about it."""

    def __init__(self, pipe, resolved, *, source: str, weights: str, step: int | None, metrics: dict[str, Any],
                 recipe_text: str, max_images: int = 4, max_steps: int = 100, max_prompt_chars: int = 500) -> None:
        from minfm_core.summary import count_parameters

        self.pipe = pipe
        self.resolved = resolved
        self.source = source
        self.weights = weights
        self.step = step
        self.metrics = metrics
        self.recipe_text = recipe_text
        self.n_params = count_parameters(pipe.denoiser)[0]
        s = resolved.recipe.sample
        vae = resolved.config("model.vae")
        patch = tuple(pipe.patchifier.patch_size)
        # One patch of latent cells is the smallest step in pixels along each side.
        self.multiple = max(vae.compression[1] * patch[1], vae.compression[2] * patch[2])
        base = (int(s.size[1]), int(s.size[2]))
        data = resolved.recipe.data
        trained = [tuple(hw) for hw in (data.options.get("sizes") or [])] if data is not None else []
        self.presets = size_presets(base, trained, self.multiple)
        self.default_size = base if base in self.presets else self.presets[0]
        biggest = max(max(h, w) for h, w in self.presets)
        self.limits = Limits(
            max_steps=max(max_steps, s.steps),
            max_images=max_images,
            max_prompt_chars=max_prompt_chars,
            max_cfg=20.0,
            multiple=self.multiple,
            max_side=2 * biggest,
            max_pixels=4 * max(h * w for h, w in self.presets),
        )
        # shown on the page (examples, placeholder, the negative prompt box) as the recipe panel
        # is: masked (a prompt with an expanded ${VAR} of a secret is the run's own business)
        self.examples = [mask_secrets(p) for p in s.prompts]
        self.default_steps = min(s.steps, self.limits.max_steps)
        guidance = resolved["sample.guidance"]
        self.default_cfg = float(getattr(guidance.config, "scale", 1.0))
        self.default_ep_cfg = guidance.component.name == "ep_cfg"
        self.default_sampler = resolved["sample.sampler"].component.name
        self.default_neg_prompt = mask_secrets(s.neg_prompt)
        self._init_frames(resolved)

    def _init_frames(self, resolved) -> None:
        """Which frame counts a request may ask for: only a video model's, and only those it can cut."""
        from minfm_core.engine.video_io import frame_rule, recipe_makes_clips, valid_frames

        self.makes_clips = recipe_makes_clips(resolved.to_dict())
        self.frame_rule = frame_rule(resolved)
        counts = valid_frames(*self.frame_rule, count=2)
        # Valid counts step evenly (first, first + step, ...): a slider can offer exactly them.
        self.frame_step = counts[1] - counts[0] if len(counts) > 1 else 1
        self.min_frames = counts[0] if counts else 1
        if not self.makes_clips:
            self.default_frames = 1
            return
        data = resolved.recipe.data
        trained = data.options.get("frames") if data is not None else None
        want = int(resolved.recipe.sample.size[0])
        if want <= 1 and isinstance(trained, int):
            want = trained
        self.default_frames = max(self.min_frames, want)
        # Twice the longest clip it was asked for, on the model's frame grid.
        top = 2 * max(self.default_frames, trained if isinstance(trained, int) else 1)
        top = self.min_frames + (top - self.min_frames) // self.frame_step * self.frame_step
        self.limits = dataclasses.replace(self.limits, max_frames=max(top, self.default_frames))

    # ---- loading -------------------------------------------------------------------
    @classmethod
    def load(cls, src: str, *, use_ema: bool = True, device: str | None = None, **limits: Any) -> DemoModel:
        """Resolve ``src`` (run dir, checkpoint, model folder or ``hf://``) and load it once."""
        from minfm_core.sources import resolve_source

        with contextlib.ExitStack() as stack:  # the checkpoint is kept from pruning until it is read
            return cls._load(resolve_source(src), stack, src, use_ema, device, limits)

    @classmethod
    def _load(cls, path, stack: contextlib.ExitStack, src: str, use_ema: bool, device: str | None, limits: dict) -> DemoModel:
        import torch

        from minfm_core.engine.pipeline import build_pipeline
        from minfm_core.engine.runtime import pick_device
        from minfm_core.engine.sample import check_weights_fit, load_denoiser_weights, locate
        from minfm_core.recipe import ONE_PROCESS, load_recipe
        from minfm_core.safepath import recipe_root

        recipe_path, kind, where = locate(path, stack)
        # A recipe downloaded with a model is data: no ${VAR} expansion (the demo shows it on
        # /config) and its file references stay in its folder.
        resolved = load_recipe(recipe_path, list(ONE_PROCESS), untrusted_root=recipe_root(recipe_path), recorded=True)
        dev = torch.device(device) if device else pick_device(resolved.recipe.run.device, 0)
        check_weights_fit(resolved, kind, where, use_ema)  # before a model of the recipe's size is built
        pipe = build_pipeline(resolved, dev, load_weights=True)
        with warnings.catch_warnings():  # DCP notes it loads in one process: that is the intent
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            loaded = load_denoiser_weights(pipe.denoiser, kind, where, use_ema=use_ema)
        pipe.denoiser.eval().requires_grad_(False)
        step = None
        if kind == "dcp" and where.name.startswith("step_") and where.name[5:].isascii() and where.name[5:].isdigit():
            step = int(where.name[5:])
        run_dir = where.parent.parent if kind == "dcp" else where
        metrics = last_jsonl_record(run_dir / "metrics.jsonl", "loss")
        if step is None and type(metrics.get("step")) is int and metrics["step"] >= 0:  # a download's file: any JSON
            step = metrics["step"]
        # The page shows the recipe to whoever reaches it: a run's recipe.toml holds ${VAR}s expanded.
        return cls(pipe, resolved, source=src, weights=loaded, step=step, metrics=metrics,
                   recipe_text=mask_secrets(recipe_path.read_text(encoding="utf-8")), **limits)

    # ---- requests ------------------------------------------------------------------
    def samplers(self) -> list[str]:
        from minfm_core.registry import get_registry

        return get_registry().names("sampler")

    def check_request(self, prompt: str, neg_prompt: str, size: str, steps: Any, cfg_scale: Any, ep_cfg: bool,
                      sampler: str, seed: int, n_images: Any, frames: Any = 1) -> tuple[Settings, list[Job]]:
        """Validate one request; raise MinfmError with a message meant for the person typing."""
        lim = self.limits
        prompt = "" if prompt is None else prompt
        neg_prompt = "" if neg_prompt is None else neg_prompt
        for name, text in (("Prompt", prompt), ("Negative prompt", neg_prompt)):
            if not isinstance(text, str):  # an API caller's list or number was drawn as its repr
                raise _err(f"{name} must be text, got {type(text).__name__}.")
        if not prompt.strip():
            raise _err("Enter a prompt.")
        for name, text in (("Prompt", prompt), ("Negative prompt", neg_prompt)):
            if len(text) > lim.max_prompt_chars:
                raise _err(f"{name} is {len(text)} characters long; the limit is {lim.max_prompt_chars}.")
        for name, text in (("Prompt", prompt), ("Negative prompt", neg_prompt)):
            try:  # the text encoder's own refusal (a class model's unknown class), before the queue
                self.pipe.check_prompts([text], name)
            except PluginError:
                raise
            except MinfmError:  # its message may name the model's files: not for the page
                raise _err(f"{name}: this model's text encoder cannot encode it; try one of the examples.") from None
        h, w = parse_size(size)
        m = lim.multiple
        if h % m or w % m:
            raise _err(f"Size {h}x{w}: height and width must be multiples of {m} for this model.")
        if not (m <= h <= lim.max_side and m <= w <= lim.max_side) or h * w > lim.max_pixels:
            raise _err(f"Size {h}x{w} is out of bounds: each side {m}..{lim.max_side} pixels, "
                       f"at most {lim.max_pixels} pixels in all.")
        steps_i = _as_int(steps, "Steps")
        if not 1 <= steps_i <= lim.max_steps:
            raise _err(f"Steps must be between 1 and {lim.max_steps}, got {steps_i}.")
        n = _as_int(n_images, "Number of images")
        if not 1 <= n <= lim.max_images:
            raise _err(f"Number of images must be between 1 and {lim.max_images}, got {n}.")
        if isinstance(cfg_scale, (bool, str)):  # true is not 1.0, "inf" is not a number: an API caller's mistake
            raise _err(f"CFG scale must be a number, got {cfg_scale!r:.42}.")
        try:
            scale = float(cfg_scale)
        except (TypeError, ValueError):
            raise _err(f"CFG scale must be a number, got {cfg_scale!r}.") from None
        if not (math.isfinite(scale) and 0.0 <= scale <= lim.max_cfg):
            raise _err(f"CFG scale must be between 0 and {lim.max_cfg:g}, got {scale:g}.")
        if sampler not in self.samplers():
            raise _err(f"Unknown sampler {str(sampler)[:40]!r}; choose one of {', '.join(self.samplers())}.")
        seed_i = _as_int(seed, "Seed")
        if not 0 <= seed_i <= 2**31 - n:
            raise _err(f"Seed must be between 0 and {2**31 - n}, got {seed_i}.")
        f = self.check_frames(frames)
        if not isinstance(ep_cfg, bool):  # bool("false") is True
            raise _err(f"EP-CFG must be true or false, got {str(ep_cfg)[:40]!r}.")
        settings = Settings(steps=steps_i, sampler=str(sampler), cfg_scale=scale, ep_cfg=ep_cfg)
        jobs = [Job(prompt, neg_prompt, (f, h, w), seed_i + i) for i in range(n)]
        return settings, jobs

    def check_frames(self, frames: Any) -> int:
        from minfm_core.engine.video_io import frames_ok

        f = _as_int(frames, "Frames")
        if f == 1 and not self.makes_clips:
            return 1
        if not self.makes_clips:
            raise _err(f"This model draws images: Frames must be 1, got {f}.")
        lim = self.limits
        if not (self.min_frames <= f <= lim.max_frames and frames_ok(f, *self.frame_rule)):
            raise _err(f"Frames must be one of {self.frame_choices()}, got {f}.")
        return f

    def frame_choices(self) -> str:
        return f"{self.min_frames}, {self.min_frames + self.frame_step}, ... {self.limits.max_frames}"

    # ---- sampling ------------------------------------------------------------------
    def _guidance(self, settings: Settings):
        from minfm_core.registry import get_registry

        comp = get_registry().get("guidance", "ep_cfg" if settings.ep_cfg else "cfg")
        return comp.build(comp.config(scale=settings.cfg_scale))

    def _sampler(self, name: str):
        from minfm_core.registry import get_registry

        slot = self.resolved["sample.sampler"]
        if name == slot.component.name:
            return slot.build()  # the recipe's own options (e.g. ddim_sde's eta)
        return get_registry().get("sampler", name).build()

    def run(self, settings: Settings, jobs: list[Job], callback: Callable[[int, int], None] | None = None):
        """All ``jobs`` in ONE packed sampler call (sizes and frame counts may differ), in order:
        a PIL image for a one-frame job, uint8 frames ``(F, H, W, 3)`` for a clip."""
        from minfm_core.engine.generate import generate, to_pil, to_uint8

        images = generate(
            self.pipe, [j.prompt for j in jobs], sizes=[j.size for j in jobs], seeds=[j.seed for j in jobs],
            steps=settings.steps, neg_prompt=[j.neg_prompt for j in jobs],
            distilled_guidance=self.resolved.recipe.sample.distilled_guidance,
            guidance=self._guidance(settings), sampler=self._sampler(settings.sampler), callback=callback,
        )
        return [to_uint8(img) if job.size[0] > 1 else to_pil(img) for img, job in zip(images, jobs)]

    # ---- model card ----------------------------------------------------------------
    @property
    def weights_label(self) -> str:
        """E.g. "EMA weights at step 4,000"."""
        which = {"ema": "EMA", "model": "raw"}.get(self.weights, self.weights)
        return f"{which} weights" + (f" at step {self.step:,}" if self.step is not None else "")

    def card(self) -> list[tuple[str, str]]:
        """(label, value) rows: what this model is and how it was trained."""
        from minfm_core.summary import human

        r = self.resolved
        den = r["model.denoiser"]
        flavor = getattr(den.config, "flavor", None)
        rows = [
            ("source", self.source),
            ("denoiser", f"{den.component.name}" + (f" ({flavor})" if flavor else "")
             + f", {self.n_params:,} parameters ({human(self.n_params)})"),
            ("weights", self.weights_label),
        ]
        for label, path in (("VAE", "model.vae"), ("text encoder", "model.text_encoder"), ("pooled encoder", "model.clip_encoder")):
            if r.get(path) is not None:
                rows.append((label, r[path].component.name))
        t = r.recipe.train
        rows.append(("training", f"{t.max_steps:,} steps planned, global batch {t.total_batch_size}, peak lr {t.lr:g}"
                     + (f", data {r.recipe.data.name}" if r.recipe.data is not None else "")))
        loss = self.metrics.get("loss")
        # a download's metrics.jsonl is anyone's JSON: a loss of "abc", null or [1] is no loss
        if type(loss) in (int, float) and math.isfinite(loss):
            step = self.metrics.get("step")
            step = step if type(step) is int and step >= 0 else "?"
            rows.append(("last logged loss", f"{float(loss):.4f} at step {step}"))
        rows.append(("sizes", f"multiples of {self.multiple} px; presets " + ", ".join(size_label(*s) for s in self.presets)))
        if self.makes_clips:
            rows.append(("frames", f"{self.frame_choices()} (default {self.default_frames})"))
        rows.append(("device", str(self.pipe.device)))
        return rows


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, (bool, str)):  # true is not 1, "4" is not 4: an API caller's mistake
        raise _err(f"{name} must be a whole number, got {value!r}.")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise _err(f"{name} must be a whole number, got {value!r}.") from None
    if not math.isfinite(f) or f != int(f):
        raise _err(f"{name} must be a whole number, got {value!r}.")
    return int(f)
