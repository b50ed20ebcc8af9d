"""Latent caching for clips: `minfm cache latents` with the Wan VAE on a mix of images and clips,
then training items read the cached (C, 1 + k, h, w) latents instead of drawing and encoding."""

from __future__ import annotations

import json

import torch

from pathlib import Path

from minfm_core.cli.main import main
from minfm_core.recipe import load_recipe

VAE = ("model.vae={name = 'wan', pretrained = '', base_dim = 8, z_dim = 4, dim_mult = [1, 1, 1, 1], "
       "num_res_blocks = 1, temperal_downsample = [false, true, true]}")
ROOT = Path(__file__).resolve().parent.parent
DATA = ("data={name = 'mix', period = 10, sources = ["
        "{dataset = {name = 'shapes', sizes = [[16, 16]], num_samples = 4, num_val_samples = 2}},"
        "{dataset = {name = 'moving_shapes', frames = 9, sizes = [[16, 32]], num_samples = 4, num_val_samples = 2}}]}")


def test_cache_latents_of_a_mix_of_images_and_clips(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'extends = "{ROOT / "recipes" / "quickstart.toml"}"\n')
    sets = [VAE, DATA, "model.denoiser.d_img=16", f"run.exp_dir={json.dumps(str(tmp_path / 'run'))}",
            "model.patchifier.patch_size=[1, 2, 2]"]
    out = tmp_path / "latents"
    args = ["cache", "latents", str(recipe), "--out", str(out), "--limit", "6", "--batch-size", "3"]
    for s in sets:
        args += ["--set", s]
    torch.manual_seed(0)  # the VAE's random weights: the same here and below
    assert main(args) == 0, capsys.readouterr().err
    index = json.loads((out / "train" / "index.json").read_text())["entries"]
    assert [e["size"][0] for e in index] == [1, 9, 1, 9, 1, 9]  # the mix alternates pictures and clips

    resolved = load_recipe(recipe, sets)
    live = resolved.build("data", split="train")
    torch.manual_seed(0)
    vae = resolved.build("model.vae")
    cached = load_recipe(recipe, [*sets, "data.use_cached_latents=true",
                                  f"data.latents_dir={json.dumps(str(out))}"]).build("data", split="train")
    assert len(cached) == 6
    for i in range(6):
        item, want = cached[i], live[i]
        assert item["prompt"] == want["prompt"]
        z = item["latent"]
        frames = want["image"].shape[1]
        assert tuple(z.shape) == ((4, 1, 2, 2) if frames == 1 else (4, 3, 2, 4))
        # the cache holds what encoding the item gives (the VAE's random weights are seeded alike)
        assert torch.allclose(z, vae.encode([want["image"]])[0], atol=1e-5)


def test_training_steps_on_wan_latents_of_pictures_and_clips(tmp_path, runtime):
    """The trainer encodes a mixed micro-batch with the Wan VAE (pictures -> 1 latent frame, 9-frame
    clips -> 3) and packs the latents; a step changes the weights and the loss is finite."""
    from minfm_core.engine.train import Trainer

    recipe = tmp_path / "r.toml"
    recipe.write_text(f'extends = "{ROOT / "recipes" / "quickstart.toml"}"\n')
    sets = [VAE, DATA, "model.denoiser.d_img=16", f"run.exp_dir={json.dumps(str(tmp_path / 'run'))}",
            "train.batch_size=4", "train.total_batch_size=4", "train.max_steps=2", "train.val_every=0",
            "train.sample_every=0", "train.ckpt_every=0", "logging.loggers=[]",
            "model.denoiser.compile=false"]  # two steps: compiling would cost more than the test
    trainer = Trainer(load_recipe(recipe, sets), runtime)
    batch = next(iter(trainer.batches))
    latents = trainer.pipe.encode_images(batch, [torch.Generator()] * len(batch))
    assert sorted({z.shape[1] for z in latents}) == [1, 3]
    before = [p.detach().clone() for p in trainer.params]
    trainer.batches = iter([batch, batch])
    metrics = trainer.train_step()
    assert torch.isfinite(torch.tensor(metrics["loss"])) and metrics["skipped"] == 0.0
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.params))
    trainer.close()
