"""Text-to-image generation with a built pipeline: noise -> sampler with guidance -> decode.

Requests of different sizes are generated together in one packed batch: the
denoiser never sees padding, so mixing 256x256 and 512x384 costs nothing extra.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .. import boundary
from ..errors import PluginError
from .pipeline import Pipeline, TextBatch
from .runtime import SAMPLER_STREAM, derived_seed


def _cat_text(a: TextBatch, b: TextBatch) -> TextBatch:
    vec = None if a.vec is None else torch.cat([a.vec, b.vec])
    return TextBatch(torch.cat([a.txt, b.txt]), torch.cat([a.txt_lens, b.txt_lens]), vec)


def image_seed(seed: int, prompt: int, k: int, samples_per_prompt: int) -> int:
    """The seed of image ``k`` of prompt number ``prompt``: ``seed + prompt * samples_per_prompt
    + k``, in ``minfm sample`` and in the training gallery alike (which draws at most 4 of them)."""
    return seed + prompt * samples_per_prompt + k


@torch.no_grad()
def generate(
    pipe: Pipeline,
    prompts: Sequence[str],
    *,
    sizes: Sequence[tuple[int, int, int]],
    seeds: Sequence[int],
    steps: int,
    neg_prompt: str | Sequence[str] = "",
    distilled_guidance: float | None = None,
    guidance=None,
    sampler=None,
    callback: Callable[[int, int], None] | None = None,
) -> list[Tensor]:
    """Images ``(3, F, H, W)`` in [-1, 1], one per prompt; ``sizes`` are (frames, height, width)."""
    n = len(prompts)
    if not (len(sizes) == len(seeds) == n):
        raise ValueError("prompts, sizes and seeds must have the same length")
    guidance = guidance or pipe.guidance
    sampler = sampler or pipe.sampler
    # what errors name: the recipe's component, or the one a caller (the demo) passed
    guidance_is = pipe.who("sample.guidance") if guidance is pipe.guidance else "guidance"
    sampler_is = pipe.who("sample.sampler") if sampler is pipe.sampler else "sampler"
    noise = [torch.randn(pipe.latent_shape(tuple(s)), generator=torch.Generator().manual_seed(int(seed)))
             for s, seed in zip(sizes, seeds)]
    patched = pipe.patchifier.patchify(noise)
    pipe.check_patched(patched, n)
    x, pos, lens = patched.tokens.to(pipe.device), patched.pos.to(pipe.device), patched.lens.to(pipe.device)
    cond = pipe.encode_text(list(prompts))
    negs = [neg_prompt] * n if isinstance(neg_prompt, str) else list(neg_prompt)
    uncond = pipe.encode_text(negs) if guidance.needs_uncond else None
    g = None if distilled_guidance is None else torch.full((n,), float(distilled_guidance), device=pipe.device)
    pipe.denoiser.eval()

    def velocity(x_t: Tensor, t: Tensor) -> Tensor:
        if uncond is None:
            return pipe.velocity(x_t, pos, lens, cond, t, g)
        # Conditional and unconditional branches share one packed call.
        v = pipe.velocity(
            torch.cat([x_t, x_t]), torch.cat([pos, pos]), torch.cat([lens, lens]), _cat_text(cond, uncond),
            torch.cat([t, t]), None if g is None else torch.cat([g, g]),
        )
        L = x_t.shape[0]
        guided = guidance(v[:L], v[L:], lens)
        _refuse(guidance_is, "v = guidance(v_cond, v_uncond, lens)", boundary.shaped_like_problem(guided, x_t))
        return guided

    # A stochastic sampler's fresh noise: a stream of its own (seeded with the image's seed
    # itself, its first draw was the starting noise again)
    x0 = sampler(velocity, x, lens, steps=steps, warper=pipe.sample_warper,
                 generators=[torch.Generator().manual_seed(derived_seed(int(seed), SAMPLER_STREAM)) for seed in seeds],
                 callback=callback)
    # a list or a wrong shape failed in unpatchify, blamed on minFM
    _refuse(sampler_is, "x0 = sampler(velocity, x, lens, ...)", boundary.shaped_like_problem(x0, x))
    latents = pipe.patchifier.unpatchify(x0, lens, patched.shapes)
    pipe.refuse("model.patchifier", "latents = unpatchify(tokens, lens, shapes)",
                boundary.unpatched_problem(latents, [z.shape for z in noise]))
    images = pipe.vae.decode(latents)
    pipe.refuse("model.vae", "images = vae.decode(latents)", boundary.decoded_problem(images, [tuple(s) for s in sizes]))
    return [img.float().clamp(-1, 1).cpu() for img in images]


def _refuse(who: str, what: str, problem: str | None) -> None:
    if problem is not None:
        raise PluginError(f"{who}: {what}: {problem}")


def to_uint8(image: Tensor) -> np.ndarray:
    """(3, F, H, W) in [-1, 1] -> uint8 frames (F, H, W, 3): what every writer (PNG, WebP, MP4, npz) takes."""
    return ((image.permute(1, 2, 3, 0).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)


def to_pil(image: Tensor, frame: int = 0) -> Image.Image:
    """(3, F, H, W) in [-1, 1] -> one RGB frame."""
    return Image.fromarray(to_uint8(image[:, frame : frame + 1])[0])


def grid_frames(clips: Sequence[np.ndarray], cols: int | None = None, pad: int = 2) -> list[Image.Image]:
    """Clips (F, H, W, 3) in a grid, one grid picture per frame; shorter clips hold their last frame."""
    n = max(len(c) for c in clips)
    return [grid([Image.fromarray(c[min(f, len(c) - 1)]) for c in clips], cols=cols, pad=pad) for f in range(n)]


def grid(images: Sequence[Image.Image], cols: int | None = None, pad: int = 2) -> Image.Image:
    """Images of possibly different sizes in a grid (cells sized to the largest)."""
    cols = cols or min(len(images), 8)
    rows = (len(images) + cols - 1) // cols
    cw = max(i.width for i in images) + pad
    ch = max(i.height for i in images) + pad
    out = Image.new("RGB", (cols * cw + pad, rows * ch + pad), (255, 255, 255))
    for k, img in enumerate(images):
        out.paste(img, (pad + (k % cols) * cw, pad + (k // cols) * ch))
    return out
