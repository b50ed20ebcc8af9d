"""Image sets `minfm eval` reads from outside: hostile .npz files and folders get one line naming
the file, before any pixel is read where the header already tells; sets are read in bounded batches."""

from __future__ import annotations

import hashlib
import struct
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval_helpers import TinyExtractor, images, save_npz
from minfm_core.cli.main import main as cli
from minfm_core.errors import MinfmError
from minfm_plugins.eval import inputs
from minfm_plugins.eval.evaluate import evaluate, extract_features
from minfm_plugins.eval.inputs import folder_images, image_batches


def npy_header(shape, descr="|u1", fortran=False) -> bytes:
    text = f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {tuple(shape)!r}, }}".encode()
    text += b" " * (63 - (10 + len(text)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


def zip_member(path, data: bytes, *, compressed=False, name="arr_0.npy", after: bytes = b"") -> str:
    method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=method) as z:
        z.writestr(name, data)
        if after:
            z.writestr("pad.npy", after)
    return str(path)


def patch_central(path, offset: int, fmt: str, value: int) -> None:
    """Set a field of the (only) member's central-directory entry: flags +8, method +10, CRC +16."""
    data = bytearray(Path(path).read_bytes())
    at = data.index(b"PK\x01\x02") + offset
    data[at : at + struct.calcsize(fmt)] = struct.pack(fmt, value)
    Path(path).write_bytes(bytes(data))


def one_line_error(call, path) -> str:
    with pytest.raises(MinfmError) as err:
        call()
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    return message


# ---- headers are checked before any pixel is read ----------------------------------------------


def test_a_header_declaring_a_bomb_is_refused_unread(tmp_path):
    """1e8 pixels an image (PIL's limit is ~89M), deflated data consistent with the header (0.3 MB):
    refused on its header alone, the member's 300 MB never decompressed."""
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z, \
            z.open("arr_0.npy", "w", force_zip64=True) as f:
        f.write(npy_header((1, 10_000, 10_000, 3)))
        for _ in range(30):
            f.write(bytes(10_000_000))
    tracemalloc.start()
    try:
        message = one_line_error(lambda: image_batches(path, 64), path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "images of 10000 x 10000 pixels" in message and "decompression-bomb limit" in message
    assert peak < 2**20


@pytest.mark.parametrize("compressed", [False, True])
def test_a_header_that_lies_about_its_shape_is_refused(tmp_path, compressed):
    # 4 x 8 x 8 x 3 = 768 bytes declared, 10 present; a stored member would map into the next one.
    path = zip_member(tmp_path / "lie.npz", npy_header((4, 8, 8, 3)) + bytes(10), compressed=compressed,
                      after=b"\xff" * 100_000)
    message = one_line_error(lambda: image_batches(path, 64), path)
    assert "arr_0.npy holds 138 bytes, but its header declares (4, 8, 8, 3) (896 bytes)" in message


def _savez(path, arr, **kw):
    np.savez(path, **kw) if kw else np.savez(path, arr_0=arr)
    return str(path)


BAD_HEADERS = {
    "object": (lambda p: _savez(p, np.empty((2, 2, 2, 3), dtype=object)), "must be uint8 (N, H, W, 3) images, got object"),
    "float32": (lambda p: _savez(p, np.zeros((2, 8, 8, 3), np.float32)), "got float32 (2, 8, 8, 3)"),
    "structured": (lambda p: _savez(p, np.zeros((2, 8, 8, 3), [("a", "u1")])), "must be uint8 (N, H, W, 3)"),
    "3-d": (lambda p: _savez(p, np.zeros((2, 8, 3), np.uint8)), "got uint8 (2, 8, 3)"),
    "4 channels": (lambda p: _savez(p, np.zeros((2, 8, 8, 4), np.uint8)), "got uint8 (2, 8, 8, 4)"),
    "fortran": (lambda p: _savez(p, np.asfortranarray(np.zeros((2, 8, 8, 3), np.uint8))), "Fortran order"),
    "zero height": (lambda p: _savez(p, np.zeros((2, 0, 8, 3), np.uint8)), "(2, 0, 8, 3): images need at least 1 x 1"),
    "negative count": (lambda p: zip_member(p, npy_header((-1, 8, 8, 3))), "(-1, 8, 8, 3): images need at least 1 x 1"),
    "negative sides": (lambda p: zip_member(p, npy_header((2, -8, -8, 3)), compressed=True), "images need at least"),
    "4 GB header": (lambda p: zip_member(p, b"\x93NUMPY\x02\x00" + struct.pack("<I", 2**32 - 1) + b"{}"),
                    "a .npy header of 4294967295 bytes"),
    "pickle member": (lambda p: zip_member(p, b"\x80\x04\x95" + bytes(40)), "not a .npy array"),
    "not a zip": (lambda p: p.write_bytes(b"\x93NUMPY\x01\x00" + bytes(100)), "not a readable .npz"),
    "other key": (lambda p: _savez(p, None, foo=np.zeros((2, 8, 8, 3), np.uint8)), "has no array 'arr_0' (has foo)"),
}


@pytest.mark.parametrize("kind", sorted(BAD_HEADERS))
def test_a_bad_npz_is_one_line_naming_the_file(tmp_path, kind):
    make, fragment = BAD_HEADERS[kind]
    path = tmp_path / "bad.npz"
    make(path)
    assert fragment in one_line_error(lambda: image_batches(path, 64), path)


def test_encrypted_and_unknown_compression_members_are_refused(tmp_path):
    enc = zip_member(tmp_path / "enc.npz", npy_header((2, 8, 8, 3)) + bytes(384))
    patch_central(enc, 8, "<H", 1)  # the "encrypted" flag
    assert "arr_0.npy is encrypted" in one_line_error(lambda: image_batches(enc, 64), enc)
    odd = zip_member(tmp_path / "odd.npz", npy_header((2, 8, 8, 3)) + bytes(384), compressed=True)
    patch_central(odd, 10, "<H", 99)  # AES, say: zipfile cannot read it
    assert "compression method is not supported" in one_line_error(lambda: image_batches(odd, 64), odd)


# ---- pixels are read batch by batch, and checked -------------------------------------------------


@pytest.mark.parametrize("compressed", [False, True])
def test_batches_are_the_images_in_bounded_memory(tmp_path, compressed):
    arr = np.zeros((200, 256, 256, 3), np.uint8)  # 39 MB, a few KB compressed
    arr[:, ::7, ::5] = np.arange(200, dtype=np.uint8)[:, None, None, None]
    path = tmp_path / "x.npz"
    (np.savez_compressed if compressed else np.savez)(path, arr_0=arr)
    # Each batch is digested inside the traced window and compared after it: comparing arrays
    # there put numpy's temporaries into the peak (9 MB once torch's modules were loaded too).
    tracemalloc.start()
    try:
        n, batches = image_batches(path, 4)
        counted = tracemalloc.get_traced_memory()[1]
        read = [(b.shape, hashlib.sha256(np.ascontiguousarray(b)).hexdigest()) for b in batches]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    want = [(arr[i : i + 4].shape, hashlib.sha256(arr[i : i + 4]).hexdigest()) for i in range(0, 200, 4)]
    assert read == want
    assert n == sum(shape[0] for shape, _ in read) == 200
    assert counted < 2**20  # the count is the header's: no pixel decompressed for it
    assert peak < 8 * 2**20  # a batch is 0.8 MB; the whole set 39 MB


@pytest.mark.parametrize("compressed", [False, True])
def test_a_crc_mismatch_is_an_error_once_the_member_is_read(tmp_path, compressed):
    path = tmp_path / "x.npz"
    (np.savez_compressed if compressed else np.savez)(path, arr_0=images(6, 0))
    info = zipfile.ZipFile(path).getinfo("arr_0.npy")
    patch_central(path, 16, "<I", info.CRC ^ 1)
    n, batches = image_batches(path, 2)  # counting reads no pixels, so no complaint yet
    assert n == 6
    message = one_line_error(lambda: list(batches), path)
    assert "CRC-32" in message
    with pytest.raises(MinfmError, match="CRC-32"):
        evaluate(path, save_npz(tmp_path / "r.npz", images(6, 1)), extractor=TinyExtractor(), device="cpu",
                 log=lambda _: None)


def test_a_flipped_pixel_in_a_stored_member_fails_its_crc(tmp_path):
    path = save_npz(tmp_path / "x.npz", images(6, 0))
    data = bytearray(Path(path).read_bytes())
    at = data.index(b"PK\x01\x02") - 1  # the member's last pixel byte: the central directory follows it
    data[at] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    with pytest.raises(MinfmError, match=r"x\.npz: arr_0\.npy fails its CRC-32 check"):
        extract_features(path, TinyExtractor(), batch_size=4)


def test_an_empty_npz_yields_nothing_and_evaluate_says_so(tmp_path):
    empty = save_npz(tmp_path / "empty.npz", np.zeros((0, 8, 8, 3), np.uint8))
    n, batches = image_batches(empty, 64)
    assert n == 0 and list(batches) == []
    with pytest.raises(MinfmError, match="at least 4 images are needed .*, found 0"):
        evaluate(empty, save_npz(tmp_path / "r.npz", images(4, 0)), extractor=TinyExtractor(), device="cpu")


def test_npz_batches_keep_to_the_pixel_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "BATCH_PIXELS", 3 * 16 * 16 + 5)
    path = save_npz(tmp_path / "x.npz", images(8, 0))
    assert [b.shape[0] for b in image_batches(path, 64)[1]] == [3, 3, 2]
    big = save_npz(tmp_path / "big.npz", images(2, 0, size=64))  # over the budget alone: one at a time
    assert [b.shape[0] for b in image_batches(big, 64)[1]] == [1, 1]


# ---- folders -------------------------------------------------------------------------------------


def test_folder_batches_keep_to_the_pixel_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "BATCH_PIXELS", 2 * 16 * 16 + 5)
    for i, a in enumerate(images(5, 0)):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    Image.fromarray(images(1, 0, size=40)[0]).save(tmp_path / "9.png")  # larger than the budget: alone
    n, batches = image_batches(tmp_path, 64)
    assert n == 6 and [b.shape[:3] for b in batches] == [(2, 16, 16), (2, 16, 16), (1, 16, 16), (1, 40, 40)]


def test_hidden_files_and_folders_are_not_part_of_the_set(tmp_path):
    root = tmp_path / ".cache" / "set"  # the set itself may live under a hidden folder
    for name in ("a.png", "sub/b.png", ".ipynb_checkpoints/a-checkpoint.png", ".Trash-0/files/c.png",
                 "sub/.d.png", "sub/.hidden/e.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images(1, 0)[0]).save(root / name)
    assert [p.relative_to(root).as_posix() for p in folder_images(root)] == ["a.png", "sub/b.png"]


@pytest.mark.parametrize("bad", [b"not a picture", None])  # garbage named .png; a PNG declaring a bomb
def test_a_bad_image_last_in_a_folder_fails_before_any_feature(tmp_path, bad):
    """Headers are read first: 'zz.png' (sorted last) is refused before the extractor sees an image."""
    for i, a in enumerate(images(4, 0)):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    last = tmp_path / "zz.png"
    if bad is None:
        with Image.new("RGB", (1, 1)) as im:
            im.save(last)
        data = bytearray(last.read_bytes())  # IHDR's width and height: 40,000 x 40,000, and its CRC to match
        data[16:24] = struct.pack(">II", 40_000, 40_000)
        data[29:33] = struct.pack(">I", zlib.crc32(data[12:29]))
        last.write_bytes(bytes(data))
    else:
        last.write_bytes(bad)
    seen = []

    class Counting(TinyExtractor):
        def __call__(self, batch):
            seen.append(batch.shape[0])
            return super().__call__(batch)

    message = one_line_error(lambda: evaluate(tmp_path, tmp_path, extractor=Counting(), batch_size=2), last)
    assert ("too large" if bad is None else "not a readable image") in message
    assert seen == []


def test_cli_eval_of_a_bomb_npz_is_one_line(tmp_path, capsys):
    bomb = zip_member(tmp_path / "s.npz", npy_header((2, 5000, 50_000, 3)) + bytes(1000), compressed=True)
    ref = save_npz(tmp_path / "r.npz", images(4, 0))
    assert cli(["eval", "imagenet", bomb, "--ref", ref, "--extractor", "eval_helpers:make_extractor"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"minfm: error: {bomb}: arr_0 holds images of 5000 x 50000 pixels")
