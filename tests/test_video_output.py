"""Clip files: MP4 (PyAV, H.264) and lossless animated WebP round trips, frame-count rules,
the "video model" rule, and ``minfm serve``'s content types. Real encoders, no model."""

from __future__ import annotations

import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from minfm_core.engine.video_io import (
    check_frames, encode_mp4, encode_webp, frames_ok, read_mp4, read_webp, recipe_makes_clips, require_av, valid_frames, write_mp4,
)
from minfm_core.errors import MinfmError

av = pytest.importorskip("av", reason="the video extra (pip install 'minfm[video]')")


def smooth_clip(f: int, h: int, w: int) -> np.ndarray:
    """Gradients that drift per frame: what 4:2:0 and H.264 keep almost exactly."""
    y, x = np.mgrid[0:h, 0:w]
    frames = [np.stack([x * 200 // max(w - 1, 1) + 4 * i, y * 200 // max(h - 1, 1) + 3 * i,
                        np.full_like(x, 40 + 20 * i)], -1) for i in range(f)]
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


def test_mp4_round_trip_is_h264_yuv420p_with_every_frame(tmp_path):
    clip = smooth_clip(9, 32, 48)
    path = tmp_path / "c.mp4"
    write_mp4(path, clip, fps=12)
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert (s.codec_context.name, s.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert (s.codec_context.width, s.codec_context.height) == (48, 32)
    got, fps = read_mp4(path)
    assert got.shape == clip.shape and fps == 12
    err = np.abs(got.astype(int) - clip.astype(int))
    # 4:2:0 and limited-range YUV cost about one level on average (swscale rounds down a little)
    assert err.mean() < 3.0 and err.max() <= 16, (err.mean(), err.max())
    # frame order: each decoded frame is nearest to its own source frame
    dist = [[np.abs(g.astype(int) - c).mean() for c in clip] for g in got]
    assert [int(np.argmin(d)) for d in dist] == list(range(9))
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed into place


def test_mp4_bytes_equal_the_written_file(tmp_path):
    clip = smooth_clip(4, 16, 16)
    write_mp4(tmp_path / "c.mp4", clip, fps=8)
    assert encode_mp4(clip, fps=8) == (tmp_path / "c.mp4").read_bytes()  # x264 is deterministic unless told otherwise


def test_mp4_pads_odd_sides_by_repeating_the_edge(tmp_path):
    clip = smooth_clip(3, 15, 17)
    write_mp4(tmp_path / "odd.mp4", clip)
    got, _ = read_mp4(tmp_path / "odd.mp4")
    assert got.shape == (3, 16, 18, 3)
    assert np.abs(got[:, :15, :17].astype(int) - clip).mean() < 6  # steep 12-level steps: 4:2:0 blurs colour more
    # the added row/column repeats the last real one
    assert np.abs(got[:, 15].astype(int) - got[:, 14]).mean() < 3 and np.abs(got[:, :, 17].astype(int) - got[:, :, 16]).mean() < 3


@pytest.mark.parametrize("fps", [7, 8, 24, 60])
def test_webp_is_exact_and_keeps_repeated_frames(tmp_path, fps):
    from PIL import Image

    rng = np.random.default_rng(fps)
    clip = rng.integers(0, 256, (7, 9, 11, 3), dtype=np.uint8)
    clip[2] = clip[1]
    clip[3] = clip[1]  # an encoder merges these into one longer frame
    clip[6] = clip[5]
    path = tmp_path / "c.webp"
    path.write_bytes(encode_webp(clip, fps))
    with Image.open(path) as im:
        assert im.format == "WEBP" and im.is_animated and im.info.get("loop") == 0
        assert im.n_frames == 4  # what was stored; read_webp restores the 7
    assert np.array_equal(read_webp(path, fps), clip)


def test_webp_of_distinct_frames_has_one_picture_per_frame(tmp_path):
    from PIL import Image, ImageSequence

    clip = smooth_clip(5, 8, 8)
    path = tmp_path / "c.webp"
    path.write_bytes(encode_webp(clip, 8))
    with Image.open(path) as im:
        assert im.n_frames == 5
        durations = [(f.load(), f.info["duration"])[1] for f in ImageSequence.Iterator(im)]  # load: fills info
    assert durations == [125] * 5  # 8 fps


def test_writers_refuse_what_is_not_a_clip(tmp_path):
    with pytest.raises(ValueError, match="uint8 array"):
        encode_webp(np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8 array"):
        write_mp4(tmp_path / "x.mp4", np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(MinfmError, match="fps: expected a whole number in 1..60, got 0"):
        encode_webp(smooth_clip(2, 4, 4), 0)


def test_missing_pyav_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # as if not installed: `import av` raises ImportError
    with pytest.raises(MinfmError, match=r"pip install 'minfm\[video\]'"):
        require_av()


def test_frame_counts_follow_the_vae_and_the_patch():
    assert valid_frames(1, 1) == [1, 2, 3, 4, 5]
    assert valid_frames(4, 1) == [1, 5, 9, 13, 17]  # causal VAE: the first frame alone, then 4 per latent
    assert valid_frames(4, 2) == [5, 13, 21, 29, 37]  # and latent frames cut 2 at a time
    assert valid_frames(1, 2) == [2, 4, 6, 8, 10]
    assert frames_ok(17, 4, 1) and not frames_ok(16, 4, 1) and not frames_ok(0, 1, 1)
    assert check_frames(9, 4, 1, what="--size") == 9
    with pytest.raises(MinfmError) as exc:
        check_frames(8, 4, 1, what="sample.size 8x32x32")
    assert str(exc.value) == ("sample.size 8x32x32: 8 frames: this model cannot draw that (its VAE keeps the first frame "
                              "and compresses time 4x); valid frame counts are 1, 5, 9, 13, 17, ...")
    with pytest.raises(MinfmError, match="its patches span 2 latent frames"):
        check_frames(3, 1, 2, what="x")
    with pytest.raises(MinfmError, match="2000 frames: expected 1..1024"):
        check_frames(2000, 1, 1, what="x")


@pytest.mark.parametrize("recipe, clips", [
    ({}, False),
    ({"sample": {"size": [1, 256, 256]}}, False),
    ({"sample": {"size": [17, 256, 256]}}, True),
    ({"data": {"name": "shapes", "sizes": [[32, 32]]}}, False),
    ({"data": {"name": "moving_shapes", "frames": 9}}, True),
    ({"data": {"name": "mix", "sources": [{"name": "shapes"}, {"name": "moving_shapes", "frames": 17}]}}, True),
    ({"data": {"name": "video_folder", "frames": 1}}, False),
    ({"data": {"frames": True}}, False),  # a flag, not a count
    ({"sample": {"size": "17x256x256"}, "data": "shapes"}, False),  # not a recipe's shapes: no guessing
])
def test_which_recipes_are_video_models(recipe, clips):
    assert recipe_makes_clips(recipe) is clips


def test_serve_states_clip_and_picture_types(tmp_path):
    from minfm_core.cli.run_cmd import gallery_server

    (tmp_path / "samples").mkdir()
    for name in ("index.html", "a.mp4", "a.webp", "a.png", "A.MP4"):
        (tmp_path / "samples" / name).write_bytes(b"x")
    httpd = gallery_server(tmp_path, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}/samples/"
        types = {}
        for name in ("index.html", "a.mp4", "a.webp", "a.png", "A.MP4"):
            with urllib.request.urlopen(base + name, timeout=10) as r:
                types[name] = r.headers["Content-Type"]
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert types == {"index.html": "text/html; charset=utf-8", "a.mp4": "video/mp4", "a.webp": "image/webp",
                     "a.png": "image/png", "A.MP4": "video/mp4"}


def test_serve_answers_byte_ranges(tmp_path):
    """Players that fetch MP4s in ranges (Safari's) get 206 answers; no range, or several, gets the file."""
    from minfm_core.cli.run_cmd import gallery_server

    data = bytes(range(256)) * 4
    (tmp_path / "c.mp4").write_bytes(data)
    httpd = gallery_server(tmp_path, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

    def get(rng: str | None):
        req = urllib.request.Request(f"http://127.0.0.1:{httpd.server_address[1]}/c.mp4",
                                     headers={"Range": rng} if rng else {})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.headers.get("Content-Range"), r.headers["Content-Type"], r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Content-Range"), None, b""

    try:
        assert get(None) == (200, None, "video/mp4", data)
        assert get("bytes=10-19") == (206, "bytes 10-19/1024", "video/mp4", data[10:20])
        assert get("bytes=1000-") == (206, "bytes 1000-1023/1024", "video/mp4", data[1000:])
        assert get("bytes=-4") == (206, "bytes 1020-1023/1024", "video/mp4", data[-4:])
        assert get("bytes=1020-5000") == (206, "bytes 1020-1023/1024", "video/mp4", data[1020:])
        assert get("bytes=2000-2010")[:2] == (416, "bytes */1024")
        assert get("bytes=0-1,5-6") == (200, None, "video/mp4", data)  # several ranges: the whole file
        # Invalid ranges are ignored (RFC 9110), as is a bound too long for any file (int() of it raised)
        assert get("bytes=20-10") == (200, None, "video/mp4", data)
        assert get("bytes=" + "9" * 5000 + "-") == (200, None, "video/mp4", data)
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("bind", ["127.0.0.1", "0.0.0.0"])
def test_serve_on_loopback_answers_loopback_names_only(tmp_path, bind):
    """DNS rebinding: a page on evil.example whose name later resolves to 127.0.0.1 could read
    the run's files through the user's browser; its requests carry its own Host. A server the
    user opened to the network (--host 0.0.0.0) answers every name, as they asked."""
    import http.client

    from minfm_core.cli.run_cmd import gallery_server

    (tmp_path / "recipe.toml").write_text("job = 'train'")
    # names a user lets in (a proxy's), written as a Host header would carry them
    httpd = gallery_server(tmp_path, bind, 0, allowed_hosts=["Proxy.Example:8443", "[2001:db8::2]"])
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]

    def status(host: str | None) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.putrequest("GET", "/recipe.toml", skip_host=True)
        if host is not None:
            conn.putheader("Host", host)
        conn.endheaders()
        code = conn.getresponse().status
        conn.close()
        return code

    try:
        local = ["localhost", f"localhost:{port}", f"127.0.0.1:{port}", "127.0.0.2", f"[::1]:{port}",
                 "run.localhost", "LOCALHOST", "proxy.example", "proxy.example:443", "[2001:db8::2]:80"]
        assert [status(h) for h in local] == [200] * len(local)
        foreign = ["evil.example", f"evil.example:{port}", "10.0.0.1", "[2001:db8::1]:80", "localhost.evil.example"]
        assert [status(h) for h in foreign] == [403 if bind == "127.0.0.1" else 200] * len(foreign)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_serve_listens_on_ipv6_loopback_and_names_a_busy_port(tmp_path):
    import socket

    from minfm_core.cli.run_cmd import gallery_server

    (tmp_path / "a.png").write_bytes(b"png")
    if socket.has_ipv6:
        try:
            httpd = gallery_server(tmp_path, "::1", 0)  # was an IPv4 socket: "Address family ... not supported"
        except MinfmError as exc:
            pytest.skip(f"no IPv6 loopback here: {exc}")
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        try:
            with urllib.request.urlopen(f"http://[::1]:{httpd.server_address[1]}/a.png", timeout=10) as r:
                assert r.read() == b"png"
        finally:
            httpd.shutdown()
            httpd.server_close()
    busy = gallery_server(tmp_path, "127.0.0.1", 0)
    try:
        port = busy.server_address[1]
        with pytest.raises(MinfmError, match=rf"^--host 127.0.0.1 --port {port}: cannot listen there \("):
            gallery_server(tmp_path, "127.0.0.1", port)
    finally:
        busy.server_close()


def test_serve_keeps_to_its_folder_and_answers_odd_requests(tmp_path):
    import os

    from minfm_core.cli.run_cmd import gallery_server

    run, outside = tmp_path / "run", tmp_path / "outside"
    run.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("SECRET")
    (run / "ok.txt").write_text("fine")
    (run / "link.txt").symlink_to(outside / "secret.txt")
    (run / "linkdir").symlink_to(outside)
    (run / "inner.txt").symlink_to(run / "ok.txt")  # a link that stays inside is served
    os.mkfifo(run / "fifo")
    httpd = gallery_server(run, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

    def status(path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{httpd.server_address[1]}{path}", timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, b""

    try:
        got = {p: status(p) for p in ("/ok.txt", "/inner.txt", "/link.txt", "/linkdir/secret.txt", "/linkdir/",
                                       "/fifo", "/ok.txt%00.png")}
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert got == {"/ok.txt": (200, b"fine"), "/inner.txt": (200, b"fine"), "/link.txt": (404, b""),
                   "/linkdir/secret.txt": (404, b""), "/linkdir/": (404, b""), "/fifo": (404, b""),
                   "/ok.txt%00.png": (400, b"")}
