"""``imagenet`` on a tiny fake ILSVRC tree: labels, prompts, crops, flips and cached latents."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from minfm_core.config import structure
from minfm_core.errors import MinfmError
from minfm_core.registry import get_registry
from minfm_plugins.data.imagenet import class_names, imagenet_classes

TENCH, GOLDFISH, TEDDY = "n01440764", "n01443537", "n04399382"


def make(split: str = "train", **kw):
    comp = get_registry().get("dataset", "imagenet")
    return comp.build(structure(kw, comp.config), split=split)


def _jpeg(path, size=(96, 64)):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, (220, 220, 220))
    img.paste((0, 0, 255), (size[0] // 2 - size[1] // 2, 0, size[0] // 2, size[1]))  # left half of the centre square
    img.save(path, quality=95)


@pytest.fixture
def tree(tmp_path):
    for wnid, names in {TENCH: ["t1", "t2"], GOLDFISH: ["g1"], TEDDY: ["b1"]}.items():
        for n in names:
            _jpeg(tmp_path / "train" / wnid / f"{n}.JPEG")
    for i in (1, 2):
        _jpeg(tmp_path / "val" / f"ILSVRC2012_val_0000000{i}.JPEG")
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\nILSVRC2012_val_00000002,n04399382 1 2 3 4\nILSVRC2012_val_00000001,n01443537 1 2 3 4\n"
    )
    (tmp_path / "val_labels.txt").write_text("ILSVRC2012_val_00000001.JPEG 1\nILSVRC2012_val_00000002.JPEG n04399382\n")
    return tmp_path


def test_class_list_is_the_standard_1000():
    classes = imagenet_classes()
    assert len(classes) == 1000 and [w for w, _ in classes] == sorted(w for w, _ in classes)
    assert classes[0] == (TENCH, "tench") and class_names()[1] == "goldfish"
    assert dict(classes)[TEDDY] == "teddy"


def test_train_folder_labels_prompts_and_resolution(tree):
    ds = make(root=str(tree), resolution=32, p_flip=0.0, prompt_template="a photo of a {name}")
    assert len(ds) == 4
    samples = [ds[i] for i in range(4)]
    assert [s["label"] for s in samples] == [0, 0, 1, 850]
    assert [s["prompt"] for s in samples] == ["a photo of a tench"] * 2 + ["a photo of a goldfish", "a photo of a teddy"]
    assert [ds.prompt(i) for i in range(4)] == [s["prompt"] for s in samples]  # without decoding
    for s in samples:
        assert s["image"].shape == (3, 1, 32, 32) and s["image"].min() >= -1 and s["image"].max() <= 1
    # Center square crop: the blue block fills the left half of the crop.
    img = samples[0]["image"][:, 0]
    assert img[2, 16, 4] > 0.9 and img[0, 16, 4] < -0.8 and img[0, 16, 28] > 0.5


@pytest.mark.parametrize("labels", ["LOC_val_solution.csv", "val_labels.txt"])
def test_flat_val_with_label_file(tree, labels):
    ds = make("val", root=str(tree), resolution=16, val_labels=str(tree / labels))
    assert [(p.name, lab) for p, lab in ds.items] == [
        ("ILSVRC2012_val_00000001.JPEG", 1),
        ("ILSVRC2012_val_00000002.JPEG", 850),
    ]
    assert ds[1]["prompt"] == "teddy"


def test_flip_varies_with_epoch_is_reproducible_and_off_for_val(tree):
    ds = make(root=str(tree), resolution=32, p_flip=0.5)
    left_blue = []
    for epoch in range(10):
        ds.set_epoch(epoch)
        a = ds[0]["image"]
        ds.set_epoch(epoch)
        assert torch.equal(a, ds[0]["image"])
        left_blue.append(bool(a[2, 0, 16, 4] > 0.9))
    assert 0 < sum(left_blue) < 10
    flipped = left_blue.index(False)
    ds.set_epoch(flipped)
    ref = make(root=str(tree), resolution=32, p_flip=0.0)[0]["image"]
    assert torch.equal(ds[0]["image"], ref.flip(-1))
    labels = str(tree / "val_labels.txt")
    val = make("val", root=str(tree), resolution=32, p_flip=1.0, val_labels=labels)
    unflipped = make("val", root=str(tree), resolution=32, p_flip=0.0, val_labels=labels)
    assert torch.equal(val[0]["image"], unflipped[0]["image"])


def test_cached_latents(tmp_path):
    a, b, b_flip = torch.randn(4, 2, 3), torch.randn(4, 1, 2, 3), torch.randn(4, 1, 2, 3)
    save_file({"a": a, "b": b, "b_flip": b_flip}, str(tmp_path / "part-0.safetensors"))
    (tmp_path / "index.json").write_text(json.dumps([
        {"shard": "part-0.safetensors", "key": "a", "label": 1},
        {"shard": "part-0.safetensors", "key": "b", "flip_key": "b_flip", "prompt": "custom", "label": 2},
        {"shard": "part-0.safetensors", "key": "a", "label": 0, "split": "val"},
    ]))
    ds = make(use_cached_latents=True, latents_dir=str(tmp_path), p_flip=0.0)
    assert len(ds) == 2
    s0, s1 = ds[0], ds[1]
    assert torch.equal(s0["latent"], a.unsqueeze(1)) and s0["prompt"] == "goldfish" and s0["label"] == 1
    assert torch.equal(s1["latent"], b) and s1["prompt"] == "custom"
    assert "image" not in s0
    always = make(use_cached_latents=True, latents_dir=str(tmp_path), p_flip=1.0)
    assert torch.equal(always[0]["latent"], a.unsqueeze(1).flip(-1))  # no flipped copy: flip the tensor
    assert torch.equal(always[1]["latent"], b_flip)  # a flipped copy in the cache wins
    val = make("val", use_cached_latents=True, latents_dir=str(tmp_path), p_flip=1.0)
    assert len(val) == 1 and val[0]["prompt"] == "tench" and torch.equal(val[0]["latent"], a.unsqueeze(1))


def test_errors_are_clear(tree):
    with pytest.raises(MinfmError, match="set 'root'"):
        make()
    (tree / "train" / "cats").mkdir()
    with pytest.raises(MinfmError, match="not an ILSVRC-2012 class folder"):
        make(root=str(tree))
    with pytest.raises(MinfmError, match="no index.json"):
        make(use_cached_latents=True, latents_dir=str(tree / "none"))
    (tree / "index.json").write_text('[{"shard": "s.safetensors", "key": "k", "label": 3}]')
    with pytest.raises(MinfmError, match="prompt_template"):
        make(use_cached_latents=True, latents_dir=str(tree), prompt_template="{label}")
    with pytest.raises(MinfmError, match="latent shard .* not found"):
        make(use_cached_latents=True, latents_dir=str(tree))[0]


@pytest.mark.parametrize(("name", "content", "message"), [
    ("labels.csv", b"a,b\n1,2\n", r"labels.csv:2: expected columns ImageId and PredictionString"),
    ("labels.csv", b"ImageId,PredictionString\nILSVRC2012_val_00000001,\n", r"labels.csv:2: expected columns"),
    ("labels.txt", b"ILSVRC2012_val_00000001.JPEG\n", r"labels.txt:1: expected '<file> <wnid or label>'"),
    ("labels.txt", b"\xff\xfeI\x00L\x00", r"labels.txt: not UTF-8 text \(byte 0\)"),
    ("labels.txt", "ILSVRC2012_val_00000001.JPEG \u00b2\n".encode(), r"labels.txt:1: '\u00b2' is neither a WordNet id"),
    ("labels.txt", b"ILSVRC2012_val_00000001.JPEG 0\nILSVRC2012_val_00000001.JPEG 5\n",
     r"labels.txt: image 'ILSVRC2012_val_00000001' is labelled more than once"),
])
def test_a_malformed_val_labels_file_names_its_line(tree, name, content, message):
    """A headerless CSV, a line of one token or a UTF-16 file were KeyError / ValueError / UnicodeDecodeError tracebacks."""
    (tree / name).write_bytes(content)
    with pytest.raises(MinfmError, match=f"imagenet: .*{message}"):
        make("val", root=str(tree), resolution=16, val_labels=str(tree / name))


@pytest.mark.parametrize(("name", "content", "message"), [
    # csv's field limit (131,072 characters) raised _csv.Error
    ("labels.csv", "ImageId,PredictionString\nILSVRC2012_val_00000001,n01440764 1\nx," + "n" * 200_000 + "\n",
     r"labels.csv:3: not a readable CSV row \(field larger than field limit"),
    # an unclosed quote runs to the end of the file: the same limit, named at the line it opens
    ("labels.csv", 'ImageId,PredictionString\nILSVRC2012_val_00000001,"n01440764 1\n' + "x,y\n" * 50_000,
     r"labels.csv:2: not a readable CSV row \(field larger than field limit"),
    # int() of 5000 digits raised ValueError (Python's 4300-digit limit) before the range check
    ("labels.txt", "ILSVRC2012_val_00000001.JPEG 0\nILSVRC2012_val_00000002.JPEG " + "9" * 5000 + "\n",
     r"labels.txt:2: '9{60}\.\.\.' is neither a WordNet id nor a label 0-999$"),
    ("labels.txt", "ILSVRC2012_val_00000001.JPEG 1000\n", r"labels.txt:1: '1000' is neither a WordNet id"),
], ids=["long-field", "unclosed-quote", "5000-digits", "1000"])
def test_a_hostile_val_labels_file_is_one_error_naming_its_line(tree, name, content, message):
    (tree / name).write_text(content)
    with pytest.raises(MinfmError, match=f"imagenet: .*{message}"):
        make("val", root=str(tree), resolution=16, val_labels=str(tree / name))


def test_label_tokens_with_leading_zeros_still_read(tree):
    (tree / "labels.txt").write_text("ILSVRC2012_val_00000001.JPEG 0001\nILSVRC2012_val_00000002.JPEG 000\n")
    ds = make("val", root=str(tree), resolution=16, val_labels=str(tree / "labels.txt"))
    assert [lab for _, lab in ds.items] == [1, 0]


def test_a_long_val_labels_file_is_checked_for_duplicates_in_linear_time(tree):
    """stems.count(s) per stem: 40,000 lines took 35 s, a 64 MiB list hours."""
    import time

    n = 30_000  # the old check: ~20 s
    lines = [f"ILSVRC2012_val_{i:08d}.JPEG 0" for i in range(n)] + ["ILSVRC2012_val_00000007.JPEG 3"]
    (tree / "labels.txt").write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    with pytest.raises(MinfmError, match=r"image 'ILSVRC2012_val_00000007' is labelled more than once"):
        make("val", root=str(tree), resolution=16, val_labels=str(tree / "labels.txt"))
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("template, message", [
    ("{nme}", "may use {name} only, not {nme}"),
    ("{name.upper}", "may use {name} only, not {name.upper}"),  # made prompts of a method's repr
    ("{name[0]}", "may use {name} only, not {name[0]}"),
    ("{", "is not a template of {name}"),
    ("{name:d}", "is not a template of {name}"),
    ("{name!r}", "is not a template of {name} (no format spec or conversion"),
    # padded to 10 M characters: 10 GB of prompts, and 1 GB inside the old validator itself
    ("{name:>10000000}", "is not a template of {name} (no format spec or conversion"),
    ("{name:>1000000000}", "is not a template of {name} (no format spec or conversion"),
    ("{name:{name}}", "is not a template of {name} (no format spec or conversion"),
])
def test_a_prompt_template_uses_the_name_plainly(template, message):
    from minfm_core.config import structure
    from minfm_core.errors import RecipeError

    comp = get_registry().get("dataset", "imagenet")
    with pytest.raises(RecipeError, match=re.escape(f"data.prompt_template: {template!r} {message}")):
        structure({"root": "/x", "prompt_template": template}, comp.config, path="data")
    assert structure({"root": "/x", "prompt_template": "a photo of a {name}"}, comp.config).prompt_template
    assert structure({"root": "/x", "prompt_template": "{{{name}}}"}, comp.config).prompt_template  # braces escaped


@pytest.mark.skipif(not os.path.isfile("/proc/self/status"), reason="peak RSS is read from Linux's /proc")
def test_a_prompt_template_is_refused_without_formatting_it():
    """The validator formatted the template: {name:>1000000000} allocated 1 GB there. Peak RSS is /proc's
    VmHWM of a fresh process (getrusage's ru_maxrss outlives exec: a child of pytest starts at its size)."""
    import subprocess
    import sys

    code = ("import re\n"
            "from minfm_core.config import structure\nfrom minfm_core.errors import RecipeError\n"
            "from minfm_core.registry import get_registry\n"
            "def peak(): return int(re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read()).group(1))\n"
            "comp = get_registry().get('dataset', 'imagenet')\n"
            "before = peak()\n"
            "try:\n    structure({'root': '/x', 'prompt_template': '{name:>1000000000}'}, comp.config)\n"
            "except RecipeError:\n    pass\n"
            "print(peak() - before)")
    grown_kib = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert grown_kib < 100_000, grown_kib  # the old validator: ~1,000,000 KiB


def test_a_prompt_template_has_a_length_bound():
    from minfm_core.config import structure
    from minfm_core.errors import RecipeError

    comp = get_registry().get("dataset", "imagenet")
    with pytest.raises(RecipeError, match=r"data.prompt_template: 5,000 characters; at most 4,096"):
        structure({"root": "/x", "prompt_template": "{name}" + "x" * 4994}, comp.config, path="data")


def test_shapes_need_at_least_one_size():
    from minfm_core.config import structure
    from minfm_core.errors import RecipeError

    for name in ("shapes", "moving_shapes"):
        comp = get_registry().get("dataset", name)
        with pytest.raises(RecipeError, match=r"data.sizes: give at least one \(height, width\)"):
            structure({"sizes": []}, comp.config, path="data")


def test_val_labels_lines_end_at_newlines_only(tree):
    """str.splitlines() broke a line at U+2028 / U+0085 (a file name may hold them) and moved the line numbers."""
    (tree / "val" / "ILSVRC2012_val_00000001.JPEG").rename(tree / "val" / "odd\u2028name\x85.JPEG")
    (tree / "labels.txt").write_text("odd\u2028name\x85.JPEG 1\r\nILSVRC2012_val_00000002.JPEG n04399382\r\n")
    ds = make("val", root=str(tree), resolution=16, val_labels=str(tree / "labels.txt"))
    assert [(p.name, lab) for p, lab in ds.items] == [("ILSVRC2012_val_00000002.JPEG", 850), ("odd\u2028name\x85.JPEG", 1)]
    (tree / "labels.txt").write_text("odd\u2028name\x85.JPEG 1\nILSVRC2012_val_00000002.JPEG\n")
    with pytest.raises(MinfmError, match=r"labels.txt:2: expected '<file> <wnid or label>'"):
        make("val", root=str(tree), resolution=16, val_labels=str(tree / "labels.txt"))


def test_a_label_matches_the_file_it_names_not_any_of_its_stem(tree):
    """x.JPEG and x.png both in val/: the label of x.png went to whichever the folder listed last."""
    Image.new("RGB", (40, 30), (0, 255, 0)).save(tree / "val" / "ILSVRC2012_val_00000001.png")
    (tree / "labels.txt").write_text("ILSVRC2012_val_00000001.png n01443537\n")
    ds = make("val", root=str(tree), resolution=16, val_labels=str(tree / "labels.txt"))
    assert [(p.name, lab) for p, lab in ds.items] == [("ILSVRC2012_val_00000001.png", 1)]
    # Kaggle's CSV names the stem alone: two pictures of that stem are refused, not picked from
    with pytest.raises(MinfmError, match=r"LOC_val_solution.csv:3: image 'ILSVRC2012_val_00000001' could be any of "
                                         r"ILSVRC2012_val_00000001.JPEG, ILSVRC2012_val_00000001.png"):
        make("val", root=str(tree), resolution=16, val_labels=str(tree / "LOC_val_solution.csv"))


@pytest.mark.parametrize("kind", ["folder", "loop"])
def test_a_folder_or_dead_link_named_like_a_picture_is_refused_by_the_scan(tree, kind):
    """Was: listed as a picture, and the loader failed on it at its batch."""
    bad = tree / "train" / TENCH / f"{kind}.JPEG"
    bad.mkdir() if kind == "folder" else bad.symlink_to(bad.name)
    with pytest.raises(MinfmError, match=re.escape(f"imagenet: {bad}: not a picture file")):
        make(root=str(tree), resolution=16)


def test_a_downloaded_trees_links_may_not_lead_out_of_it(tree, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    _jpeg(outside / "secret.JPEG")
    (tree / "train" / TENCH / "linked.JPEG").symlink_to(outside / "secret.JPEG")
    assert len(make(root=str(tree), resolution=16)) == 5  # one's own tree: links are followed
    (tree / "minfm_source.json").write_text("{}")
    with pytest.raises(MinfmError, match=re.escape(f"linked.JPEG: refusing a symlink that leads outside {tree}")):
        make(root=str(tree), resolution=16)
