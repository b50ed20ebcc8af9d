"""Image files from outside (a dataset folder, a folder to evaluate) that are not what they claim:
one line naming the file, exit 2, never a traceback and never a multi-GB decode."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from minfm_core.cli.main import main
from minfm_core.config import structure
from minfm_core.errors import MinfmError
from minfm_core.images import read_rgb
from minfm_core.registry import get_registry


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 20_000) -> bytes:
    """A 100-byte PNG that declares side x side RGB pixels (1.2 GB decoded at 20,000)."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")


def _good_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


HOSTILE = {
    "bomb": (bomb_png(), "image too large to decode safely"),
    "truncated": (_good_png()[:60], "not a readable image"),
    "garbage": (b"GIF89a" + b"\xff" * 40, "not a readable image"),
    "empty": (b"", "not a readable image"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_read_rgb_names_the_file(tmp_path, kind):
    data, message = HOSTILE[kind]
    path = tmp_path / f"{kind}.png"
    path.write_bytes(data)
    with pytest.raises(MinfmError) as err:
        read_rgb(path)
    assert str(err.value).startswith(f"{path}: {message}") and "\n" not in str(err.value)


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_an_image_folder_item_names_the_file(tmp_path, kind):
    data, message = HOSTILE[kind]
    (tmp_path / "a.png").write_bytes(data)
    (tmp_path / "a.txt").write_text("a picture")
    comp = get_registry().get("dataset", "image_folder")
    ds = comp.build(structure({"root": str(tmp_path), "val_fraction": 0.0, "size_multiple": 8}, comp.config))
    with pytest.raises(MinfmError, match=f"a.png: {message}"):
        ds[0]


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_eval_folder_refuses_in_one_line(tmp_path, capsys, kind):
    data, message = HOSTILE[kind]
    folder = tmp_path / "samples"
    folder.mkdir()
    for i in (0, 2, 3):  # four images: the fewest precision and recall (k = 3) are computed from
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / f"{i:05d}.png")
    (folder / "00001.png").write_bytes(data)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    assert main(["eval", "folder", str(folder), "--ref", str(ref), "--extractor", "eval_helpers:make_extractor"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"minfm: error: {folder / '00001.png'}: {message}"), err


def test_a_thin_image_is_cropped_before_it_is_scaled():
    # 1 x 2,000,000 pixels (a few KB as PNG): scaling it to cover 16 px across made a
    # 16 x 32,000,000 image (1.5 GB) before the crop. Measured in a fresh process, whose peak
    # memory is its own.
    import subprocess
    import sys

    code = (
        "import resource\n"
        "from PIL import Image\n"
        "from minfm_plugins.data.images import resize_and_center_crop\n"
        "strip = Image.new('RGB', (1, 2_000_000), (200, 0, 0))\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "out = resize_and_center_crop(strip, 16, 32)\n"
        "grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024\n"
        "print(out.size, out.getpixel((8, 16)), grown)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    grown_mb = int(res.stdout.split()[-1]) if res.returncode == 0 else -1
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("(16, 32) (200, 0, 0) ") and grown_mb < 200, res.stdout


def test_the_usual_resize_path_is_unchanged():
    from minfm_plugins.data.images import resize_and_center_crop

    small = Image.new("RGB", (40, 20), (0, 90, 0))
    out = resize_and_center_crop(small, 16, 16)
    assert out.size == (16, 16) and out.getpixel((8, 8)) == (0, 90, 0)


def test_pictures_are_read_upright_and_deep_ones_scaled_not_clipped(tmp_path):
    # a phone photo stored sideways (EXIF orientation 6) trained sideways; a 16-bit mid-grey
    # (32768) was clipped to white, a float 0.5 to black
    photo = Image.new("RGB", (64, 32), (10, 200, 10))
    exif = photo.getexif()
    exif[0x0112] = 6
    photo.save(tmp_path / "o6.jpg", exif=exif)
    assert read_rgb(tmp_path / "o6.jpg").size == (32, 64)
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(tmp_path / "grey16.png")
    Image.fromarray(np.full((8, 8), 0.5, np.float32), mode="F").save(tmp_path / "half.tif")
    for name in ("grey16.png", "half.tif"):
        assert read_rgb(tmp_path / name).getpixel((3, 3)) == (128, 128, 128), name
    Image.new("RGB", (5, 3), (1, 2, 3)).save(tmp_path / "plain.png")
    assert read_rgb(tmp_path / "plain.png").getpixel((0, 0)) == (1, 2, 3)


def test_transparent_pixels_are_laid_on_white(tmp_path):
    # PIL's convert("RGB") keeps what a transparent pixel stores (here red): a logo on a
    # transparent background trained as a logo on red
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0] = 255  # red everywhere ...
    a[0, 0, 3], a[0, 1, 3], a[0, 2, 3] = 0, 128, 255  # ... clear, half, opaque
    Image.fromarray(a, mode="RGBA").save(tmp_path / "rgba.png")
    im = read_rgb(tmp_path / "rgba.png")
    assert [im.getpixel((x, 0)) for x in range(3)] == [(255, 255, 255), (255, 127, 127), (255, 0, 0)]
    la = Image.fromarray(np.stack([np.zeros((2, 2), np.uint8), np.full((2, 2), 0, np.uint8)], -1), mode="LA")
    la.save(tmp_path / "la.png")
    assert read_rgb(tmp_path / "la.png").getpixel((1, 1)) == (255, 255, 255)
    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([0, 0, 0, 9, 9, 9])
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png", transparency=0)
    assert read_rgb(tmp_path / "p.png").getpixel((0, 0)) == (255, 255, 255)
    pal.putpixel((1, 1), 1)
    pal.save(tmp_path / "p.png", transparency=0)
    assert read_rgb(tmp_path / "p.png").getpixel((1, 1)) == (9, 9, 9)


def test_a_16_bit_grey_png_with_a_transparent_value_is_laid_on_white(tmp_path):
    """tRNS of a 16-bit grey PNG was dropped with the 8-bit conversion: transparent pixels came out black."""
    grey = np.zeros((4, 4), ">u2")
    grey[0] = 40000  # an opaque row
    raw = b"".join(b"\0" + row.tobytes() for row in grey)
    data = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 16, 0, 0, 0, 0))
            + _chunk(b"tRNS", struct.pack(">H", 0)) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b""))
    (tmp_path / "g.png").write_bytes(data)
    rgb = np.asarray(read_rgb(tmp_path / "g.png"))
    assert rgb[1:].min() == 255 and (rgb[0] == round(40000 * 255 / 65535)).all()


def test_a_cielab_tiff_is_converted_to_its_colours(tmp_path):
    """L*a*b* must go through a colour transform: read as RGB channels, neutral grey came out green-blue."""
    # PIL's LAB holds a* and b* offset by 128: (L 100%, 0, 0) white, (50%, 0, 0) grey, sRGB red
    lab = Image.new("LAB", (3, 1))
    lab.putdata([(255, 128, 128), (128, 128, 128), (136, 208, 195)])
    lab.save(tmp_path / "lab.tif")
    white, grey, red = np.asarray(read_rgb(tmp_path / "lab.tif"), dtype=int)[0]
    assert (white >= 250).all() and abs(grey - 119).max() <= 3 and red[0] >= 240 and red[1:].max() <= 20


def test_a_picture_past_pils_limit_is_refused_where_pil_only_warns(tmp_path, monkeypatch):
    """PIL raises only past twice MAX_IMAGE_PIXELS; between the two it warned in its own
    format, naming no file, and decoded (a 10000 x 9500 PNG of 112 KB), while .npz images and
    video frames were refused at MAX_IMAGE_PIXELS itself."""
    import warnings

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")  # 1,600 pixels: PIL's warning zone
    Image.new("RGB", (30, 30)).save(tmp_path / "ok.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either
        with pytest.raises(MinfmError) as err:
            read_rgb(tmp_path / "big.png")
        assert read_rgb(tmp_path / "ok.png").size == (30, 30)
    assert str(err.value).startswith(f"{tmp_path / 'big.png'}: image too large to decode safely (Image size (1600 pixels)")


def test_a_float_picture_of_no_finite_sample_is_refused_and_some_nans_are_black(tmp_path):
    """An all-NaN float TIFF trained as a black picture, with numpy's "All-NaN slice" warning."""
    Image.fromarray(np.full((4, 4), np.nan, np.float32), mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(MinfmError) as err:
        read_rgb(tmp_path / "nan.tif")
    assert str(err.value) == f"{tmp_path / 'nan.tif'}: not a readable image (no finite samples)"
    a = np.full((4, 4), 0.5, np.float32)
    a[0, 0], a[0, 1] = np.nan, np.inf
    Image.fromarray(a, mode="F").save(tmp_path / "some.tif")
    im = read_rgb(tmp_path / "some.tif")
    assert [im.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (0, 0, 0), (128, 128, 128)]


def test_a_16_bit_picture_costs_a_few_bytes_a_pixel_to_scale(tmp_path):
    """float64 and a temporary for each step peaked at 2.9 GB for a 9000 x 9900 16-bit PNG of
    194 KB (an 8-bit one: 0.56 GB); numpy's allocations of the scaling, per pixel."""
    import tracemalloc

    Image.fromarray(np.full((500, 400), 40000, np.uint16)).save(tmp_path / "g16.png")
    tracemalloc.start()
    try:
        im = read_rgb(tmp_path / "g16.png")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert im.getpixel((0, 0)) == (156, 156, 156)
    assert peak / (500 * 400) < 10, peak  # float32 (4) + the 16-bit copy (2) + masks and the uint8 result
