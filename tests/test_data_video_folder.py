"""``video_folder``: real mp4/webm files written with PyAV, captions from sidecars, frames and stride from the recipe."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from minfm_core.cli.main import main
from minfm_core.config import structure
from minfm_core.errors import MinfmError
from minfm_core.registry import get_registry

av = pytest.importorskip("av")

CODECS = {".mp4": ("libx264", {"crf": "0", "preset": "ultrafast"}), ".webm": ("libvpx-vp9", {"lossless": "1"})}
LEVEL = 12  # grey level step per frame: frame k is grey 16 + LEVEL * k


def write_video(path: Path, n_frames: int, height: int = 32, width: int = 48) -> None:
    codec, options = CODECS[path.suffix]
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=8, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for k in range(n_frames):
            arr = np.full((height, width, 3), 16 + LEVEL * k, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def frame_numbers(clip: torch.Tensor) -> list[int]:
    grey = ((clip + 1) * 127.5).mean(dim=(0, 2, 3))
    return [round((float(g) - 16) / LEVEL) for g in grey]


@pytest.fixture
def folder(tmp_path):
    for name, n, suffix in (("a", 20, ".mp4"), ("b", 12, ".webm"), ("c", 20, ".webm")):
        write_video(tmp_path / f"{name}{suffix}", n)
        (tmp_path / f"{name}.txt").write_text(f"clip {name}\n")
    return tmp_path


def make(split="train", **kw):
    comp = get_registry().get("dataset", "video_folder")
    return comp.build(structure(kw, comp.config, path="data"), split=split)


def test_reads_mp4_and_webm_with_frames_stride_and_captions(folder):
    ds = make(root=str(folder), frames=5, stride=2, clip_start="first", val_fraction=0.0, max_pixels=32 * 48)
    assert len(ds) == 3 and [ds.prompt(i) for i in range(3)] == ["clip a", "clip b", "clip c"]
    for i in range(3):
        item = ds[i]
        assert item["prompt"] == f"clip {'abc'[i]}"
        assert tuple(item["image"].shape) == (3, 5, 32, 48)
        assert frame_numbers(item["image"]) == [0, 2, 4, 6, 8]


def test_random_starts_are_deterministic_per_epoch_and_fit(folder):
    ds = make(root=str(folder), frames=4, stride=3, val_fraction=0.0)
    starts = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        nums = frame_numbers(ds[0]["image"])
        assert np.diff(nums).tolist() == [3, 3, 3] and 0 <= nums[0] and nums[-1] <= 19
        starts.add(nums[0])
        again = make(root=str(folder), frames=4, stride=3, val_fraction=0.0)
        again.set_epoch(epoch)
        assert frame_numbers(again[0]["image"]) == nums
    assert len(starts) > 1


def test_frames_are_sized_to_the_budget(folder):
    ds = make(root=str(folder), frames=2, clip_start="first", val_fraction=0.0, max_pixels=16 * 24, size_multiple=8)
    assert tuple(ds[0]["image"].shape) == (3, 2, 16, 24)  # 32x48 scaled to 384 pixels: half, multiples of 8


@pytest.mark.parametrize("rotation, bright", [(90, "bottom"), (-90, "top"), (180, "right"), (0, "left")])
def test_a_phone_clip_is_read_upright_as_players_show_it(tmp_path, rotation, bright):
    """A clip stored 48 x 32 with a display rotation (a phone held upright) was read sideways,
    stored side up, while a phone photo's EXIF orientation is honoured. The display matrix
    turns it counter-clockwise (FFmpeg's autorotate): its bright left half ends at the bottom
    for 90 degrees, at the top for -90, on the right for 180."""
    with av.open(str(tmp_path / "clip.mp4"), "w") as out:
        stream = out.add_stream("libx264", rate=8, options={"crf": "0", "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        stream.set_display_rotation(rotation)
        arr = np.zeros((32, 48, 3), np.uint8)
        arr[:, :24] = 255
        for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    (tmp_path / "clip.txt").write_text("a phone clip")
    clip = make(root=str(tmp_path), frames=1, val_fraction=0.0, max_pixels=48 * 32)[0]["image"][:, 0]
    upright = rotation in (90, -90)
    assert tuple(clip.shape) == ((3, 48, 32) if upright else (3, 32, 48))
    h, w = clip.shape[1:]
    halves = {"top": clip[:, : h // 2], "bottom": clip[:, h // 2 :], "left": clip[:, :, : w // 2],
              "right": clip[:, :, w // 2 :]}
    assert float(halves[bright].mean()) > 0.9
    assert float(halves[{"top": "bottom", "bottom": "top", "left": "right", "right": "left"}[bright]].mean()) < -0.9


def test_a_too_short_video_names_the_file_and_settings(folder):
    ds = make(root=str(folder), frames=9, stride=2, clip_start="first", val_fraction=0.0)
    ds[0]  # 20 frames hold 17
    with pytest.raises(MinfmError, match=r"b\.webm has 12 frames; frames = 9 at stride = 2 needs 17: lower one"):
        ds[1]


def test_a_too_short_clip_in_a_mix_claims_no_setting_the_recipe_lacks(tmp_path):
    """Was: 'data.frames = 5 at data.stride = 2 needs 9' for a source at data.sources[1].dataset."""
    write_video(tmp_path / "one.mp4", 1)
    (tmp_path / "one.txt").write_text("one frame")
    comp = get_registry().get("dataset", "mix")
    sources = [{"weight": 1.0, "dataset": {"name": "shapes", "sizes": [[16, 16]], "num_samples": 4}},
               {"weight": 1.0, "dataset": {"name": "video_folder", "root": str(tmp_path), "frames": 5, "stride": 2,
                                           "val_fraction": 0.0}}]
    mix = comp.build(structure({"sources": sources}, comp.config, path="data"), split="train")
    k = next(i for i in range(len(mix)) if mix.locate(i)[0] == 1)
    with pytest.raises(MinfmError) as err:
        mix[k]
    assert str(err.value) == (f"video_folder: {tmp_path / 'one.mp4'} has 1 frame; frames = 5 at stride = 2 "
                              "needs 9: lower one of them")


def _hostile_video(kind: str, path: Path) -> None:
    if kind == "wide":  # a 337-byte GIF of 17,000 x 2 frames: past MAX_SIDE
        from PIL import Image

        Image.new("RGB", (17_000, 2), (255, 0, 0)).save(path.with_suffix(".gif"))
    elif kind == "truncated":
        write_video(path, 20)
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes({"garbage": b"\x00\x00\x00\x18ftypmp42" + b"\xff" * 64, "empty": b""}[kind])


@pytest.mark.parametrize(("kind", "message"), [
    ("wide", r"x\.gif has 17000x2 frames; at most 16383 pixels a side are read"),
    ("truncated", r"x\.mp4: not a readable video \(|x\.mp4 decodes fewer frames"),
    ("garbage", r"x\.mp4: not a readable video \("),
    ("empty", r"x\.mp4: not a readable video \("),
])
def test_a_hostile_video_is_one_error_naming_it(tmp_path, kind, message):
    """Reading a clip used to let PyAV's errors (and, for a frame count, all of them) escape as tracebacks."""
    _hostile_video(kind, tmp_path / "x.mp4")
    (tmp_path / "x.txt").write_text("a clip")
    ds = make(root=str(tmp_path), frames=1, val_fraction=0.0)
    with pytest.raises(MinfmError, match=message):
        ds[0]


def test_a_caption_that_is_not_utf8_names_its_file(tmp_path):
    write_video(tmp_path / "x.mp4", 4)
    (tmp_path / "x.txt").write_bytes(b"\xff\xfe c\x00l\x00i\x00p\x00")
    with pytest.raises(MinfmError, match=r"video_folder: .*x\.txt: not UTF-8 text \(byte 0\)"):
        make(root=str(tmp_path), frames=1, val_fraction=0.0)


def test_splits_and_missing_captions(folder, tmp_path):
    (folder / "val").mkdir()
    write_video(folder / "val" / "v.mp4", 6)
    (folder / "val" / "v.txt").write_text("held out")
    val = make("val", root=str(folder), frames=3, clip_start="first")
    assert len(val) == 1 and val[0]["prompt"] == "held out"
    bare = tmp_path / "bare"
    bare.mkdir()
    write_video(bare / "x.mp4", 3)
    with pytest.raises(MinfmError, match="no .txt sidecar such as 'x.mp4' -> 'x.txt'"):
        make(root=str(bare), frames=2)


@pytest.mark.parametrize(("setting", "where"), [("frames = 0", "data.frames: "), ("stride = 0", "data.stride: "),
                                                 ("stride = 65", "data.stride: "), ("clip_start = 'middle'", "data.clip_start: ")])
def test_bad_settings_name_their_path(setting, where, capsys):
    rc = main(["check", "recipes/quickstart.toml", "--set", f"data={{name = 'video_folder', root = 'x', {setting}}}"])
    err = capsys.readouterr().err
    assert rc == 2 and where in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("suffix", [".mp4", ".webm"])  # mp4's header counts frames, webm's does not
def test_read_clip_picks_from_the_true_count_in_either_container(tmp_path, suffix):
    from minfm_plugins.data.video_folder import count_frames, read_clip

    path = tmp_path / f"v{suffix}"
    write_video(path, 9)
    with av.open(str(path)) as container:
        header = container.streams.video[0].frames
    assert (header == 9) if suffix == ".mp4" else (header == 0)
    seen = []
    indices, frames = read_clip(path, lambda n: seen.append(n) or [1, 4, 8])
    assert seen == [9] == [count_frames(path)] and indices == [1, 4, 8]
    arr = [round((np.asarray(f, np.float32).mean() - 16) / LEVEL) for f in frames]
    assert arr == [1, 4, 8]


def test_frames_over_pils_pixel_limit_are_refused_like_pictures(tmp_path, monkeypatch):
    """Only 16,384 px a side were checked: a 16384 x 16384 frame (268 M pixels) was decoded; pictures stop at
    PIL's Image.MAX_IMAGE_PIXELS. Here the limit is lowered so small files stand in for huge ones."""
    from PIL import Image

    write_video(tmp_path / "x.mp4", 3, height=32, width=48)  # the header gives the size: refused before decoding
    Image.new("RGB", (48, 32)).save(tmp_path / "y.gif")  # a GIF leaves it to the frames
    for name in ("x", "y"):
        (tmp_path / f"{name}.txt").write_text("a clip")
    ds = make(root=str(tmp_path), frames=1, val_fraction=0.0, max_pixels=48 * 32)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 48 * 32 - 1)
    for i, name in enumerate(("x.mp4", "y.gif")):
        with pytest.raises(MinfmError, match=rf"{name} has 48x32 frames \(1,536 pixels\); at most 1,535 pixels a frame"):
            ds[i]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 48 * 32)  # at the limit: read
    assert tuple(ds[1]["image"].shape) == (3, 1, 32, 48)


# Peak RSS from /proc (VmHWM): getrusage's ru_maxrss outlives exec, so a child of a big pytest process
# starts out "peaked" at its parent's size and would measure nothing.
_PEAK = """
import json, re, sys
def peak_kib():
    return int(re.search(r"VmHWM:\\s*(\\d+)", open("/proc/self/status").read()).group(1))
from minfm_core.config import structure
from minfm_core.registry import get_registry
comp = get_registry().get("dataset", "video_folder")
ds = comp.build(structure({"root": sys.argv[1], "frames": 3, "clip_start": "first", "val_fraction": 0.0}, comp.config))
import av  # loaded outside the measure
before = peak_kib()
clip = ds[0]["image"]
grown = peak_kib() - before
means = ((clip + 1) * 127.5).mean(dim=(2, 3)).T.round().int().tolist()
print(json.dumps({"grown_mib": grown // 1024, "shape": list(clip.shape), "means": means}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="peak RSS is read from Linux's /proc")
def test_a_big_frame_is_made_small_as_it_is_decoded(tmp_path):
    """Every wanted frame was kept at full size (and converted at ~4 RGB copies) before the resize: a 3-frame
    4000 x 4000 GIF grew the reader by 446 MiB for a 3 x 128 x 128 clip; now ~130 MiB (the GIF decoder's own
    two frames). Peak RSS is measured in a fresh process."""
    import json
    import subprocess
    import sys

    from PIL import Image

    colours = [(200, 40, 100), (40, 200, 100), (100, 40, 200)]
    frames = [Image.new("RGB", (4000, 4000), c) for c in colours]
    frames[0].save(tmp_path / "big.gif", save_all=True, append_images=frames[1:], duration=100)
    del frames
    (tmp_path / "big.txt").write_text("a big clip")
    run = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path)], capture_output=True, text=True, check=True)
    got = json.loads(run.stdout)
    assert got["shape"] == [3, 3, 128, 128] and got["means"] == [list(c) for c in colours], got  # each frame, in order
    assert got["grown_mib"] < 250, got  # the old reader: 446


@pytest.mark.parametrize(("frames", "ok"), [(1024, True), (1025, False)])
def test_frames_agree_with_the_command_lines_limit(frames, ok, capsys):
    """data.frames took 1025 while --size and --clip-frames stop at MAX_FRAMES (1024)."""
    from minfm_core.validators import MAX_FRAMES

    assert MAX_FRAMES == 1024
    rc = main(["check", "recipes/quickstart.toml", "--set", f"data={{name = 'video_folder', root = 'x', frames = {frames}}}"])
    err = capsys.readouterr().err
    assert (rc == 0) if ok else (rc == 2 and "data.frames: " in err and "1024" in err), err


def test_the_scan_follows_linked_folders_and_refuses_dead_links_named_like_clips(tmp_path):
    """Linked folders were skipped (Path.rglob), and a link loop named x.mp4 failed only at its batch."""
    elsewhere, root = tmp_path / "elsewhere", tmp_path / "data"
    elsewhere.mkdir()
    root.mkdir()
    write_video(elsewhere / "a.mp4", 3)
    (elsewhere / "a.txt").write_text("linked in")
    (root / "linked").symlink_to(elsewhere)
    assert [c for _, c in make(root=str(root), frames=1, val_fraction=0.0).items] == ["linked in"]
    (root / "loop.mp4").symlink_to("loop.mp4")
    (root / "loop.txt").write_text("a loop")
    with pytest.raises(MinfmError, match=f"video_folder: {root / 'loop.mp4'}: a symlink that leads nowhere"):
        make(root=str(root), frames=1, val_fraction=0.0)


@pytest.mark.parametrize("folder", ["train", "val"])
def test_clips_beside_a_lone_split_folder_are_the_other_split_none_dropped(tmp_path, folder):
    """Loose clips beside one split folder were hashed: with val/ only, top.mp4 was in neither split."""
    loose = [f"top{i}.mp4" for i in range(6)]
    (tmp_path / folder).mkdir()
    for name in loose + [f"{folder}/in{i}.mp4" for i in range(2)]:
        (tmp_path / name).write_bytes(b"")  # the scan reads no video
        (tmp_path / name).with_suffix(".txt").write_text("a clip")
    train, val = (make(split, root=str(tmp_path), frames=1, val_fraction=0.2) for split in ("train", "val"))
    names = {split: sorted(str(p.relative_to(tmp_path)) for p, _ in ds.items) for split, ds in
             (("train", train), ("val", val))}
    assert names["val" if folder == "train" else "train"] == loose
    assert names[folder] == [f"{folder}/in0.mp4", f"{folder}/in1.mp4"]


def test_a_fifo_named_like_a_clip_is_named_by_the_dataset(tmp_path):
    """Was: 'minfm: error: .../x.mp4: not a regular file', the one fault of a clip without 'video_folder:'."""
    import os

    os.mkfifo(tmp_path / "x.mp4")
    (tmp_path / "x.txt").write_text("a pipe")
    ds = make(root=str(tmp_path), frames=1, val_fraction=0.0)
    with pytest.raises(MinfmError, match=rf"^video_folder: {re.escape(str(tmp_path / 'x.mp4'))}: not a regular file$"):
        ds[0]


def test_a_container_that_over_counts_says_where_the_video_ends(tmp_path, monkeypatch):
    """Was: 'decoded to fewer frames than its header says (3 of frame 18 needed)'."""
    import minfm_plugins.data.video_folder as vf

    write_video(tmp_path / "x.mp4", 20)
    (tmp_path / "x.txt").write_text("a clip")
    real = vf._decode
    monkeypatch.setattr(vf, "_decode", lambda *a, **k: real(*a, **k)[:3])  # as if it ended after frame 5
    ds = make(root=str(tmp_path), frames=10, stride=2, clip_start="first", val_fraction=0.0)
    with pytest.raises(MinfmError, match=re.escape(
            f"video_folder: {tmp_path / 'x.mp4'} decodes fewer frames than the 20 its container says: it ends "
            "before frame 7, and this clip needs frame 19")):
        ds[0]
