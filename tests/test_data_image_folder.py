"""``image_folder``: both caption conventions, the token budget, splits and flips."""

from __future__ import annotations

import json
import os
import re
import warnings

import pytest
import torch
from PIL import Image

from minfm_core.config import structure
from minfm_core.errors import MinfmError
from minfm_core.registry import get_registry
from minfm_plugins.data.images import budget_size


def make(split: str = "train", **kw):
    comp = get_registry().get("dataset", "image_folder")
    return comp.build(structure(kw, comp.config), split=split)


def _image(path, size, colour=(200, 30, 30)):
    img = Image.new("RGB", size, colour)
    img.paste((0, 0, 255), (0, 0, size[0] // 4, size[1]))  # a blue strip on the left shows flips
    img.save(path)


@pytest.fixture
def metadata_folder(tmp_path):
    sizes = {"wide.png": (400, 200), "tall.jpg": (150, 300), "square.png": (64, 64)}
    (tmp_path / "imgs").mkdir()
    with open(tmp_path / "metadata.jsonl", "w") as f:
        for name, size in sizes.items():
            _image(tmp_path / "imgs" / name, size)
            f.write(json.dumps({"file_name": f"imgs/{name}", "text": f"a photo named {name}"}) + "\n")
    return tmp_path


def test_metadata_jsonl_captions_and_token_budget(metadata_folder):
    ds = make(root=str(metadata_folder), max_pixels=64 * 64, val_fraction=0.0)
    assert len(ds) == 3
    seen = {}
    for i in range(3):
        s = ds[i]
        img = s["image"]
        assert img.shape[0] == 3 and img.shape[1] == 1
        h, w = img.shape[2:]
        assert h % 16 == 0 and w % 16 == 0
        assert h * w <= 64 * 64 and h * w >= 0.6 * 64 * 64  # about the budget, never over
        assert img.min() >= -1 and img.max() <= 1
        seen[s["prompt"]] = (h, w)
    assert seen["a photo named wide.png"] == (32, 80)  # 2:1 kept as far as multiples of 16 allow
    assert seen["a photo named tall.jpg"] == (80, 32)
    assert seen["a photo named square.png"] == (64, 64)  # small images are scaled up to the budget


def test_sidecar_captions_and_subfolders(tmp_path):
    (tmp_path / "a").mkdir()
    for i, size in enumerate([(100, 100), (300, 100)]):
        _image(tmp_path / "a" / f"{i}.png", size)
        (tmp_path / "a" / f"{i}.txt").write_text(f"  caption {i}\n")
    ds = make(root=str(tmp_path), captions="sidecar", max_pixels=48 * 48, size_multiple=8, val_fraction=0.0)
    assert [ds[i]["prompt"] for i in range(2)] == ["caption 0", "caption 1"] == [ds.prompt(i) for i in range(2)]
    assert tuple(ds[1]["image"].shape[2:]) == (24, 80)


def test_held_out_val_is_disjoint_and_split_folders_win(tmp_path):
    for i in range(20):
        _image(tmp_path / f"{i}.png", (32, 32))
        (tmp_path / f"{i}.txt").write_text(f"c{i}")
    train = make(root=str(tmp_path), val_fraction=0.1)
    val = make("val", root=str(tmp_path), val_fraction=0.1)
    assert 1 <= len(val) <= 5 and len(train) + len(val) == 20
    assert not {p for p, _ in train.items} & {p for p, _ in val.items}
    (tmp_path / "val").mkdir()
    _image(tmp_path / "val" / "v.png", (32, 32))
    (tmp_path / "val" / "v.txt").write_text("held")
    assert [c for _, c in make("val", root=str(tmp_path)).items] == ["held"]


def test_flip_is_deterministic_per_epoch_and_train_only(metadata_folder):
    ds = make(root=str(metadata_folder), p_flip=0.5, val_fraction=0.0, max_pixels=32 * 32)
    flips = []
    for epoch in range(8):
        ds.set_epoch(epoch)
        img = ds[2]["image"]  # square.png: blue strip on the left unless flipped
        flips.append(bool(img[2, 0, 16, -1] > 0.5))
        ds.set_epoch(epoch)
        assert torch.equal(ds[2]["image"], img)
    assert 0 < sum(flips) < 8
    never = make(root=str(metadata_folder), p_flip=0.0, val_fraction=0.0, max_pixels=32 * 32)
    assert not bool(never[2]["image"][2, 0, 16, -1] > 0.5)


def test_errors_are_clear(tmp_path):
    with pytest.raises(MinfmError, match="is not a folder"):
        make(root=str(tmp_path / "nope"))
    _image(tmp_path / "x.png", (32, 32))
    with pytest.raises(MinfmError, match="no caption"):
        make(root=str(tmp_path))
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "missing.png", "text": "t"}\n')
    with pytest.raises(MinfmError, match="missing.png' not found"):
        make(root=str(tmp_path))


@pytest.mark.parametrize(
    ("w", "h", "budget", "m", "expected"),
    [(1000, 1000, 256 * 256, 16, (256, 256)), (1600, 900, 256 * 256, 16, (336, 192)), (10, 1000, 64 * 64, 16, (16, 256))],
)
def test_budget_size(w, h, budget, m, expected):
    got = budget_size(w, h, budget, m)
    assert got == expected and got[0] * got[1] <= budget


@pytest.mark.parametrize("name", ["../outside.png", "/tmp/outside.png", "imgs/../../outside.png", "~/outside.png",
                                  "imgs\\a.png", "", 5, None])
def test_metadata_file_names_stay_below_the_metadata(tmp_path, name):
    """A downloaded dataset's metadata.jsonl cannot point its loader at files outside its folder."""
    _image(tmp_path / "outside.png", (32, 32))
    root = tmp_path / "data"
    root.mkdir()
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": name, "text": "a picture"}) + "\n")
    with pytest.raises(MinfmError) as err:
        make(root=str(root), val_fraction=0.0)
    assert str(err.value).startswith(f"image_folder: {root / 'metadata.jsonl'}:1: file_name: refusing path {name!r}: ")


def test_images_linked_in_from_elsewhere_still_load(tmp_path):
    """Links of one's own are not an attack: a folder may symlink its images from another disk."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _image(elsewhere / "a.png", (32, 32))
    root = tmp_path / "data"
    root.mkdir()
    (root / "imgs").symlink_to(elsewhere)
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "imgs/a.png", "text": "a picture"}) + "\n")
    ds = make(root=str(root), val_fraction=0.0)
    assert len(ds) == 1 and ds[0]["prompt"] == "a picture"


@pytest.mark.parametrize(("layout", "content", "message"), [
    ("sidecar", b"\xff\xfe a caption in UTF-16", "a.txt: not UTF-8 text (byte 0)"),
    ("sidecar", b"x" * ((1 << 20) + 1), "a.txt: 1,048,577 bytes is more than the 1,048,576 accepted"),
    ("metadata", b'{"file_name": "a.png", "text": "\xff"}\n', "metadata.jsonl: not UTF-8 text (byte 32)"),
])
def test_caption_files_are_utf8_and_bounded(tmp_path, layout, content, message):
    """A non-UTF-8 caption was a UnicodeDecodeError traceback; a huge one was read into memory whole."""
    _image(tmp_path / "a.png", (32, 32))
    (tmp_path / ("a.txt" if layout == "sidecar" else "metadata.jsonl")).write_bytes(content)
    with pytest.raises(MinfmError) as err:
        make(root=str(tmp_path), val_fraction=0.0)
    assert str(err.value).startswith("image_folder: ") and str(err.value).endswith(message), str(err.value)


@pytest.mark.parametrize("rows, message", [
    ([{"file_name": "a.png", "text": None}], "'text' must be text, got NoneType"),
    ([{"file_name": "a.png", "text": ["a", "b"]}], "'text' must be text, got list"),
    ([{"file_name": "a.png", "text": "one"}, {"file_name": "a.png", "text": "two"}],
     "metadata.jsonl:2: 'a.png' is listed again (first at line 1)"),
], ids=["null", "list", "twice"])
def test_metadata_rows_must_hold_one_text_caption_per_image(tmp_path, rows, message):
    _image(tmp_path / "a.png", (32, 32))
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(MinfmError, match=re.escape(message)):
        make(root=str(tmp_path), val_fraction=0.0)


def test_metadata_captions_are_stripped_like_sidecars(tmp_path):
    _image(tmp_path / "a.png", (32, 32))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "  a red square \n"}) + "\n")
    assert make(root=str(tmp_path), val_fraction=0.0).prompt(0) == "a red square"


def test_a_split_folder_lends_none_of_its_images_to_the_other_split(tmp_path):
    (tmp_path / "train").mkdir()
    for i in range(20):
        _image(tmp_path / "train" / f"{i}.png", (32, 32))
        (tmp_path / "train" / f"{i}.txt").write_text(f"train {i}")
    assert len(make("train", root=str(tmp_path), val_fraction=0.1)) == 20
    with pytest.raises(MinfmError, match="no captioned images for split 'val'"):
        make("val", root=str(tmp_path), val_fraction=0.1)  # was 2 of train/'s pictures
    (tmp_path / "val").mkdir()
    for i in range(4):
        _image(tmp_path / "val" / f"v{i}.png", (32, 32))
        (tmp_path / "val" / f"v{i}.txt").write_text(f"val {i}")
    (tmp_path / "train").rename(tmp_path / "loose")  # val/ plus pictures elsewhere under the root
    train = make("train", root=str(tmp_path), val_fraction=0.1)
    assert not any(train.prompt(i).startswith("val") for i in range(len(train)))


def _captioned(path, caption="a picture", size=(16, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)
    path.with_suffix(".txt").write_text(caption)


def _names(ds):
    return sorted(p.name for p, _ in ds.items)


def test_a_file_name_that_is_not_utf8_is_held_out_by_its_bytes(tmp_path):
    """The held-out hash encoded the name as UTF-8: a Latin-1 name was a UnicodeEncodeError traceback."""
    for name in (os.fsdecode(b"caf\xe9.png"), "ok.png", "other.png"):
        _captioned(tmp_path / name)
    train, val = make(root=str(tmp_path), val_fraction=0.3), make("val", root=str(tmp_path), val_fraction=0.3)
    assert len(train) + len(val) == 3 and len(val) >= 1


def test_the_held_out_split_of_a_picture_never_changes_as_pictures_are_added(tmp_path):
    """The first ceil(fraction * n) by hash were held out: adding pictures moved trained ones into val."""
    for i in range(40):
        _captioned(tmp_path / f"a{i}.png", size=(8, 8))
    val_before = set(_names(make("val", root=str(tmp_path), val_fraction=0.2)))
    for i in range(40):
        _captioned(tmp_path / f"b{i}.png", size=(8, 8))
    val_after = set(_names(make("val", root=str(tmp_path), val_fraction=0.2)))
    assert val_before and {n for n in val_after if n.startswith("a")} == val_before


def test_metadata_in_one_folder_and_sidecars_in_another_are_refused_not_dropped(tmp_path):
    """captions = 'auto' read the metadata and silently left out the sidecar-captioned pictures."""
    _captioned(tmp_path / "a" / "x.png")
    (tmp_path / "a" / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "x"}) + "\n")
    _captioned(tmp_path / "b" / "y.png")
    with pytest.raises(MinfmError) as err:
        make(root=str(tmp_path), val_fraction=0.0)
    assert f"{tmp_path / 'a' / 'metadata.jsonl'} captions this folder, but {tmp_path / 'b' / 'y.png'} has a .txt " \
           "caption" in str(err.value)
    assert _names(make(root=str(tmp_path), val_fraction=0.0, captions="metadata")) == ["x.png"]
    assert _names(make(root=str(tmp_path), val_fraction=0.0, captions="sidecar")) == ["x.png", "y.png"]


def test_sidecar_mode_follows_symlinked_folders_as_metadata_mode_does_and_stops_at_loops(tmp_path):
    """Path.rglob skipped the linked folder's pictures in sidecar mode only."""
    _captioned(tmp_path / "elsewhere" / "c.png")
    root = tmp_path / "data"
    _captioned(root / "a.png")
    (root / "linked").symlink_to(tmp_path / "elsewhere")
    (root / "linked" / "again").symlink_to(root)  # a loop back to the root
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = make(root=str(root), val_fraction=0.0)
    assert [str(p.relative_to(root)) for p, _ in ds.items] == ["a.png", "linked/c.png"]
    assert any("not reading 1 symlinked folder(s) read already" in str(w.message) for w in caught)


def test_one_picture_in_two_metadata_files_is_refused(tmp_path):
    _captioned(tmp_path / "sub" / "x.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "sub/x.png", "text": "one"}) + "\n")
    (tmp_path / "sub" / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "two"}) + "\n")
    with pytest.raises(MinfmError, match=re.escape(
            f"{tmp_path / 'sub' / 'metadata.jsonl'}:1: 'x.png' is listed again (first at {tmp_path / 'metadata.jsonl'}:1)")):
        make(root=str(tmp_path), val_fraction=0.0)


def test_metadata_lines_end_at_newlines_only(tmp_path):
    """str.splitlines() cut a caption at U+2028 / U+0085, valid unescaped in JSON strings."""
    for name in ("a.png", "b.png"):
        _image(tmp_path / name, (16, 16))
    rows = [{"file_name": "a.png", "text": "first\u2028second"}, {"file_name": "b.png", "text": "caf\x85e"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows))
    assert [c for _, c in make(root=str(tmp_path), val_fraction=0.0).items] == ["first\u2028second", "caf\x85e"]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + "{\n")
    with pytest.raises(MinfmError, match=r"metadata.jsonl:3: "):
        make(root=str(tmp_path), val_fraction=0.0)


def test_a_metadata_caption_is_bounded_as_a_sidecar_is(tmp_path):
    _image(tmp_path / "a.png", (16, 16))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x" * ((1 << 20) + 1)}) + "\n")
    with pytest.raises(MinfmError, match=re.escape(f"{tmp_path / 'metadata.jsonl'}:1: 'text': a caption of 1,048,577 "
                                                   "bytes is more than the 1,048,576 accepted")):
        make(root=str(tmp_path), val_fraction=0.0)


def test_folders_and_dead_links_named_like_pictures_are_found_by_the_scan(tmp_path):
    """dir.png (with dir.txt) became an item, and a link loop named loop.png one too: both failed at a batch."""
    _captioned(tmp_path / "a.png")
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "dir.txt").write_text("a folder")
    assert _names(make(root=str(tmp_path), val_fraction=0.0)) == ["a.png"]
    (tmp_path / "loop.png").symlink_to("loop.png")
    (tmp_path / "loop.txt").write_text("a loop")
    with pytest.raises(MinfmError, match=re.escape(f"{tmp_path / 'loop.png'}: a symlink that leads nowhere")):
        make(root=str(tmp_path), val_fraction=0.0)


@pytest.mark.parametrize("layout", ["metadata", "sidecar"])
def test_a_downloaded_datasets_links_may_not_lead_out_of_it(tmp_path, layout):
    """With a source marker (a folder a resolver downloaded), m9/etc -> /etc read the host's files."""
    outside = tmp_path / "outside"
    _captioned(outside / "secret.png", "a secret")
    root = tmp_path / "download"
    root.mkdir()
    _image(root / "a.png", (16, 16))
    (root / "minfm_source.json").write_text("{}")
    if layout == "metadata":
        (root / "out").symlink_to(outside)
        (root / "metadata.jsonl").write_text(json.dumps({"file_name": "out/secret.png", "text": "x"}) + "\n")
        bad = root / "out"
    else:
        (root / "a.txt").symlink_to(outside / "secret.txt")
        bad = root / "a.txt"
    with pytest.raises(MinfmError, match=re.escape(f"{bad}: refusing a symlink that leads outside {root}")):
        make(root=str(root), val_fraction=0.0)
    (root / "minfm_source.json").unlink()  # one's own folder: links are followed
    assert len(make(root=str(root), val_fraction=0.0)) >= 1


def test_a_root_metadata_beside_split_folders_is_named(tmp_path):
    """Was: "no metadata.jsonl" though there was one, at the root, where a split folder does not look."""
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        _image(tmp_path / split / "x.png", (16, 16))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "train/x.png", "text": "x"}) + "\n")
    for captions in ("auto", "metadata"):
        with pytest.raises(MinfmError, match=re.escape(
                f"{tmp_path / 'metadata.jsonl'} is not read: this split's pictures are in {str(tmp_path / 'train')!r}, "
                "which needs its own metadata.jsonl")):
            make(root=str(tmp_path), captions=captions)


def test_a_budget_under_one_multiple_square_is_refused_by_check(capsys):
    from minfm_core.cli.main import main

    rc = main(["check", "recipes/quickstart.toml", "--set",
               "data={name = 'image_folder', root = '/nowhere', max_pixels = 100, size_multiple = 16}"])
    err = capsys.readouterr().err
    assert rc == 2 and "data.max_pixels: 100 is less than one size_multiple square (16 x 16 = 256)" in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("folder", ["train", "val", "validation"])
def test_pictures_beside_a_lone_split_folder_are_the_other_split_none_dropped(tmp_path, folder):
    """Loose pictures beside one split folder were hashed: the share the hash gave the split whose
    folder was read instead ended up in neither split (top.png, with val/ only)."""
    loose = [f"top{i}.png" for i in range(6)]
    for name in loose:
        _captioned(tmp_path / name)
    for i in range(2):
        _captioned(tmp_path / folder / f"in{i}.png")
    train, val = (make(split, root=str(tmp_path), val_fraction=0.2) for split in ("train", "val"))
    beside = val if folder == "train" else train
    assert _names(beside) == loose
    assert sorted(_names(train) + _names(val)) == sorted(loose + ["in0.png", "in1.png"])
