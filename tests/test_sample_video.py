"""``minfm sample --size FxHxW``: clips as MP4 + animated WebP, ``(N, F, H, W, 3)`` npz in prompt-major
order, resume, and frame counts the model cannot draw. A tiny pixel-space model trained one step
draws any (frames, height, width): the identity VAE and a one-frame patch cut any clip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import minfm_in_process
from engine_helpers import tiny
from minfm_core.cli.main import main

av = pytest.importorskip("av", reason="the video extra (pip install 'minfm[video]')")

PROMPTS = ["--prompt", "a red circle", "--prompt", "a blue square"]
F, H, W = 5, 16, 24


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from minfm_core.engine.train import train

    run = tmp_path_factory.mktemp("sample_video") / "run"
    train(tiny(run, "train.max_steps=1"))
    return run


@pytest.fixture(scope="module")
def clips(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clips") / "out"
    argv = ["sample", str(run_dir), "--out", str(out), *PROMPTS, "--n", "2", "--steps", "2",
            "--size", f"{F}x{H}x{W}", "--fps", "10", "--npz", "--set", "sample.batch_size=3"]
    assert main(argv) == 0
    return out


NAMES = ["00000_00", "00000_01", "00001_00", "00001_01"]  # prompt-major: prompt 0's samples first


def test_each_clip_is_an_mp4_and_a_webp(clips):
    assert sorted(p.name for p in (clips / "images").iterdir()) == sorted(
        f"{n}.{e}" for n in NAMES for e in ("mp4", "webp"))


def test_npz_holds_clips_prompt_major_exactly_as_the_webps(clips):
    from minfm_core.engine.video_io import read_webp

    with np.load(clips / "samples.npz") as z:
        assert list(z.keys()) == ["arr_0"]
        arr = z["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (4, F, H, W, 3)
    for j, name in enumerate(NAMES):
        assert np.array_equal(arr[j], read_webp(clips / "images" / f"{name}.webp", 10)), name
    assert len({arr[j].tobytes() for j in range(4)}) == 4  # four different seeds, four different clips
    meta = json.loads((clips / "metadata.json").read_text())
    assert [(r["prompt_index"], r["sample"]) for r in meta["images"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r["path"] for r in meta["images"]] == [f"images/{n}.mp4" for n in NAMES]
    assert all(r["preview"] == r["path"][:-4] + ".webp" and (r["frames"], r["fps"]) == (F, 10) for r in meta["images"])
    assert meta["settings"]["size"] == [F, H, W] and meta["settings"]["fps"] == 10


def test_mp4_plays_back_every_frame_at_its_size_and_colours(clips):
    with np.load(clips / "samples.npz") as z:
        arr = z["arr_0"]
    for j, name in enumerate(NAMES):
        with av.open(str(clips / "images" / f"{name}.mp4")) as c:
            s = c.streams.video[0]
            assert (s.codec_context.name, s.codec_context.pix_fmt) == ("h264", "yuv420p")
            assert float(s.average_rate) == 10
            frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(s)])
        assert frames.shape == (F, H, W, 3)
        # An untrained model draws noise, which 4:2:0 cannot keep pixel for pixel; each frame's
        # mean colour it keeps, and that pins the frames' order too.
        got, want = frames.mean(axis=(1, 2)), arr[j].astype(float).mean(axis=(1, 2))
        assert np.abs(got - want).max() < 3.0, (got, want)


def test_webp_animates_every_frame(clips):
    from PIL import Image

    for name in NAMES:
        with Image.open(clips / "images" / f"{name}.webp") as im:
            assert im.is_animated and im.n_frames == F and im.size == (W, H)


def test_gallery_page_shows_the_webp_and_links_the_mp4(clips):
    page = (clips / "index.html").read_text()
    for name in NAMES:
        assert f"<a href='images/{name}.mp4'><img src='images/{name}.webp'" in page
    assert f"{F} frames" in page


def test_a_clip_is_the_same_however_it_is_batched_and_resumes(run_dir, clips, tmp_path):
    out = tmp_path / "again"
    base = ["sample", str(run_dir), "--out", str(out), *PROMPTS, "--n", "2", "--steps", "2",
            "--size", f"{F}x{H}x{W}", "--fps", "10", "--npz", "--set", "sample.batch_size=3"]
    assert main(base) == 0
    for n in NAMES:
        assert (out / "images" / f"{n}.webp").read_bytes() == (clips / "images" / f"{n}.webp").read_bytes()
    # A clip missing its WebP is drawn again (its whole batch); the rest stays.
    (out / "images" / "00001_01.webp").unlink()
    res = minfm_in_process(*base[:])
    assert res.returncode == 0 and "2 batches, 1 already done, 1 to draw" in res.stdout, res.stdout + res.stderr
    assert "holds all 4 clips: 1 drawn now, 3 already there" in res.stdout  # a batch of 3 and one of 1
    assert (out / "samples.npz").read_bytes() == (clips / "samples.npz").read_bytes()
    # Another frame rate is another request (the files hold their timing).
    other = minfm_in_process(*[a if a != "10" else "12" for a in base])
    assert other.returncode == 2 and "different fps" in other.stderr, other.stderr


def test_images_stay_png_and_npz_stays_four_dimensional(run_dir, tmp_path):
    out = tmp_path / "img"
    assert main(["sample", str(run_dir), "--out", str(out), *PROMPTS, "--n", "2", "--steps", "2",
                 "--size", "16x24", "--npz"]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{n}.png" for n in NAMES]
    with np.load(out / "samples.npz") as z:
        assert z["arr_0"].shape == (4, 16, 24, 3)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["settings"]["size"] == [1, 16, 24] and "fps" not in meta["settings"]


def test_frames_the_model_cannot_cut_exit_2_before_anything_is_written(run_dir, tmp_path):
    # Patches two latent frames deep (and a denoiser sized for them): only even frame counts.
    res = minfm_in_process("sample", str(run_dir), "--out", str(tmp_path / "o"), "--prompt", "x", "--size", "3x16x16",
                    "--set", "model.patchifier.patch_size=[2, 2, 2]", "--set", "model.denoiser.d_img=24",
                    "--set", "model.denoiser.rope_axes=[4, 6, 6]")
    assert res.returncode == 2, res.stdout + res.stderr
    line = res.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith("minfm: error: ") and line.endswith(
        "recipe.toml: sample.size 3x16x16: 3 frames: this model cannot draw that (its patches span 2 "
        "latent frames); valid frame counts are 2, 4, 6, 8, 10, ... (from --size)")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_browser_plays_the_served_clips(clips, tmp_path):
    """``minfm serve``'s server, Debian's Chromium: the gallery's WebPs decode, each MP4 plays (its size,
    its length at 10 fps, its first frame's colour)."""
    import threading
    from pathlib import Path as P

    if not P("/usr/bin/chromium").exists():
        pytest.skip("/usr/bin/chromium not found (CI installs it: apt-get install -y chromium)")
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (browsers not needed)")
    from minfm_core.cli.run_cmd import gallery_server

    with np.load(clips / "samples.npz") as z:
        first_frames = z["arr_0"][:, 0].astype(float)
    httpd = gallery_server(clips, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    errors: list[str] = []
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--autoplay-policy=no-user-gesture-required"])
            try:
                page = browser.new_page()
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.goto(f"http://127.0.0.1:{httpd.server_address[1]}/index.html", wait_until="load", timeout=60_000)
                sizes = page.evaluate("() => [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
                assert sizes == [[True, W, H]] * 4
                played = page.evaluate("""async (names) => Promise.all(names.map(n => new Promise((ok, bad) => {
                    const v = document.createElement('video');
                    v.muted = true; v.preload = 'auto';
                    v.onerror = () => bad('cannot play ' + n);
                    // 'loadeddata' may come before a busy browser has decoded the first frame
                    // into something a canvas can draw (it reads black then): seek, draw on 'seeked'.
                    v.onloadeddata = () => { v.currentTime = 0; };
                    // Under load even 'seeked' can come first (CI, two test workers): a black
                    // draw is tried again, up to 5 s; the colour check below still judges it.
                    const draw = (tries) => {
                        const c = document.createElement('canvas');
                        c.width = v.videoWidth; c.height = v.videoHeight;
                        const g = c.getContext('2d'); g.drawImage(v, 0, 0);
                        const d = g.getImageData(0, 0, c.width, c.height).data;
                        const m = [0, 0, 0];
                        for (let i = 0; i < d.length; i += 4) { m[0] += d[i]; m[1] += d[i + 1]; m[2] += d[i + 2]; }
                        if (m.every(x => x === 0) && tries > 0) { setTimeout(() => draw(tries - 1), 100); return; }
                        const n_px = d.length / 4;
                        ok([v.videoWidth, v.videoHeight, v.duration, m.map(x => x / n_px)]);
                    };
                    v.onseeked = () => draw(50);
                    v.src = 'images/' + n + '.mp4';
                })))""", NAMES)
            finally:
                browser.close()
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert errors == []
    for j, (w, h, duration, mean) in enumerate(played):
        assert (w, h) == (W, H) and abs(duration - F / 10) < 0.02, played[j]
        # The browser's own YUV -> RGB conversion: the first frame's mean colour survives it.
        assert np.abs(np.array(mean) - first_frames[j].mean(axis=(0, 1))).max() < 4.0, (mean, first_frames[j].mean(axis=(0, 1)))


def test_clips_without_pyav_stop_before_any_model_is_built(run_dir, tmp_path):
    """As if the video extra were missing: one line naming it, nothing written (images need no PyAV)."""
    code = ("import sys; sys.modules['av'] = None; from minfm_core.cli.main import main; "
            f"sys.exit(main(['sample', {str(run_dir)!r}, '--out', {str(tmp_path / 'o')!r}, '--prompt', 'x', "
            "'--steps', '1', '--size', SIZE]))")
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", code.replace("SIZE", "'3x16x16'")], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip() == (
        "minfm: error: writing clips as MP4 needs PyAV: pip install 'minfm[video]'"), res.stderr
    assert not (tmp_path / "o").exists()
    res = subprocess.run([sys.executable, "-c", code.replace("SIZE", "'16x16'")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert [p.name for p in (tmp_path / "o" / "images").iterdir()] == ["00000_00.png"]
