"""A still clip (every frame identical) keeps its frame count through WebP (docs/video.md)."""

import numpy as np
import pytest

from minfm_core.engine.sample import write_npz
from minfm_core.engine.video_io import encode_webp, read_webp
from minfm_core.errors import MinfmError


def test_still_clip_round_trips_all_frames(tmp_path):
    still = np.full((5, 8, 8, 3), 7, np.uint8)
    (tmp_path / "a.webp").write_bytes(encode_webp(still, 8))
    assert read_webp(tmp_path / "a.webp", 8).shape == (5, 8, 8, 3)
    moving = np.random.default_rng(0).integers(0, 255, (5, 8, 8, 3), dtype=np.uint8)
    (tmp_path / "b.webp").write_bytes(encode_webp(moving, 8))
    write_npz(tmp_path / "s.npz", [tmp_path / "a.webp", tmp_path / "b.webp"], fps=8)
    got = np.load(tmp_path / "s.npz")["arr_0"]
    assert got.shape == (2, 5, 8, 8, 3)
    assert (got[0] == 7).all() and (got[1] == moving).all()


def test_single_frame_clip_stays_one_frame(tmp_path):
    one = np.full((1, 4, 4, 3), 3, np.uint8)
    (tmp_path / "a.webp").write_bytes(encode_webp(one, 8))
    assert read_webp(tmp_path / "a.webp", 8).shape == (1, 4, 4, 3)


def test_hostile_frame_count_refused(tmp_path):
    from PIL import Image
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description minfm:frames="9999999"/></x:xmpmeta>'
    Image.new("RGB", (4, 4)).save(tmp_path / "a.webp", format="WEBP", lossless=True, xmp=xmp)
    with pytest.raises(MinfmError, match="a.webp.*9999999 frames"):
        read_webp(tmp_path / "a.webp", 8)
