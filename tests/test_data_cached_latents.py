"""Cached latents for every built-in dataset: `minfm cache latents` -> the shared reader -> training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from engine_helpers import losses, tiny
from minfm_core.cli.main import main
from minfm_core.engine.pipeline import prepare_batch
from minfm_core.engine.train import Trainer, train
from minfm_core.errors import MinfmError
from minfm_plugins.data.latents import CachedLatentsDataset

TINY_AE = dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4, latent_channels=4)
SHAPES = ("data.num_samples=7", "data.num_val_samples=3")
SHAPES_16 = (*SHAPES, "data.sizes=[[16, 16], [16, 32], [32, 16]]", "data.size_multiple=16")  # 8x VAE x 2x patch


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKL

    from minfm_plugins.vae.configs import FluxAEConfig
    from minfm_plugins.vae.flux_ae import diffusers_config

    folder = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    AutoencoderKL(**diffusers_config(FluxAEConfig(pretrained=None, **TINY_AE))).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for i, (w, h) in enumerate([(40, 32), (32, 48), (64, 32), (32, 32), (48, 48)]):
        pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"picture number {i}")
    return root


def flux(vae_folder: Path) -> tuple[str, ...]:
    """Overrides turning the identity-VAE tiny recipe into a tiny random flux_ae one (8x, 4 channels)."""
    return ("model.vae.name=flux_ae", f"model.vae.pretrained={json.dumps(str(vae_folder))}", "model.vae.dtype=fp32",
            "model.vae.sample_posterior=false", *(f"model.vae.{k}={json.dumps(v)}" for k, v in TINY_AE.items()),
            "model.denoiser.d_img=16")


def folder_data(root: Path) -> tuple[str, ...]:
    return ("data.name=image_folder", f"data.root={json.dumps(str(root))}", "data.val_fraction=0.0",
            "data.max_pixels=1024", "data.size_multiple=16")


def cache(exp: Path, overrides: tuple[str, ...], out: Path, *args: str) -> None:
    """`minfm cache latents` in-process, on the recipe tiny() resolves with these overrides."""
    from engine_helpers import TINY

    sets = [a for o in (f"run.exp_dir={json.dumps(str(exp))}", *overrides) for a in ("--set", o)]
    assert main(["cache", "latents", str(TINY), *sets, "--out", str(out), "--shard-size", "3", *args]) == 0


def cached(overrides: tuple[str, ...], out: Path) -> tuple[str, ...]:
    return (*overrides, "data.use_cached_latents=true", f"data.latents_dir={json.dumps(str(out))}")


CASES = {
    "shapes-identity": lambda vf, root: SHAPES,
    "shapes-flux_ae": lambda vf, root: (*SHAPES_16, *flux(vf)),
    "image_folder-identity": lambda vf, root: folder_data(root),
    "image_folder-flux_ae": lambda vf, root: (*folder_data(root), *flux(vf)),
}


@pytest.mark.parametrize("case", CASES)
def test_cached_latents_equal_on_the_fly_encoding(case, tmp_path, vae_folder, image_root):
    overrides = CASES[case](vae_folder, image_root)
    out = tmp_path / "latents"
    splits = ("--split", "train", "--split", "val") if case.startswith("shapes") else ()
    cache(tmp_path / "exp", overrides, out, *splits)
    images = tiny(tmp_path / "exp", *overrides)
    from_cache = tiny(tmp_path / "exp", *cached(overrides, out))
    vae = images.build("model.vae")
    for split in ("train", "val") if splits else ("train",):
        ds, cds = images.build("data", split=split), from_cache.build("data", split=split)
        assert isinstance(cds, CachedLatentsDataset) and len(cds) == len(ds) > 1
        items = [ds[i] for i in range(len(ds))]
        with torch.no_grad():
            expected = vae.encode([it["image"] for it in items])
        shapes = set()
        for i, (item, z) in enumerate(zip(items, expected)):
            got = cds[i]
            # exactly the sample an image item becomes once encoded: same keys, prompt, label, latent
            assert set(got) == (set(item) - {"image"}) | {"latent"}
            assert got["prompt"] == item["prompt"] == cds.prompt(i) and got.get("label") == item.get("label")
            assert got["latent"].dtype == torch.float32 and got["latent"].shape == z.shape
            torch.testing.assert_close(got["latent"], z, rtol=1e-5, atol=1e-5)
            shapes.add(tuple(z.shape))
        assert len(shapes) > 1  # mixed sizes went through
        if "flux_ae" in case:
            assert all(s[0] == 4 for s in shapes)


def test_image_folder_flips_follow_p_flip(tmp_path, image_root):
    out = tmp_path / "latents"
    cache(tmp_path / "exp", folder_data(image_root), out)  # encode unflipped images
    never = tiny(tmp_path / "exp", *cached(folder_data(image_root), out)).build("data")
    always = tiny(tmp_path / "exp", *cached(folder_data(image_root), out), "data.p_flip=1.0").build("data")
    flipped = tiny(tmp_path / "exp", *folder_data(image_root), "data.p_flip=1.0").build("data")
    for i in range(len(never)):
        # identity VAE: the flipped latent is exactly the flipped image
        assert torch.equal(always[i]["latent"], never[i]["latent"].flip(-1))
        assert torch.equal(always[i]["latent"], flipped[i]["image"])


def test_a_training_step_on_cached_latents_equals_one_on_images(tmp_path, vae_folder, runtime):
    one_batch = ("train.batch_size=4", "train.total_batch_size=4", "train.text_dropout=0.0")
    overrides = (*SHAPES_16, *flux(vae_folder), *one_batch)
    out = tmp_path / "latents"
    cache(tmp_path / "exp", overrides, out)
    on_images = Trainer(tiny(tmp_path / "a", *overrides), runtime)
    on_cache = Trainer(tiny(tmp_path / "b", *cached(overrides, out)), runtime)
    assert "latent" in on_cache.dataset[0] and "image" not in on_cache.dataset[0]
    idx = [0, 3, 5, 6]
    for trainer in (on_images, on_cache):  # the same items, times and noise for both
        trainer.batches = iter([[trainer.dataset[i] for i in idx]])
        trainer.make_batch = lambda s, tr=trainer: prepare_batch(
            tr.pipe, s, tr.generator, 0.0, t=torch.tensor([0.2, 0.4, 0.6, 0.8]), noise_seeds=idx)
    m1, m2 = on_images.train_step(), on_cache.train_step()
    assert m1["skipped"] == m2["skipped"] == 0.0
    assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-4)
    assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-3)
    on_images.close()
    on_cache.close()


def test_train_runs_on_cached_shapes(tmp_path):
    out = tmp_path / "latents"
    cache(tmp_path / "exp", SHAPES, out)
    assert train(tiny(tmp_path / "run", *cached(SHAPES, out), "train.max_steps=2")) == 0
    got = losses(tmp_path / "run")
    assert len(got) == 2 and all(0 < x < 10 for x in got)


def test_training_names_settings_changed_since_the_cache_was_made(tmp_path, runtime):
    """They took no effect (the run reads the cached latents), and nothing said so."""
    import warnings

    from minfm_core.errors import MinfmWarning

    out = tmp_path / "latents"
    cache(tmp_path / "exp", SHAPES, out)
    # the record has use_cached_latents = false and no latents_dir: where the cache is read is not what it holds
    for i, (changes, named) in enumerate([((), None),
                                          (("data.jitter=0.2", "data.caption='short'"), "data.caption, data.jitter")]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Trainer(tiny(tmp_path / f"run{i}", *cached(SHAPES, out), *changes), runtime).close()
        said = [str(w.message) for w in caught if issubclass(w.category, MinfmWarning)]
        if named is None:
            assert not said, said
        else:
            assert said == [f"data.latents_dir: {out / 'train'} was cached with other {named}: this run trains on "
                            "the cached latents, so the recipe's values take no effect until `minfm cache latents` "
                            "makes the cache again"], said


@pytest.mark.parametrize("overrides", [SHAPES, ("data.name=image_folder",), ("data.name=imagenet",)],
                         ids=["shapes", "image_folder", "imagenet"])
def test_missing_cache_is_a_clear_error(tmp_path, overrides):
    with pytest.raises(MinfmError, match="needs 'latents_dir'"):
        tiny(tmp_path, *overrides, "data.use_cached_latents=true").build("data")
    with pytest.raises(MinfmError, match=r"no index.json in .*nope.*no such folder.*minfm cache latents"):
        tiny(tmp_path, *cached(overrides, tmp_path / "nope")).build("data")
    (tmp_path / "afile").write_text("x")  # reported missing too
    with pytest.raises(MinfmError, match=r"no index.json in .*afile.*: a file, not a folder; write it"):
        tiny(tmp_path, *cached(overrides, tmp_path / "afile")).build("data")
    (tmp_path / "half" / "train").mkdir(parents=True)  # an interrupted run: shards but no index yet
    with pytest.raises(MinfmError, match=r"no index.json .*missing or unfinished.*--split train"):
        tiny(tmp_path, *cached(overrides, tmp_path / "half")).build("data")


def test_cli_names_the_missing_cache(tmp_path):
    from conftest import minfm_in_process as minfm
    from engine_helpers import TINY

    sets = (f"run.exp_dir={json.dumps(str(tmp_path))}", *cached((), tmp_path / "nope"))
    res = minfm("run", str(TINY), *(a for o in sets for a in ("--set", o)))
    assert res.returncode == 2 and "no index.json" in res.stderr and "Traceback" not in res.stderr


def _cache_of(folder: Path, entry: dict, tensor: torch.Tensor | None = None, raw: bytes | None = None) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if raw is not None:
        (folder / "s.safetensors").write_bytes(raw)
    else:
        save_file({"k": torch.zeros(3, 1, 4, 4) if tensor is None else tensor}, folder / "s.safetensors")
    (folder / "index.json").write_text(json.dumps([{"shard": "s.safetensors", "key": "k", "prompt": "p", **entry}]))
    return folder


def _header_only() -> bytes:
    # a header of sane length whose offsets the file does not cover: past check_header, refused by safe_open
    import struct

    head = json.dumps({"k": {"dtype": "F32", "shape": [3, 1, 8, 8], "data_offsets": [0, 768]}}).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head


@pytest.mark.parametrize("entry, tensor, raw, message", [
    ({"label": "abc"}, None, None, "entry 0: label abc is not a class number"),
    ({"label": -5}, None, None, "entry 0: label -5 is not a class number"),
    ({"label": 2.7}, None, None, "entry 0: label 2.7 is not a class number"),
    ({"label": True}, None, None, "entry 0: label True is not a class number"),
    ({"prompt": 12345}, None, None, "entry 0: 'prompt' must be text, got int"),
    ({}, torch.zeros(3, 1, 0, 4), None, "not a latent (C, [F,] h, w) of finite numbers: (3, 1, 0, 4)"),
    ({}, torch.full((3, 1, 4, 4), float("nan")), None, "not a latent (C, [F,] h, w) of finite numbers"),
    ({}, torch.zeros(7), None, "not a latent (C, [F,] h, w) of finite numbers: (7,)"),
    ({}, None, _header_only(), "is not a readable safetensors file"),
    # finite in float64, inf once training takes it as float32: every step then skipped
    ({}, torch.full((3, 1, 4, 4), 1e300, dtype=torch.float64), None, "of finite numbers: torch.float32"),
    ({}, torch.zeros(3, 1, 4, 4, dtype=torch.float8_e4m3fn), None, "of finite numbers: torch.float8_e4m3fn"),
    ({}, torch.zeros(3, 1, 4, 4, dtype=torch.int32), None, "of finite numbers: torch.int32"),
], ids=["label-text", "label-negative", "label-float", "label-bool", "prompt-int", "empty", "nan", "1d", "offsets",
        "float64-past-float32", "float8", "int"])
def test_a_hostile_cache_entry_or_latent_is_one_line(tmp_path, entry, tensor, raw, message):
    folder = _cache_of(tmp_path / "c", entry, tensor, raw)
    with pytest.raises(MinfmError) as info:
        CachedLatentsDataset("shapes", str(folder), "train")[0]
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_a_label_outside_the_class_table_is_refused(tmp_path):
    folder = _cache_of(tmp_path / "c", {"label": 5000})
    with pytest.raises(MinfmError, match=r"label 5000 is not a class number in 0\.\.999"):
        CachedLatentsDataset("imagenet", str(folder), "train", label_prompts=["x"] * 1000)


def test_a_corrupt_shard_record_of_cache_latents_is_one_line(tmp_path, capsys):
    from engine_helpers import TINY

    out = tmp_path / "l"
    args = ["cache", "latents", str(TINY), "--out", str(out), "--set", "data.num_samples=16", "--shard-size", "8"]
    assert main(args) == 0
    (out / "train" / "index.json").unlink()
    (out / "train" / "part-00001.json").write_text('[{"shard": "part-0')
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "part-00001.json: not valid JSON" in err, err


def test_cache_latents_reuses_shards_only_for_the_same_request(tmp_path, capsys):
    from engine_helpers import TINY

    out = tmp_path / "l"
    base = ["cache", "latents", str(TINY), "--out", str(out), "--shard-size", "8"]
    assert main([*base, "--set", "data.num_samples=16"]) == 0
    assert main([*base, "--set", "data.num_samples=16"]) == 0  # the same: every shard reused
    assert "skipped 2 finished" in capsys.readouterr().out
    shard = (out / "train" / "part-00001.safetensors").read_bytes()
    (out / "train" / "part-00001.safetensors").unlink()  # gone, its record kept: encoded again
    assert main([*base, "--set", "data.num_samples=16"]) == 0
    assert "encoded 1 shard(s), skipped 1 finished" in capsys.readouterr().out
    assert (out / "train" / "part-00001.safetensors").read_bytes() == shard
    # more items, or another shard size: the old shards would be reused stale, or duplicated
    assert main([*base, "--set", "data.num_samples=32"]) == 2
    assert "holds a cache of another request (different items, request)" in capsys.readouterr().err
    assert main(["cache", "latents", str(TINY), "--out", str(out), "--shard-size", "4", "--set", "data.num_samples=16"]) == 2
    assert "(different shard_size)" in capsys.readouterr().err
    entries = json.loads((out / "train" / "index.json").read_text())["entries"]
    assert len(entries) == 16 and len({e["key"] for e in entries}) == 16


def test_a_cache_of_another_vae_is_refused_at_the_first_batch(tmp_path):
    """A 4-channel flux_ae cache trained with the identity VAE's 3 channels ended in a matmul
    shape error (a traceback, exit 1)."""
    out = tmp_path / "latents"
    for split in ("train", "val"):
        _cache_of(out / split, {}, torch.zeros(4, 1, 16, 16))
    with pytest.raises(MinfmError, match="a cached latent has 4 channels, but model.vae makes 3"):
        train(tiny(tmp_path / "run", *cached(SHAPES, out), "train.max_steps=1"))


def test_a_cached_latent_larger_than_any_picture_is_refused_at_the_first_batch(tmp_path):
    """A 394 KB shard of a latent 16,400 pixels tall (past the MAX_SIDE no recipe size may
    pass) trained; a 12 MB one of 1024 x 1024 (16k x 16k pixels decoded) held step 1 of the
    tiny model for over ten minutes."""
    out = tmp_path / "latents"
    for split in ("train", "val"):
        _cache_of(out / split, {}, torch.zeros(3, 1, 16400, 2))
    with pytest.raises(MinfmError) as info:
        train(tiny(tmp_path / "run", *cached(SHAPES, out), "train.max_steps=1"))
    assert str(info.value) == ("data: a cached latent of shape (3, 1, 16400, 2) is 1 frame(s) of 2x16400 pixels decoded "
                               "(model.vae compresses 1x1x1); at most 1024 frames of 16383 pixels a side and 89,478,485 "
                               "pixels are read: was the cache (data.latents_dir) made for another data size? "
                               "(minfm cache latents)")


@pytest.mark.parametrize("shape, ok", [((16, 1, 64, 64), True), ((16, 1, 1024, 1024), True), ((16, 1, 1200, 1200), False), ((16, 1, 1, 2048), False),
                                       ((16, 256, 8, 8), True), ((16, 257, 8, 8), False), ((4, 1, 8, 8), False)])
def test_cached_latents_are_held_to_the_bounds_of_pictures_and_clips(shape, ok):
    from minfm_core.engine.pipeline import check_cached_latent

    x = torch.empty(shape, device="meta")
    if ok:
        check_cached_latent(x, 16, (4, 8, 8))  # a video VAE: frames (F - 1) x 4 + 1
    else:
        with pytest.raises(MinfmError, match="^data: a cached latent"):
            check_cached_latent(x, 16, (4, 8, 8))


def test_a_prompt_is_bounded_as_a_caption_is(tmp_path):
    """An 8 MB prompt in a hand-made index went to the text encoder whole (captions: 1 MiB)."""
    folder = _cache_of(tmp_path / "c", {"prompt": "x" * ((1 << 20) + 1)})
    with pytest.raises(MinfmError, match=r"shapes: .*index.json: entry 0: 'prompt': a caption of 1,048,577 bytes is "
                                         r"more than the 1,048,576 accepted"):
        CachedLatentsDataset("shapes", str(folder), "train")


@pytest.mark.parametrize("files", [["index.json", "part-00000.safetensors"], ["index.json"], ["part-00000.safetensors"]])
def test_cache_latents_does_not_replace_files_without_a_record(tmp_path, capsys, files):
    """A folder holding an index.json or shards but no cache.json (no part-*.json either) had
    them overwritten, exit 0."""
    from engine_helpers import TINY

    out = tmp_path / "l"
    (out / "train").mkdir(parents=True)
    for name in files:
        (out / "train" / name).write_text("mine")
    assert main(["cache", "latents", str(TINY), "--out", str(out), "--set", "data.num_samples=4"]) == 2
    assert "holds shards or an index.json without a cache.json record" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(files)
    assert all((out / "train" / name).read_text() == "mine" for name in files)


def test_a_cache_the_patch_cannot_cut_is_named_at_the_first_batch(tmp_path):
    """A cache made at a size the recipe no longer has failed with the patchifier's "pick an
    image size", naming neither the cache nor the fix."""
    out = tmp_path / "latents"
    for split in ("train", "val"):
        _cache_of(out / split, {}, torch.zeros(3, 1, 15, 15))  # tiny's patch is 2x2
    with pytest.raises(MinfmError, match=r"^data: a cached latent \(data.latents_dir\) does not fit model.patchifier: "
                                         r"patch3d: .*\(3, 1, 15, 15\).*remake it: minfm cache latents"):
        train(tiny(tmp_path / "run", *cached(SHAPES, out), "train.max_steps=1"))
