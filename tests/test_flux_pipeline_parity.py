"""minFM's FLUX.1-dev text-to-image path against diffusers' ``FluxPipeline``, same weights.

One tiny random FLUX pipeline folder (diffusers layout: T5 + CLIP + tokenizers, a 16-channel
VAE with FLUX's scale/shift, a guidance-embedding transformer, FLUX.1-dev's scheduler config)
is loaded by both:

* minFM through ``recipes/flux_dev_inference.toml`` (extended: tiny flavor, the folder's
  paths, fp32, 4 steps, 64x96) with the public ``load_recipe`` -> ``build_pipeline`` ->
  ``generate``; the only seam is ``generate(sampler=...)``, a wrapper around the recipe's
  own sampler that records what the denoiser is called with and returns;
* diffusers' ``FluxPipeline.from_pretrained`` of the same folder, fed minFM's initial noise
  (``latents=``), with a forward hook on its transformer and ``callback_on_step_end``.

Every stage is its own test, so a divergence names the first stage that differs:
text embeddings -> noise -> time schedule -> velocity -> latents -> decoded image.
All in float32 on the CPU; the observed differences are float rounding (<= 3e-5).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from encoder_fixtures import CLIP_ARCH, T5_ARCH, clip_tokenizer, t5_tokenizer
from flux_helpers import diffusers_twin, random_flux

RECIPE = str(Path(__file__).resolve().parent.parent / "recipes" / "flux_dev_inference.toml")

PROMPT = "a photo of a red cat on a blue background"
H, W, STEPS, SEED = 64, 96, 4, 7  # non-square: a transposed h/w anywhere shows
CLIP = {**CLIP_ARCH, "max_position_embeddings": 77}  # diffusers pads CLIP prompts to 77 tokens
# 4 levels: 8x downsampling as FLUX's VAE (diffusers' vae_scale_factor is read from the same field)
VAE = dict(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4, latent_channels=16)
# FLUX.1-dev's scheduler/scheduler_config.json
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096)


def _build_folder(root: Path) -> Path:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from minfm_plugins.text_encoders.presets import CLIP_PRESETS, T5_PRESETS
    from minfm_plugins.vae.configs import FluxAEConfig
    from minfm_plugins.vae.flux_ae import diffusers_config
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        t5 = T5EncoderModel(T5Config(**{**T5_PRESETS["t5-v1_1-xxl"], **T5_ARCH}))
        clip = CLIPTextModel(CLIPTextConfig(**{**CLIP_PRESETS["clip-vit-large-patch14"], **CLIP}))
        vae_cfg = FluxAEConfig(pretrained=None, **{**VAE, "block_out_channels": tuple(VAE["block_out_channels"])})
        vae = AutoencoderKL(**diffusers_config(vae_cfg))  # FLUX's scaling 0.3611 / shift 0.1159
    # every parameter random (minFM's init zeroes the modulation and output layers)
    transformer = diffusers_twin(random_flux(guidance=True, seed=0, d_txt=T5_ARCH["d_model"], d_vec=CLIP["hidden_size"]))
    tok2 = AutoTokenizer.from_pretrained(t5_tokenizer(root / "_t5_tokenizer"))
    tok = AutoTokenizer.from_pretrained(clip_tokenizer(root / "_clip_tokenizer"), model_max_length=77)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=clip,
                        tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok2, transformer=transformer)
    folder = root / "tiny-flux-dev"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _recipe(folder: Path, path: Path) -> Path:
    import tomli_w

    path.write_text(tomli_w.dumps({
        "extends": RECIPE,
        "run": {"device": "cpu"},
        "model": {
            # flux-debug shapes + the recipe's guidance embedding; weights from the diffusers transformer/
            "denoiser": {"flavor": "flux-debug", "guidance_embed": True, "d_txt": T5_ARCH["d_model"],
                         "d_vec": CLIP["hidden_size"], "pretrained": str(folder)},
            "vae": {"pretrained": str(folder / "vae"), "dtype": "fp32", **VAE},
            "text_encoder": {"pretrained": str(folder / "text_encoder_2"), "dtype": "fp32", "arch": T5_ARCH},
            "clip_encoder": {"pretrained": str(folder / "text_encoder"), "dtype": "fp32", "arch": CLIP},
        },
        "sample": {"steps": STEPS, "size": [1, H, W]},
    }))
    return path


def _minfm(recipe: Path) -> dict:
    from minfm_core.engine.generate import generate
    from minfm_core.engine.pipeline import build_pipeline
    from minfm_core.recipe import load_recipe
    from minfm_plugins.flow.samplers import time_grid

    resolved = load_recipe(recipe)
    s = resolved.recipe.sample
    pipe = build_pipeline(resolved, torch.device("cpu"))
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    out: dict = {}

    def recording_sampler(velocity, x, lens, **kwargs):  # the recipe's sampler, watched
        def watched(x_t, t):
            v = velocity(x_t, t)
            calls.append((x_t.clone(), t.clone(), v.clone()))
            return v

        out["noise"], out["lens"] = x.clone(), lens.clone()
        out["final"] = pipe.sampler(watched, x, lens, **kwargs)
        return out["final"]

    images = generate(pipe, [PROMPT], sizes=[tuple(s.size)], seeds=[SEED], steps=s.steps,
                      distilled_guidance=s.distilled_guidance, sampler=recording_sampler)
    text = pipe.encode_text([PROMPT])
    return dict(
        out, image=images[0][:, 0], t5=text.txt, clip=text.vec, guidance=s.distilled_guidance, steps=s.steps,
        x=[c[0] for c in calls], t=torch.cat([c[1] for c in calls]), v=[c[2] for c in calls],
        sigmas=time_grid(s.steps, out["lens"], pipe.sample_warper)[:, 0],
        sampler=resolved["sample.sampler"].component.name, latent_shape=pipe.latent_shape(tuple(s.size)),
    )


def _diffusers(folder: Path, ours: dict) -> dict:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folder)  # float32
    pipe.set_progress_bar_config(disable=True)
    calls, steps = [], []

    def hook(module, args, kwargs, output):
        calls.append((kwargs["hidden_states"][0].clone(), kwargs["timestep"].clone(), output[0][0].clone()))

    def on_step_end(p, i, t, tensors):
        steps.append(tensors["latents"][0].clone())
        return tensors

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        image = pipe(PROMPT, height=H, width=W, num_inference_steps=ours["steps"], guidance_scale=ours["guidance"],
                     latents=ours["noise"][None].clone(), max_sequence_length=512, output_type="pt",
                     callback_on_step_end=on_step_end).images[0]
    finally:
        handle.remove()
    with torch.no_grad():  # as in FluxPipeline.__call__ (with grad, SDPA takes another CPU kernel: ~1e-5 off)
        t5, clip, _ = pipe.encode_prompt(PROMPT, PROMPT, max_sequence_length=512)
    c, h, w = ours["latent_shape"][0], ours["latent_shape"][2], ours["latent_shape"][3]
    seeded, _ = pipe.prepare_latents(1, c, H, W, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(SEED))
    return dict(
        image=image * 2 - 1, t5=t5[0], clip=clip, sigmas=pipe.scheduler.sigmas, final=steps[-1], seeded=seeded[0],
        x=[k[0] for k in calls], t=torch.cat([k[1] for k in calls]), v=[k[2] for k in calls], hw=(h, w),
    )


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    import torch.distributed as dist

    from minfm_core.engine.runtime import init_runtime, shutdown_runtime

    root = tmp_path_factory.mktemp("flux_parity")
    folder = _build_folder(root)
    recipe = _recipe(folder, root / "tiny_flux_dev.toml")
    owned = not dist.is_initialized()
    init_runtime("cpu")  # a world of one, as `minfm sample` runs (the recipe's knapformer balancer needs it)
    try:
        ours = _minfm(recipe)
    finally:
        if owned:
            shutdown_runtime()
    return ours, _diffusers(folder, ours)


def _close(got, want, what: str, tol: float) -> None:
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol,
                               msg=lambda m: f"minFM vs diffusers FluxPipeline, {what}: {m}")


def test_the_recipe_is_what_is_compared(both):
    ours, _ = both
    assert ours["sampler"] == "ddim_sde" and ours["guidance"] == 4.0 and ours["steps"] == STEPS
    assert ours["latent_shape"] == (16, 1, H // 8, W // 8)
    assert len(ours["x"]) == STEPS  # guidance-distilled: one denoiser call per step, no CFG pass


def test_text_embeddings_match(both):
    ours, theirs = both
    assert ours["t5"].shape == theirs["t5"].shape == (512, T5_ARCH["d_model"])  # all 512 tokens, pads included
    _close(ours["t5"], theirs["t5"], "T5 per-token embeddings", 1e-5)
    _close(ours["clip"], theirs["clip"], "CLIP pooled embedding", 1e-5)


def test_a_seed_gives_diffusers_noise(both):
    """minFM's noise for seed s is diffusers' for torch.Generator().manual_seed(s)."""
    ours, theirs = both
    assert torch.equal(ours["noise"], theirs["seeded"])


def test_time_schedule_matches(both):
    """Resolution-dependent shift (mu from 24 image tokens, base 0.5 / max 1.15) on the 1 -> 0 grid."""
    ours, theirs = both
    assert int(ours["lens"][0]) == theirs["hw"][0] // 2 * (theirs["hw"][1] // 2) == 24
    _close(ours["sigmas"], theirs["sigmas"], "sigma schedule", 1e-6)
    _close(ours["t"], theirs["t"], "t given to the denoiser at each step", 1e-6)


def test_first_velocity_matches(both):
    ours, theirs = both
    assert torch.equal(ours["x"][0], theirs["x"][0])  # the same noise in
    _close(ours["v"][0], theirs["v"][0], "velocity at step 1", 2e-5)


def test_every_step_and_final_latents_match(both):
    ours, theirs = both
    for k in range(STEPS):
        _close(ours["x"][k], theirs["x"][k], f"latents entering step {k + 1}", 1e-4)
        _close(ours["v"][k], theirs["v"][k], f"velocity at step {k + 1}", 1e-4)
    _close(ours["final"], theirs["final"], "final packed latents", 1e-4)


def test_decoded_images_match(both):
    ours, theirs = both
    assert ours["image"].shape == theirs["image"].shape == (3, H, W)
    assert ours["image"].std() > 0.1  # an image, not a constant
    _close(ours["image"], theirs["image"], "decoded image in [-1, 1]", 1e-4)
