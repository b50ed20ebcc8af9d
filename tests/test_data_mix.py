"""The ``mix`` dataset: weighted sources (images and clips) in one deterministic stream, strict config."""

from __future__ import annotations

import pytest
import torch

from minfm_core.cli.main import main
from minfm_core.config import structure
from minfm_core.data_loader import BatchIterator
from minfm_core.registry import get_registry
from minfm_plugins.data.mix import pattern, quotas

RECIPE = "recipes/quickstart.toml"
IMAGES = {"name": "shapes", "sizes": [[32, 32]], "num_samples": 100, "num_val_samples": 10}
CLIPS = {"name": "moving_shapes", "frames": 5, "sizes": [[32, 32]], "num_samples": 50, "num_val_samples": 10}


def make(split="train", **kw):
    comp = get_registry().get("dataset", "mix")
    return comp.build(structure(kw, comp.config, path="data"), split=split)


def test_quotas_and_pattern_meet_the_weights_exactly_per_period():
    assert quotas([1, 1], 10) == [5, 5]
    assert quotas([2, 1], 9) == [6, 3]
    assert sum(quotas([1, 1, 1], 10)) == 10 and sorted(quotas([1, 1, 1], 10)) == [3, 3, 4]
    assert quotas([1000, 1], 10) == [9, 1]  # every source keeps a slot
    p = pattern([6, 3])
    assert p.count(0) == 6 and p.count(1) == 3
    assert "000" not in "".join(map(str, p))  # spread out, not bunched: 0 0 1 0 0 1 ...


def test_items_come_from_the_sources_by_weight_and_are_deterministic():
    ds = make(period=12, sources=[{"weight": 2.0, "dataset": IMAGES}, {"weight": 1.0, "dataset": CLIPS}])
    # enough periods that both sources are covered whole: 100 / 8 -> 13 periods of 12
    assert len(ds) == 13 * 12
    kinds = [ds.locate(i)[0] for i in range(len(ds))]
    assert kinds.count(0) == 2 * kinds.count(1)
    images, clips = ds.sources
    for i in (0, 1, 2, 5, 77):
        k, j = ds.locate(i)
        item = ds[i]
        want = (images if k == 0 else clips)[j]
        assert item["prompt"] == want["prompt"] and torch.equal(item["image"], want["image"])
        assert item["image"].shape[1] == (1 if k == 0 else 5)
        assert ds.prompt(i) == item["prompt"]
    # each source's items are read in order, every one of them within an epoch of the mix
    assert {ds.locate(i)[1] for i in range(len(ds)) if kinds[i] == 0} == set(range(100))
    assert {ds.locate(i)[1] for i in range(len(ds)) if kinds[i] == 1} == set(range(50))
    again = make(period=12, sources=[{"weight": 2.0, "dataset": IMAGES}, {"weight": 1.0, "dataset": CLIPS}])
    assert [again.locate(i) for i in range(50)] == [ds.locate(i) for i in range(50)]


def test_batches_hold_images_and_clips_of_different_lengths():
    ds = make(num_samples=64, sources=[{"dataset": IMAGES}, {"dataset": {**CLIPS, "frames": 9}}])
    assert len(ds) == 64
    batch = next(BatchIterator(ds, 16, seed=3))
    frames = sorted(s["image"].shape[1] for s in batch)
    assert set(frames) == {1, 9}
    assert 3 <= frames.count(9) <= 13  # about half, shuffled
    val = make("val", sources=[{"dataset": IMAGES}, {"dataset": CLIPS}])
    assert len(val) == 1000  # one period (500 slots each) covers the 10 + 10 val samples


def test_the_default_mix_is_shapes_and_moving_shapes():
    ds = make(num_samples=10)
    assert [type(s).__name__ for s in ds.sources] == ["ShapesDataset", "MovingShapesDataset"]


@pytest.mark.parametrize(("value", "where"), [
    ("{name = 'mix', sources = []}", "data.sources: list at least one"),
    ("{name = 'mix', sources = [{weight = 0.0, dataset = {name = 'shapes'}}]}", "data.sources[0].weight: "),
    ("{name = 'mix', sources = [{weight = -1, dataset = {name = 'shapes'}}]}", "data.sources[0].weight: "),
    ("{name = 'mix', sources = [{dataset = {name = 'shapes'}}, {dataset = {name = 'moving_shapes', frames = 0}}]}",
     "data.sources[1].dataset.frames: "),
    ("{name = 'mix', sources = [{dataset = {name = 'shapez'}}]}", "data.sources[0].dataset.name: unknown dataset 'shapez'"),
    ("{name = 'mix', sources = [{dataset = {sizes = [[32, 32]]}}]}", "data.sources[0].dataset.name: "),
    ("{name = 'mix', sources = [{dataset = {name = 'mix'}}]}", "data.sources[0].dataset.name: a mix cannot hold"),
    ("{name = 'mix', sources = [{dataset = {name = 'shapes', colour = ['red']}}]}",
     "data.sources[0].dataset: unknown key 'colour' (did you mean 'colours'?)"),
    ("{name = 'mix', sources = [{wieght = 2, dataset = {name = 'shapes'}}]}", "data.sources[0]: unknown key 'wieght'"),
    ("{name = 'mix', period = 0}", "data.period: "),
    ("{name = 'mix', period = 1}", "data.period: 1 is shorter than the 2 sources"),
    ("{name = 'mix', num_samples = 0}", "data.num_samples: "),
    # one slot in a million for 10**8 pictures: an epoch of 10**14 samples, which `minfm run` died making
    (("{name = 'mix', period = 1000000, sources = [{weight = 1.0, dataset = {name = 'shapes', num_samples = 100000000}}, "
      "{weight = 1000000.0, dataset = {name = 'shapes'}}]}"),
     ("data.num_samples: unset, so an epoch covers every source whole: 100,000,000,000,000 samples, as sources[0]'s "
      "100,000,000 train items take 1 of every 1,000,000 slots; at most 100,000,000")),
    (("{name = 'mix', period = 1000000, sources = [{weight = 1.0, dataset = {name = 'moving_shapes', "
      "num_samples = 50, num_val_samples = 1000}}, {weight = 1000000.0, dataset = {name = 'shapes'}}]}"),
     ("data.num_samples: unset, so an epoch covers every source whole: 1,000,000,000 samples, as sources[0]'s "
      "1,000 val items")),
])
def test_bad_mixes_are_one_line_naming_the_path(value, where, capsys):
    rc = main(["check", RECIPE, "--set", f"data={value}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert where in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_a_good_mix_checks(capsys):
    assert main(["check", "recipes/quickstart_video.toml"]) == 0, capsys.readouterr().err


def test_loader_workers_see_the_same_mixed_batches():
    ds = make(num_samples=40, sources=[{"dataset": IMAGES}, {"dataset": CLIPS}])
    a = next(BatchIterator(ds, 8, seed=5, num_workers=0))
    b = next(BatchIterator(ds, 8, seed=5, num_workers=1))
    assert [s["prompt"] for s in a] == [s["prompt"] for s in b]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))


def test_an_epoch_too_long_for_a_folder_source_is_refused_when_the_folder_is_read(tmp_path):
    """The config cannot know a folder's size: the mix refuses at build, before any epoch is made."""
    from PIL import Image

    from minfm_core.errors import MinfmError

    for i in range(101):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text("a picture")
    folder = {"name": "image_folder", "root": str(tmp_path), "val_fraction": 0.0}
    sources = [{"weight": 1.0, "dataset": folder}, {"weight": 1e6, "dataset": IMAGES}]
    with pytest.raises(MinfmError, match=r"^data.num_samples: unset, so an epoch covers every source whole: "
                                         r"101,000,000 samples, as sources\[0\]'s 101 train items"):
        make(period=1_000_000, sources=sources)
