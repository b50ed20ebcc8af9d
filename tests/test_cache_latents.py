"""`minfm cache latents`: shards + index, resume without re-encoding, ranks, equality with on-the-fly encoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import minfm_call

VAE = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4)


@pytest.fixture
def minfm():
    return minfm_call  # the commands in this process; the two-rank ones (env) as processes


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKL

    from minfm_plugins.vae.configs import FluxAEConfig
    from minfm_plugins.vae.flux_ae import diffusers_config

    folder = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    AutoencoderKL(**diffusers_config(FluxAEConfig(pretrained=None, **VAE))).save_pretrained(folder)
    return folder


def recipe(tmp_path: Path, vae_folder: Path, sample_posterior: bool = False) -> Path:
    text = f"""
[run]
exp_dir = "{tmp_path / 'exp'}"

[model.denoiser]
name = "flux"
flavor = "flux-debug"
d_img = 16

[model.vae]
name = "flux_ae"
pretrained = "{vae_folder}"
dtype = "fp32"
sample_posterior = {str(sample_posterior).lower()}
block_out_channels = [8, 16]
layers_per_block = 1
norm_num_groups = 4
latent_channels = 4

[model.text_encoder]
name = "vocab"
dim = 64

[model.clip_encoder]
name = "vocab"
dim = 32
pooled = true

[model.patchifier]
name = "patch3d"
patch_size = [1, 2, 2]

[data]
name = "shapes"
sizes = [[16, 16], [16, 24], [24, 16]]
size_multiple = 8
num_samples = 10
num_val_samples = 3
"""
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def on_the_fly(recipe_path: Path, split: str = "train"):
    from minfm_core.recipe import load_recipe

    r = load_recipe(recipe_path)
    ds, vae = r.build("data", split=split), r.build("model.vae")
    items = [ds[i] for i in range(len(ds))]
    return items, vae.encode([it["image"] for it in items])


def test_latents_cache_equals_on_the_fly_encoding(tmp_path, vae_folder, minfm):
    path = recipe(tmp_path, vae_folder)
    out = tmp_path / "latents"
    res = minfm("cache", "latents", str(path), "--out", str(out), "--shard-size", "4", "--batch-size", "3",
                "--split", "train", "--split", "val")
    assert res.returncode == 0, res.stderr
    assert "encoded 3 shard(s), skipped 0 finished; index of 10 items written" in res.stdout
    index = json.loads((out / "train" / "index.json").read_text())["entries"]
    assert len(index) == 10 and sorted({e["shard"] for e in index}) == [f"part-0000{i}.safetensors" for i in range(3)]

    items, latents = on_the_fly(path)
    for e, item, z in zip(index, items, latents):
        assert e["prompt"] == item["prompt"] and e["label"] == item["label"] and e["size"] == list(item["image"].shape[1:])
    # the datasets' cached-latent reader gives the latents the VAE gives on the fly
    from minfm_core.config import structure
    from minfm_core.registry import get_registry

    comp = get_registry().get("dataset", "imagenet")
    cached = comp.build(structure({"use_cached_latents": True, "latents_dir": str(out), "p_flip": 0.0}, comp.config))
    assert len(cached) == 10
    for i, z in enumerate(latents):
        assert cached[i]["prompt"] == items[i]["prompt"]
        torch.testing.assert_close(cached[i]["latent"], z)
    val = json.loads((out / "val" / "index.json").read_text())["entries"]
    assert len(val) == 3 and {e["split"] for e in val} == {"val"}


def test_the_largest_seed_draws_posterior_samples(tmp_path, vae_folder, minfm):
    """Shard s draws with seed * 1_000_003 + s, which overflowed torch's generator past ~1.8e13."""
    from minfm_core.validators import MAX_SEED

    path = recipe(tmp_path, vae_folder, sample_posterior=True)
    out = tmp_path / "latents"
    res = minfm("cache", "latents", str(path), "--out", str(out), "--shard-size", "4", "--set", f"run.seed={MAX_SEED}")
    assert res.returncode == 0, res.stderr
    assert len(json.loads((out / "train" / "index.json").read_text())["entries"]) == 10


@pytest.mark.slow
def test_interrupted_run_resumes_without_re_encoding_finished_shards(tmp_path, vae_folder, minfm):
    path = recipe(tmp_path, vae_folder, sample_posterior=True)
    out = tmp_path / "latents"
    args = ("cache", "latents", str(path), "--out", str(out), "--shard-size", "4")
    assert minfm(*args).returncode == 0
    split = out / "train"
    first = {p.name: p.stat().st_mtime_ns for p in split.glob("part-*")}
    full = json.loads((split / "index.json").read_text())
    from safetensors.torch import load_file

    before = load_file(split / "part-00001.safetensors")
    # an interruption inside shard 1: its latents may be there, its completion marker is not
    (split / "part-00001.json").unlink()
    (split / "index.json").unlink()
    res = minfm(*args)
    assert res.returncode == 0, res.stderr
    assert "encoded 1 shard(s), skipped 2 finished; index of 10 items written" in res.stdout
    for name in ("part-00000.safetensors", "part-00000.json", "part-00002.safetensors", "part-00002.json"):
        assert (split / name).stat().st_mtime_ns == first[name]  # untouched
    assert json.loads((split / "index.json").read_text()) == full
    # posterior samples are seeded per shard: the re-encoded shard is the same
    after = load_file(split / "part-00001.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_ranks_split_the_shards_and_the_last_writes_the_index(tmp_path, vae_folder, minfm):
    path = recipe(tmp_path, vae_folder)
    out = tmp_path / "latents"
    args = ("cache", "latents", str(path), "--out", str(out), "--shard-size", "4", "--dtype", "bf16")
    r1 = minfm(*args, env={"RANK": "1", "WORLD_SIZE": "2"})
    assert r1.returncode == 0 and "encoded 1 shard(s)" in r1.stdout and "waiting for other ranks" in r1.stdout
    assert sorted(p.name for p in (out / "train").glob("part-*.json")) == ["part-00001.json"]
    r0 = minfm(*args, env={"RANK": "0", "WORLD_SIZE": "2"})
    assert r0.returncode == 0 and "encoded 2 shard(s)" in r0.stdout and "index of 10 items" in r0.stdout
    from safetensors.torch import load_file

    assert load_file(out / "train" / "part-00000.safetensors")["00000000"].dtype == torch.bfloat16


def test_a_recipe_without_data_is_a_user_error(tmp_path, vae_folder, minfm):
    path = recipe(tmp_path, vae_folder)
    path.write_text(path.read_text().split("[data]")[0])
    res = minfm("cache", "latents", str(path))
    assert res.returncode == 2 and "has no [data] section" in res.stderr and "Traceback" not in res.stderr


def test_latents_of_an_image_folder(tmp_path, vae_folder, minfm):
    from PIL import Image

    root = tmp_path / "images"
    root.mkdir()
    for i, (w, h) in enumerate([(32, 32), (48, 32), (32, 48)]):
        Image.new("RGB", (w, h), (40 * i, 200, 30)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"picture number {i}")
    path = recipe(tmp_path, vae_folder)
    text = path.read_text().split("[data]")[0]
    path.write_text(text + f'[data]\nname = "image_folder"\nroot = "{root}"\nval_fraction = 0.0\nmax_pixels = 1536\n')
    out = tmp_path / "latents"
    res = minfm("cache", "latents", str(path), "--out", str(out))
    assert res.returncode == 0, res.stderr
    entries = json.loads((out / "train" / "index.json").read_text())["entries"]
    assert sorted(e["prompt"] for e in entries) == [f"picture number {i}" for i in range(3)]
    from safetensors.torch import load_file

    shard = load_file(out / "train" / "part-00000.safetensors")
    for e in entries:
        f, h, w = e["size"]
        assert tuple(shard[e["key"]].shape) == (4, f, h // 2, w // 2)


def test_data_workers_encode_the_same_shards_and_report_a_bad_image_in_one_line(tmp_path, vae_folder, minfm):
    """`--dataloader-num-workers N`: N processes decode the pictures ahead of the VAE (an
    ImageNet-sized cache is bound by JPEG decoding in one process)."""
    from PIL import Image

    root = tmp_path / "images"
    root.mkdir()
    for i in range(7):
        Image.new("RGB", (32, 32), (30 * i, 200, 30)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"picture number {i}")
    path = recipe(tmp_path, vae_folder, sample_posterior=True)
    path.write_text(path.read_text().split("[data]")[0]
                    + f'[data]\nname = "image_folder"\nroot = "{root}"\nval_fraction = 0.0\n')
    files = {}
    for workers in ("0", "2"):
        out = tmp_path / f"latents{workers}"
        res = minfm("cache", "latents", str(path), "--out", str(out), "--shard-size", "3", "--batch-size", "2",
                    "--dataloader-num-workers", workers)
        assert res.returncode == 0, res.stderr
        assert "encoded 3 shard(s), skipped 0 finished; index of 7 items written" in res.stdout
        files[workers] = {p.name: p.read_bytes() for p in (out / "train").iterdir()}
    assert files["2"] == files["0"]  # shards, their records, the index and the request record

    (root / "img4.png").write_bytes(b"not a picture")
    res = minfm("cache", "latents", str(path), "--out", str(tmp_path / "bad"), "--shard-size", "3",
                "--dataloader-num-workers", "2")
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines()[-1] == (f"minfm: error: {root / 'img4.png'}: not a readable image "
                                           f"(cannot identify image file '{root / 'img4.png'}'); the shards "
                                           "finished before it are kept: fix or replace that item and run the "
                                           "command again to go on (removing it changes the item count: the "
                                           "cache is then another request's, to be made in another --out or "
                                           "after removing this one)")
    assert sorted(p.name for p in (tmp_path / "bad" / "train").iterdir()) == ["cache.json", "part-00000.json",
                                                                              "part-00000.safetensors"]
    # as the message says: the item replaced, the same command goes on from the next shard
    Image.new("RGB", (32, 32), (120, 200, 30)).save(root / "img4.png")
    res = minfm("cache", "latents", str(path), "--out", str(tmp_path / "bad"), "--shard-size", "3",
                "--dataloader-num-workers", "2")
    assert res.returncode == 0, res.stderr
    assert "encoded 2 shard(s), skipped 1 finished; index of 7 items written" in res.stdout


def test_a_dataset_that_cannot_read_the_cache_is_warned_about(tmp_path, capsys):
    import torch

    from engine_helpers import TINY
    from minfm_core import config, field, hookimpl, protocols
    from minfm_core.cli.main import main
    from minfm_core.plugins import plugin

    @config
    class PlainConfig:
        """Two grey pictures, no cache fields."""

        n: int = field(2, doc="items")

    class Plain(protocols.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"image": torch.zeros(3, 1, 16, 16), "prompt": f"grey {i}"}

    class Probe:
        @hookimpl
        def register_datasets(self, register):
            register("plainset", lambda cfg, *, split="train": Plain(), PlainConfig)

    with plugin(Probe(), "probe"):
        assert main(["cache", "latents", str(TINY), "--set", 'data={name="plainset"}', "--out", str(tmp_path / "l")]) == 0
    err = capsys.readouterr().err
    assert "warning: dataset 'plainset' of plugin 'probe' has no use_cached_latents / latents_dir" in err
    assert (tmp_path / "l" / "train" / "index.json").is_file()


def test_a_mix_is_cached_unflipped_and_its_sources_flip_when_read(tmp_path, vae_folder, minfm):
    """A mix's sources kept their p_flip when cached: the epoch-0 flips were baked into the
    cache, and training from it (which read the mix without flips) never flipped again."""
    from PIL import Image
    from safetensors.torch import load_file

    from minfm_core.recipe import load_recipe

    root = tmp_path / "images"
    root.mkdir()
    for i in range(3):
        im = Image.new("RGB", (32, 32), (200, 30, 40 * i))
        im.paste((10, 10, 250), (0, 0, 12, 32))  # a band on the left: a flip shows
        im.save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"picture number {i}")
    path = recipe(tmp_path, vae_folder)

    def mix(p_flip: float, cached: bool = False) -> str:
        return (f'[data]\nname = "mix"\nperiod = 2\nuse_cached_latents = {str(cached).lower()}\nlatents_dir = "{out}"\n'
                '[[data.sources]]\nweight = 1.0\ndataset = { name = "shapes", sizes = [[16, 16]], size_multiple = 8, '
                'num_samples = 3, num_val_samples = 3 }\n[[data.sources]]\nweight = 1.0\n'
                f'dataset = {{ name = "image_folder", root = "{root}", val_fraction = 0.0, max_pixels = 256, '
                f'p_flip = {p_flip} }}\n')

    out = tmp_path / "latents"
    base = path.read_text().split("[data]")[0]
    path.write_text(base + mix(1.0))
    assert minfm("cache", "latents", str(path), "--out", str(out)).returncode == 0
    unflipped = tmp_path / "unflipped.toml"
    unflipped.write_text(base + mix(0.0))
    items, latents = on_the_fly(unflipped)
    entries = json.loads((out / "train" / "index.json").read_text())["entries"]
    shard = load_file(out / "train" / "part-00000.safetensors")
    assert len(entries) == len(items) == 6
    for e, want in zip(entries, latents):
        assert torch.allclose(shard[e["key"]], want.squeeze(1) if shard[e["key"]].dim() == 3 else want, atol=1e-5)
    # read back: the image_folder source (odd slots, p_flip 1) flips, shapes never does, per epoch
    cached = tmp_path / "cached.toml"
    cached.write_text(base + mix(1.0, cached=True))
    ds = load_recipe(cached).build("data", split="train")
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for i, e in enumerate(entries):
            stored = shard[e["key"]]
            stored = stored.unsqueeze(1) if stored.dim() == 3 else stored
            want = stored.flip(-1) if i % 2 == 1 else stored
            assert torch.equal(ds[i]["latent"], want), (epoch, i)
