"""The built-in ``shapes`` dataset: deterministic, captioned truthfully, mixed sizes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from minfm_core.config import structure
from minfm_core.errors import RecipeError
from minfm_core.registry import get_registry
from minfm_plugins.data.configs import SHAPE_COLOURS, ShapesConfig
from minfm_plugins.data.shapes import BACKGROUNDS, PALETTE, classify_image


def make(split: str = "train", **kw):
    comp = get_registry().get("dataset", "shapes")
    return comp.build(structure(kw, comp.config), split=split)


def test_same_index_same_sample_in_another_process():
    ds = make(num_samples=50)
    a = ds[17]
    code = (
        "from minfm_core.config import structure; from minfm_core.registry import get_registry;"
        "c = get_registry().get('dataset', 'shapes'); ds = c.build(structure({'num_samples': 50}, c.config));"
        "s = ds[17]; print(s['prompt']); print(float(s['image'].sum()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == a["prompt"]
    assert float(out[1]) == pytest.approx(float(a["image"].sum()), abs=1e-3)
    assert torch.equal(make(num_samples=50)[17]["image"], a["image"])


def test_val_split_draws_other_samples():
    train, val = make(num_samples=64), make("val", num_val_samples=64)
    assert len(val) == 64
    same = sum(torch.equal(train[i]["image"], val[i]["image"]) for i in range(64))
    assert same < 16  # a few coincide by chance (few attribute combinations), most differ


@pytest.mark.parametrize("background", ["white", "black", "gray"])
def test_caption_colour_is_the_pixel_colour_at_the_shape_centre(background):
    ds = make(num_samples=200, colours=list(SHAPE_COLOURS), backgrounds=[background])
    for i in range(200):
        spec, sample = ds.spec(i), ds[i]
        img = sample["image"]
        assert spec.colour in sample["prompt"] and spec.shape in sample["prompt"]
        assert sample["prompt"].startswith(f"a {spec.colour} {spec.shape}") or sample["prompt"] == (
            f"a {spec.scale} {spec.colour} {spec.shape} on a {background} background"
        )
        centre = img[:, 0, int(spec.cy), int(spec.cx)]
        expected = torch.tensor(PALETTE[spec.colour], dtype=torch.float32) / 127.5 - 1
        assert torch.allclose(centre, expected, atol=1e-5), (i, spec)
        corner = img[:, 0, 0, 0]
        assert torch.allclose(corner, torch.tensor(BACKGROUNDS[background], dtype=torch.float32) / 127.5 - 1, atol=1e-5)


def test_sizes_are_mixed_multiples_and_images_in_range():
    ds = make(num_samples=300)
    shapes = set()
    for i in range(300):
        img = ds[i]["image"]
        assert img.dtype == torch.float32 and img.shape[:2] == (3, 1)
        assert img.shape[2] % 16 == 0 and img.shape[3] % 16 == 0
        assert img.min() >= -1 and img.max() <= 1
        shapes.add(tuple(img.shape[2:]))
    assert shapes == {(32, 32), (32, 48), (48, 32)}


def test_attributes_are_balanced_and_labels_consistent():
    ds = make(num_samples=1200)
    counts: dict[str, int] = {}
    for i in range(1200):
        spec = ds.spec(i)
        counts[spec.colour] = counts.get(spec.colour, 0) + 1
    for i in range(50):
        spec = ds.spec(i)
        assert ds[i]["label"] == ds.cfg.colours.index(spec.colour) * 3 + ds.cfg.shapes.index(spec.shape)
    assert set(counts) == {"red", "green", "blue", "yellow"}
    assert min(counts.values()) > 240


def test_caption_styles():
    assert make(colours=["red", "blue"], shapes=["circle"]).short_prompts() == ["a red circle", "a blue circle"]
    assert all(make(num_samples=20, caption="short")[i]["prompt"].count(" ") == 2 for i in range(20))
    assert all("background" in make(num_samples=20, caption="long")[i]["prompt"] for i in range(20))


def test_classifier_reads_back_every_attribute():
    ds = make(num_samples=300, colours=list(SHAPE_COLOURS), backgrounds=list(BACKGROUNDS))
    for i in range(300):
        spec = ds.spec(i)
        got = classify_image(ds[i]["image"])
        assert got == {"colour": spec.colour, "shape": spec.shape, "background": spec.background}, (i, spec)
    blank = torch.ones(3, 1, 32, 32)
    assert classify_image(blank)["colour"] is None


def test_config_errors_name_the_field():
    comp = get_registry().get("dataset", "shapes")
    with pytest.raises(RecipeError, match=r"data.sizes: .*\(40, 32\).*size_multiple=16"):
        structure({"sizes": [[40, 32]]}, comp.config, "data")
    with pytest.raises(RecipeError, match="unknown 'pink'"):
        structure({"colours": ["pink"]}, comp.config, "data")
    assert ShapesConfig(size_multiple=8, sizes=((40, 32),)).sizes == ((40, 32),)


def test_a_canvas_past_the_drawing_bound_is_refused():
    """16,384 x 16,384 passed: drawn 4x larger, 13 GB a sample."""
    from minfm_plugins.data.configs import MAX_SHAPE_SIDE

    with pytest.raises(RecipeError, match=r"data.sizes: "):
        structure({"sizes": [[MAX_SHAPE_SIDE + 16, 32]]}, ShapesConfig, "data")
    assert structure({"sizes": [[MAX_SHAPE_SIDE, 32]]}, ShapesConfig, "data").sizes == ((MAX_SHAPE_SIDE, 32),)


def test_rng_for_counts_every_bit_of_the_seed_and_keeps_the_low_seeds_streams():
    import numpy as np

    from minfm_plugins.data.images import rng_for

    assert rng_for(0, 1, 2).random() != rng_for(2**32, 1, 2).random()  # were the same stream
    assert rng_for(7, 1, 2).random() == np.random.default_rng([7, 1, 2]).random()  # as before
