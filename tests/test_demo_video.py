"""The demo of a video model: a frame count in, MP4 clips out, over ``gradio_client`` against a real
server on 127.0.0.1. The tiny pixel-space model samples 5-frame clips (``sample.size``), which
makes it a video model by the recipe rule; any frame count is one it can cut."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gradio", reason="the demo needs the 'demo' extra (pip install 'minfm[demo]')")
pytest.importorskip("gradio_client", reason="the demo tests need gradio_client")
av = pytest.importorskip("av", reason="the video extra (pip install 'minfm[video]')")

from demo_helpers import serving  # noqa: E402
from engine_helpers import tiny  # noqa: E402
from minfm_core.errors import MinfmError  # noqa: E402

BASE = dict(prompt="a red circle", negative_prompt="", size="16x24", frames=5, steps=2, cfg_scale=3.0, ep_cfg=False,
            sampler="euler", seed=3, random_seed=False, num_images=1)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from minfm_apps.model import DemoModel
    from minfm_core.engine.train import train

    run = tmp_path_factory.mktemp("demo_video")
    train(tiny(run, "train.max_steps=1", "sample.size=[5, 16, 16]"))
    return DemoModel.load(str(run), device="cpu", max_images=4)


@pytest.fixture(scope="module")
def served(model):
    from gradio_client import Client

    with serving(model) as (_, batcher, url):
        yield batcher, Client(url, verbose=False)


def decode(path: str) -> tuple[np.ndarray, str]:
    with av.open(path) as c:
        s = c.streams.video[0]
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(s)]), s.codec_context.name


def test_a_video_model_offers_the_frames_it_can_draw(model):
    assert model.makes_clips and model.default_frames == 5
    assert (model.min_frames, model.frame_step, model.limits.max_frames) == (1, 1, 10)
    assert dict(model.card())["frames"] == "1, 2, ... 10 (default 5)"
    _, jobs = model.check_request("a red circle", "", "16x24", 2, 3.0, False, "euler", 0, 2, 7)
    assert [j.size for j in jobs] == [(7, 16, 24), (7, 16, 24)]


@pytest.mark.parametrize("frames, message", [
    (0, "Frames must be one of 1, 2, ... 10, got 0."),
    (11, "Frames must be one of 1, 2, ... 10, got 11."),
    (2.5, "Frames must be a whole number"),
    ("many", "Frames must be a whole number"),
])
def test_bad_frame_counts_are_refused(model, frames, message):
    with pytest.raises(MinfmError, match=message.replace(".", r"\.")):
        model.check_request("a red circle", "", "16x24", 2, 3.0, False, "euler", 0, 1, frames)


@pytest.mark.slow
def test_generate_returns_playable_mp4s_with_every_frame(model, served):
    from minfm_apps.model import Settings

    _, client = served
    video, clips, seed = client.predict(**{**BASE, "num_images": 2}, api_name="/generate")
    assert seed == 3
    assert [c["caption"] for c in clips] == ["seed 3 · 5 frames · 16x24", "seed 4 · 5 frames · 16x24"]
    frames, codec = decode(video)
    assert codec == "h264" and frames.shape == (5, 16, 24, 3)
    # The clip is the model's own: drawn alone with the same seed, its frames' mean colours match.
    direct = model.run(Settings(steps=2, sampler="euler", cfg_scale=3.0, ep_cfg=False),
                       model.check_request("a red circle", "", "16x24", 2, 3.0, False, "euler", 3, 1, 5)[1])[0]
    assert direct.shape == (5, 16, 24, 3)
    assert np.abs(frames.mean(axis=(1, 2)) - direct.astype(float).mean(axis=(1, 2))).max() < 3.0
    second, _ = decode(clips[1]["video"])
    assert second.shape == (5, 16, 24, 3) and not np.array_equal(second, frames)


@pytest.mark.slow
def test_clips_of_different_lengths_share_one_sampler_call(served):
    batcher, client = served
    before = batcher.calls
    a = client.submit(**{**BASE, "frames": 3}, api_name="/generate")
    b = client.submit(**{**BASE, "frames": 7, "size": "16x16", "seed": 50}, api_name="/generate")
    (va, _, _), (vb, _, sb) = a.result(timeout=120), b.result(timeout=120)
    assert decode(va)[0].shape == (3, 16, 24, 3) and decode(vb)[0].shape == (7, 16, 16, 3) and sb == 50
    assert batcher.calls == before + 1
    assert sorted(j.size for j in batcher.history[-1].jobs) == [(3, 16, 24), (7, 16, 16)]


@pytest.mark.slow
def test_a_bad_frame_count_is_an_app_error(served):
    from gradio_client.exceptions import AppError

    _, client = served
    # named by the input, with what it takes (gradio's own slider bound said "greater than maximum value 10")
    with pytest.raises(AppError, match=r"^Frames must be one of 1, 2, \.\.\. 10, got 40\.$"):
        client.predict(**{**BASE, "frames": 40}, api_name="/generate")


@pytest.mark.slow
def test_the_page_plays_the_clip_in_a_browser(model, tmp_path):
    """Debian's Chromium: set Frames, click Generate, the video element plays a clip of that size and length."""
    from pathlib import Path

    if not Path("/usr/bin/chromium").exists():
        pytest.skip("/usr/bin/chromium not found (CI installs it: apt-get install -y chromium)")
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (browsers not needed)")
    errors: list[str] = []
    with serving(model, window_s=0.1) as (_, _, url):
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path="/usr/bin/chromium", headless=True,
                viewport={"width": 1200, "height": 900},
                args=["--no-sandbox", "--disable-gpu", "--autoplay-policy=no-user-gesture-required",
                      "--disable-background-networking", "--disable-component-update", "--no-first-run"])
            try:
                page = browser.new_page()
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.goto(url, wait_until="networkidle", timeout=60_000)
                # networkidle can come before Gradio's app has drawn (seen under CI's load): wait for
                # the Frames box (a timeout fails the test: a video model's page must show it)
                page.locator("#frames").wait_for(state="visible", timeout=60_000)
                page.locator("#frames input[type=number]").fill("7")
                page.locator("#frames input[type=number]").press("Enter")
                page.locator("#prompt textarea").fill("a blue square")
                page.locator("#generate").click()
                page.wait_for_function("() => { const v = document.querySelector('#video video');"
                                       " return v && v.readyState >= 2 && v.videoWidth > 0; }", timeout=120_000)
                got = page.evaluate("() => { const v = document.querySelector('#video video');"
                                    " return [v.videoWidth, v.videoHeight, v.duration, v.loop]; }")
            finally:
                browser.close()
    w, h, duration, loop = got
    assert (w, h) == (16, 16) and abs(duration - 7 / 8) < 0.02 and loop  # 7 frames at 8 fps, the default size
    assert errors == []
