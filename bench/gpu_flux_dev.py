"""FLUX.1-dev sampling speed: seconds per 1024x1024 image, 50 steps, bf16, on one GPU.

    python bench/gpu_flux_dev.py                        # flux-dev, random weights, batch 1 and 4
    python bench/gpu_flux_dev.py --batch 1 --repeat 3 --attention flash_attn
    python bench/gpu_flux_dev.py --tiny                 # CPU smoke test: the CI-sized recipe, 2 steps

Times the engine's own ``generate()`` (noise -> 50 sampler steps of the denoiser with the
guidance embedding -> VAE decode) on the recipe's components in bf16. Weights are random by
default: speed does not depend on their values, and a GPU machine without network cannot
fetch FLUX.1-dev. The text encoders are replaced by random embeddings of their output shape
(T5: 512 tokens x 4096, CLIP: 768): they run once per prompt, not per step.
``--weights recipe`` loads everything the recipe names instead (from the HF cache / local paths).

Prints one line per batch size and a final JSON line:
``{"seconds_per_image": ..., "images_per_second": ..., "peak_memory_gb": ..., ...}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from minfm_core.engine.generate import generate
from minfm_core.engine.pipeline import build_pipeline
from minfm_core.recipe import load_recipe
from minfm_core.recipe.resolve import ResolvedRecipe

ROOT = Path(__file__).resolve().parent.parent
FLUX_DEV = ROOT / "recipes" / "flux_dev_inference.toml"
TINY = ROOT / "tests" / "recipes" / "tiny.toml"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TEXT_SLOTS = ("model.text_encoder", "model.clip_encoder")


class RandomText:
    """Stands in for a text encoder: fixed random embeddings of the encoder's output shape."""

    def __init__(self, cfg, device) -> None:
        self.dim, self.pooled = int(cfg.dim), bool(getattr(cfg, "pooled", False))
        keeps_padding = getattr(cfg, "keep_padding", False) or not getattr(cfg, "mask_padding", True)
        self.tokens = int(getattr(cfg, "max_length", 1)) if keeps_padding else min(int(getattr(cfg, "max_length", 1)), 64)
        self.device = device

    def __call__(self, prompts):
        g = torch.Generator().manual_seed(0)
        n = len(prompts)
        if self.pooled:
            return torch.randn(n, self.dim, generator=g).to(self.device)
        return torch.randn(n * self.tokens, self.dim, generator=g).to(self.device), torch.full((n,), self.tokens, device=self.device)


def build(resolved, device: torch.device, dtype: torch.dtype, weights: str):
    if weights == "random":
        # Text encoders are not built (no tokenizer files, no 4.76B T5 in memory): see RandomText.
        slots = {k: v for k, v in resolved.slots.items() if k not in TEXT_SLOTS}
        bare = ResolvedRecipe(resolved.recipe, slots, resolved.source)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype if dtype != torch.float16 else torch.float32)
        try:
            with torch.device(device):  # allocate on the GPU directly: 12B parameters initialise in seconds there
                pipe = build_pipeline(bare, device, load_weights=False)
        finally:
            torch.set_default_dtype(previous)
        pipe.resolved = resolved
        pipe.text_encoder = RandomText(resolved.config("model.text_encoder"), device)
        if resolved.get("model.clip_encoder") is not None:
            pipe.clip_encoder = RandomText(resolved.config("model.clip_encoder"), device)
    else:
        pipe = build_pipeline(resolved, device, load_weights=True)
    pipe.denoiser.to(dtype).eval().requires_grad_(False)
    return pipe


def run(pipe, resolved, *, batch: int, size: int, steps: int, repeat: int, device, dtype) -> float:
    s = resolved.recipe.sample
    prompts = ["a photo of a red fox in the snow"] * batch

    def once(seed: int) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            generate(pipe, prompts, sizes=[(1, size, size)] * batch, seeds=list(range(seed, seed + batch)), steps=steps,
                     neg_prompt=s.neg_prompt, distilled_guidance=s.distilled_guidance)

    once(0)  # warm-up: kernels, allocator, autotuning
    times = []
    for r in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        once(1 + r * batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] / batch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(FLUX_DEV), help="recipe to time (default: recipes/flux_dev_inference.toml)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tests/recipes/tiny.toml, 32x32, 2 steps, fp32")
    p.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024)")
    p.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    p.add_argument("--batch", type=int, action="append", help="images per generate() call (repeatable; default 1 and 4)")
    p.add_argument("--repeat", type=int, default=3, help="timed calls per batch size (median reported)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--weights", choices=("random", "recipe"), default="random")
    p.add_argument("--attention", help="attention backend (default: the recipe's, 'auto')")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    args = p.parse_args(argv)
    if args.tiny:
        args.recipe, args.size, args.steps, args.dtype, args.device = str(TINY), 32, 2, "fp32", "cpu"
        args.batch, args.repeat = args.batch or [1, 2], min(args.repeat, 2)
    overrides = ["parallel.name=\"none\"", "balancer.name=\"none\"", *args.overrides]
    if args.attention:
        overrides.append(f"model.attention.name={json.dumps(args.attention)}")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    resolved = load_recipe(args.recipe, overrides)
    pipe = build(resolved, device, dtype, args.weights)
    n_params = sum(t.numel() for t in pipe.denoiser.parameters())
    name = f"{Path(args.recipe).name} ({n_params / 1e9:.2f}B denoiser, {args.weights} weights)"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results = {}
    for batch in args.batch or [1, 4]:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        spi = run(pipe, resolved, batch=batch, size=args.size, steps=args.steps, repeat=args.repeat, device=device, dtype=dtype)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        results[batch] = {"seconds_per_image": round(spi, 4), "images_per_second": round(1 / spi, 4),
                          "peak_memory_gb": None if peak is None else round(peak, 2)}
        print(f"{name} on {device_name}: {args.size}x{args.size}, {args.steps} steps, {args.dtype}, batch {batch}: "
              f"{spi:.3f} s/image" + (f", peak {peak:.1f} GiB" if peak is not None else ""), flush=True)
    print(json.dumps({"recipe": args.recipe, "device": device_name, "size": args.size, "steps": args.steps,
                      "dtype": args.dtype, "weights": args.weights, "by_batch": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
