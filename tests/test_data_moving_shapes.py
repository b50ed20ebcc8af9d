"""The built-in ``moving_shapes`` clips: deterministic, truthfully captioned, read back by their classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minfm_core.cli.main import main
from minfm_core.config import structure
from minfm_core.errors import RecipeError
from minfm_core.registry import get_registry
from minfm_plugins.data.configs import MOTIONS, MovingShapesConfig
from minfm_plugins.data.moving_shapes import caption, classify_clip
from minfm_plugins.data.shapes import PALETTE

RECIPE = "recipes/quickstart.toml"


def make(split: str = "train", **kw):
    comp = get_registry().get("dataset", "moving_shapes")
    return comp.build(structure(kw, comp.config), split=split)


def test_items_are_clips_with_the_configured_frames_and_sizes():
    ds = make(num_samples=20, frames=9, sizes=[[32, 48], [48, 32]])
    for i in range(20):
        x = ds[i]["image"]
        assert x.dtype == torch.float32 and x.shape[0] == 3 and x.shape[1] == 9
        assert tuple(x.shape[2:]) in {(32, 48), (48, 32)}
        assert float(x.min()) >= -1 and float(x.max()) <= 1
    assert make(num_samples=3, frames=17)[0]["image"].shape[1] == 17


def test_same_index_same_clip_and_val_differs():
    a, b = make(num_samples=40), make(num_samples=40)
    assert all(torch.equal(a[i]["image"], b[i]["image"]) and a[i]["prompt"] == b[i]["prompt"] for i in range(0, 40, 7))
    val = make("val", num_val_samples=40)
    assert sum(torch.equal(a[i]["image"], val[i]["image"]) for i in range(40)) < 5


def test_captions_name_colour_shape_and_motion_and_the_pixels_agree():
    ds = make(num_samples=200, frames=9)
    seen = set()
    for i in range(200):
        spec, item = ds.spec(i), ds[i]
        seen.add(spec.motion)
        assert item["prompt"] == caption(spec.colour, spec.shape, spec.motion)
        assert item["prompt"] == (f"a {spec.colour} {spec.shape} standing still" if spec.motion == "still"
                                  else f"a {spec.colour} {spec.shape} moving {spec.motion}")
        x = item["image"]
        want = torch.tensor(PALETTE[spec.colour]) / 127.5 - 1
        for f in (0, spec.frames - 1):  # the shape's centre pixel has its colour in the first and last frame
            cx, cy = spec.path[f]
            assert torch.allclose(x[:, f, int(cy), int(cx)], want, atol=1e-5), (i, f)
        (x0, y0), (x1, y1) = spec.path[0], spec.path[-1]
        dx, dy = x1 - x0, y1 - y0
        moved = {"left": dx < -5 and dy == 0, "right": dx > 5 and dy == 0, "up": dy < -5 and dx == 0,
                 "down": dy > 5 and dx == 0, "still": dx == 0 and dy == 0}
        assert moved[spec.motion], (i, spec.motion, dx, dy)
    assert seen == set(MOTIONS)


def test_the_classifier_reads_every_real_clip():
    ds = make("val", num_val_samples=150, frames=9, colours=["red", "green", "blue", "yellow", "orange", "purple"])
    for i in range(150):
        spec = ds.spec(i)
        got = classify_clip(ds[i]["image"])
        assert (got["colour"], got["shape"], got["motion"]) == (spec.colour, spec.shape, spec.motion), (i, spec, got)


def test_the_classifier_takes_uint8_frames_and_reads_a_blank_clip_as_nothing():
    ds = make(num_samples=5, frames=5)
    x = ds[0]["image"]
    frames = ((x.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    assert classify_clip(frames)["motion"] == ds.spec(0).motion
    blank = np.full((5, 32, 32, 3), 255, np.uint8)
    assert classify_clip(blank) == {"colour": None, "shape": None, "motion": None, "background": "white"}
    # the first frame held for the whole clip reads as still; the clip played backwards reverses its motion
    assert classify_clip(torch.cat([x[:, :1]] * 5, dim=1))["motion"] == "still"
    reverse = {"left": "right", "right": "left", "up": "down", "down": "up", "still": "still"}
    for i in range(5):
        clip = ds[i]["image"]
        assert classify_clip(clip.flip(1))["motion"] == reverse[ds.spec(i).motion]


def test_motions_can_be_restricted():
    ds = make(num_samples=60, motions=["up", "still"])
    assert {ds.spec(i).motion for i in range(60)} == {"up", "still"}
    assert set(ds.short_prompts()) >= {"a red circle moving up", "a red circle standing still"}


@pytest.mark.parametrize(("setting", "where"), [
    ("frames = 1", "data.frames: "), ("frames = 300", "data.frames: "), ("travel = 0.0", "data.travel: "),
    ("motions = ['sideways']", "data.motions: "), ("sizes = [[30, 32]]", "data.sizes: "),
    # a large shape fills its canvas: 0 pixels to move, yet the clips were captioned "moving left"
    ("scales = ['large']", ("data.scales: a large shape on a 32 x 32 canvas can move 0% of the side at most, "
                            "less than the 12% that reads as motion")),
    ("travel = 0.05", "data.travel: "), ("sizes = [[4096, 4096]]", "data.sizes: "),
])
def test_bad_settings_name_their_recipe_path(setting, where, capsys):
    key, _, value = setting.partition(" = ")
    rc = main(["check", RECIPE, "--set", f"data={{name = \"moving_shapes\", {key} = {value}}}"])
    err = capsys.readouterr().err
    assert rc == 2 and where in err and "Traceback" not in err, err


def test_default_config_is_valid():
    cfg = MovingShapesConfig()
    assert cfg.frames == 9 and cfg.motions == MOTIONS
    with pytest.raises(RecipeError, match="frames"):
        structure({"frames": 0}, MovingShapesConfig, path="data")


def test_large_shapes_with_room_to_move_are_captioned_as_they_move():
    """The config lets scales = ['large'] through only where every clip moves as far as classify_clip reads."""
    ds = make(num_samples=6, frames=5, sizes=[[96, 96]], shapes=["circle", "square"], scales=["large"],
              motions=["left", "down"])
    assert make(num_samples=1, scales=["large"], motions=["still"]).spec(0).motion == "still"  # nothing to move
    for i in range(6):
        assert classify_clip(ds[i]["image"])["motion"] == ds.spec(i).motion
