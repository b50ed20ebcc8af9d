"""Video models on the Hub: a training gallery of clips is an animated PNG, the exported
``samples.png`` keeps the animation, and the card says ``pipeline_tag: text-to-video``."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine_helpers import tiny
from minfm_hub.card import metadata, render


@pytest.mark.parametrize("recipe, task", [
    ({"model": {"denoiser": {"name": "flux"}}}, "text-to-image"),
    ({"sample": {"size": [1, 32, 32]}, "data": {"name": "shapes"}}, "text-to-image"),
    ({"sample": {"size": [9, 32, 32]}}, "text-to-video"),
    ({"data": {"name": "moving_shapes", "frames": 9}}, "text-to-video"),
])
def test_the_task_follows_the_recipe(recipe, task):
    meta = metadata(recipe, license="other")
    assert meta["pipeline_tag"] == task
    assert meta["tags"][:3] == ["minfm", "flow-matching", task]


@pytest.fixture(scope="module")
def video_run(tmp_path_factory) -> Path:
    from minfm_core.engine.train import train

    run = tmp_path_factory.mktemp("video_card") / "run"
    # An image-trained tiny model that samples 5-frame clips in its gallery: enough to be a video model.
    train(tiny(run, "train.max_steps=2", "train.sample_every=2", "sample.size=[5, 16, 16]"))
    return run


def test_training_gallery_of_clips_is_an_animated_png(video_run):
    from PIL import Image, ImageSequence

    step = video_run / "samples" / "step_00000002"
    for name in ("raw", "ema"):
        with Image.open(step / f"{name}.png") as im:
            assert im.format == "PNG" and im.is_animated and im.info.get("loop") == 0
            frames = [f.copy() for f in ImageSequence.Iterator(im)]
        # two prompts, one sample each, side by side: 2 px padding around 16x16 cells
        assert len(frames) == 5 and frames[0].size == (2 * 18 + 2, 18 + 2)
        assert len({f.convert("RGB").tobytes() for f in frames}) == 5  # the clip moves (noise differs per frame)
    page = (video_run / "samples" / "index.html").read_text()
    assert "step_00000002/ema.png" in page and "step_00000002/raw.png" in page


def test_video_card_says_text_to_video_and_shows_the_animation(video_run, tmp_path):
    from huggingface_hub import ModelCard

    from minfm_core.checkpoint import export_for_hub

    folder = export_for_hub(video_run, tmp_path / "export")
    from PIL import Image

    with Image.open(folder / "samples.png") as im:
        assert im.n_frames == 5  # the export copies the newest EMA gallery as it is
    files = {p.name: p for p in folder.iterdir() if p.is_file()}
    text = render("org/clips", files, folder)
    data = ModelCard(text).data.to_dict()
    assert data["pipeline_tag"] == "text-to-video"
    assert "text-to-video" in data["tags"] and "text-to-image" not in data["tags"]
    assert "A text-to-video flow-matching model" in text
    assert "![animated sample grid](samples.png)" in text
    assert "an animated sample grid (APNG: every clip plays)" in text
    assert "minfm sample hf://org/clips --prompt 'a red circle' --size 5x16x16 --out samples/" in text
    assert "pip install 'minfm[video]'" in text
    assert render("org/clips", files, folder) == text  # nothing time-dependent


def test_image_card_is_unchanged_by_the_video_rules(tmp_path):
    from minfm_core.engine.train import train

    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=1", "train.sample_every=1"))
    from minfm_core.checkpoint import export_for_hub

    folder = export_for_hub(run, tmp_path / "export")
    text = render("org/pics", {p.name: p for p in folder.iterdir() if p.is_file()}, folder)
    assert "pipeline_tag: text-to-image" in text and "text-to-video" not in text
    assert "![sample grid](samples.png)" in text and "--size" not in text and "animated" not in text
