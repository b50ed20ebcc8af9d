"""`minfm data imagenet prepare` on a tiny fake ILSVRC tree with a tiny text encoder and the identity VAE."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from engine_helpers import TINY
from minfm_core.cli.main import main as cli
from minfm_core.errors import MinfmWarning
from minfm_core.recipe import load_recipe

VOCAB = '{name = "vocab", dim = 16}'  # per-token: mean-pooled into one row per class


@pytest.fixture
def ilsvrc(tmp_path) -> Path:
    from PIL import Image

    root = tmp_path / "ILSVRC"
    rng = np.random.default_rng(0)
    layout = {"train/n01440764": 2, "train/n01443537": 1, "val/n01440764": 1}
    for folder, n in layout.items():
        (root / folder).mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / folder / f"{Path(folder).name}_{i}.JPEG")
    return root


def recipe(tmp_path: Path, root: Path, out: Path) -> Path:
    path = tmp_path / "inet.toml"
    table = json.dumps(str(out / "class_embeddings.safetensors"))
    path.write_text(f"""
extends = {json.dumps(str(TINY))}
[run]
exp_dir = {json.dumps(str(tmp_path / "exp"))}
[model.text_encoder]
name = "class_embedding"
embeddings = {table}
dim = 16
[model.clip_encoder]
name = "class_embedding"
embeddings = {table}
dim = 16
pooled = true
[data]
name = "imagenet"
root = {json.dumps(str(root))}
resolution = 16
size_multiple = 8
""")
    return path


def test_prepare_writes_classes_embeddings_and_latents(ilsvrc, tmp_path, capsys):
    out = tmp_path / "prepared"
    r = recipe(tmp_path, ilsvrc, out)
    assert cli(["data", "imagenet", "prepare", str(ilsvrc), "--recipe", str(r), "--out", str(out),
                "--encoder", VOCAB, "--latents", "--shard-size", "2"]) == 0

    classes = json.loads((out / "classes.json").read_text())
    assert len(classes) == 1000 and classes[0] == {"label": 0, "wnid": "n01440764", "name": "tench", "prompt": "tench"}
    assert json.loads((out / "label_map.json").read_text())["n01443537"] == 1
    rows = json.loads((out / "class_embeddings.json").read_text())
    assert rows["tench"] == 0 and rows["goldfish"] == 1 and rows[""] == 1000
    cranes = [c["label"] for c in classes if c["name"] == "crane"]
    assert len(cranes) == 2 and rows["crane"] == cranes[0]
    # The other shared first lemma is told apart, as in the seed's prompts: each its own row.
    assert (rows["maillot"], rows["maillot, tank suit"]) == (638, 639)
    assert len(rows) == 1000  # 999 class texts (the cranes share one) and the unconditional ""
    assert not [p for p in out.rglob("*") if p.suffix in (".pt", ".pth", ".pkl", ".bin")]  # never pickle

    # The table is what the recipe's class_embedding encoder loads, row for row.
    resolved = load_recipe(r)
    enc = resolved["model.text_encoder"].build(load_weights=True)
    from minfm_plugins.data.imagenet_prepare import encode_prompts, parse_encoder

    comp, cfg = parse_encoder(VOCAB)
    expected = encode_prompts(comp.build(cfg), ["tench", "goldfish", ""], 8)
    got, lens = enc(["tench", "goldfish", ""])
    assert lens.tolist() == [1, 1, 1]
    torch.testing.assert_close(got, expected)

    # Latents in the cache layout the imagenet dataset reads.
    train = json.loads((out / "latents" / "train" / "index.json").read_text())["entries"]
    val = json.loads((out / "latents" / "val" / "index.json").read_text())["entries"]
    assert [e["label"] for e in train] == [0, 0, 1] and [e["label"] for e in val] == [0]
    assert sorted(p.name for p in (out / "latents" / "train").glob("part-*.safetensors")) == \
        ["part-00000.safetensors", "part-00001.safetensors"]
    cached = load_recipe(r, ["data.use_cached_latents=true", f"data.latents_dir={json.dumps(str(out / 'latents'))}"])
    ds = cached["data"].build(split="train")
    assert len(ds) == 3 and ds[2]["prompt"] == "goldfish" and ds[0]["latent"].shape == (3, 1, 16, 16)


def test_prepared_data_trains(ilsvrc, tmp_path):
    from minfm_core.engine.train import train

    out = tmp_path / "prepared"
    r = recipe(tmp_path, ilsvrc, out)
    assert cli(["data", "imagenet", "prepare", str(ilsvrc), "--recipe", str(r), "--out", str(out),
                "--encoder", VOCAB, "--latents", "--split", "train"]) == 0
    assert not (out / "latents" / "val").exists()
    resolved = load_recipe(r, ["data.use_cached_latents=true", f"data.latents_dir={json.dumps(str(out / 'latents'))}",
                               "train.max_steps=1", "train.total_batch_size=-1", "train.batch_size=3"])
    # The cache records what it was made from, as `minfm cache latents` does: it recorded
    # nothing, so every run from it warned that all its settings had changed ...
    with warnings.catch_warnings():
        warnings.simplefilter("error", MinfmWarning)
        train(resolved)
    assert (tmp_path / "exp" / "metrics.jsonl").read_text().count('"loss"') == 1
    # ... and a rerun with other settings took the old shards as finished
    assert cli(["data", "imagenet", "prepare", str(ilsvrc), "--recipe", str(r), "--out", str(out),
                "--encoder", VOCAB, "--latents", "--split", "train", "--set", "data.resolution=24"]) == 2


def test_recipe_encoder_is_used_when_it_is_not_the_table(ilsvrc, tmp_path):
    """The quickstart-style recipe's own vocab encoders embed the class names (no --encoder)."""
    out = tmp_path / "p"
    assert cli(["data", "imagenet", "prepare", str(ilsvrc), "--recipe", str(TINY), "--out", str(out)]) == 0
    from safetensors import safe_open

    with safe_open(str(out / "class_embeddings.safetensors"), framework="pt") as f:
        assert tuple(f.get_tensor("embeddings").shape) == (1001, 16)
        assert json.loads(f.metadata()["labels"])["tench"] == 0
    assert not (out / "latents").exists()


@pytest.mark.parametrize("extra, message", [
    ([], "class_embedding tables"),
    (["--encoder", '{name = "vocab", dim = 8}'], "expects a (1001, 16) table"),
    (["--encoder", '{name = "vocb"}'], "unknown text_encoder 'vocb'"),
    (["--encoder", "not toml {"], "not a TOML inline table"),
])
def test_bad_encoder_exits_2(ilsvrc, tmp_path, capsys, extra, message):
    out = tmp_path / "o"
    assert cli(["data", "imagenet", "prepare", str(ilsvrc), "--recipe", str(recipe(tmp_path, ilsvrc, out)),
                "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err


def test_bad_tree_exits_2(ilsvrc, tmp_path, capsys):
    (ilsvrc / "train" / "n99999999").mkdir()
    assert cli(["data", "imagenet", "prepare", str(ilsvrc), "--recipe", str(TINY), "--out", str(tmp_path / "o")]) == 2
    assert "n99999999" in capsys.readouterr().err
    assert cli(["data", "imagenet", "prepare", str(tmp_path / "nowhere"), "--recipe", str(TINY),
                "--out", str(tmp_path / "o")]) == 2


def test_a_split_without_images_is_refused_before_anything_is_written(tmp_path, capsys):
    root = tmp_path / "ilsvrc"
    (root / "train" / "n01440764").mkdir(parents=True)  # a class folder, no pictures
    out = tmp_path / "o"
    assert cli(["data", "imagenet", "prepare", str(root), "--recipe", str(TINY), "--out", str(out)]) == 2
    assert f"{root}: train/ holds no images" in capsys.readouterr().err
    assert not out.exists()


def _prepare(root: Path, recipe_path: Path, out: Path, *extra: str) -> int:
    return cli(["data", "imagenet", "prepare", str(root), "--recipe", str(recipe_path), "--out", str(out),
                "--encoder", VOCAB, *extra])


def _flatten_val(root: Path) -> None:
    for picture in (root / "val" / "n01440764").iterdir():
        picture.rename(root / "val" / picture.name)
    (root / "val" / "n01440764").rmdir()


@pytest.mark.parametrize("inside", ["train/prepared", "train", "val/n01440764/out", "val/new"])
def test_an_out_inside_a_split_is_refused_before_anything_is_written(ilsvrc, tmp_path, capsys, inside):
    """--out ROOT/train/prepared wrote the tables, then failed: 'prepared' is no class folder, for good."""
    out = ilsvrc / inside
    before = sorted(ilsvrc.rglob("*"))
    assert _prepare(ilsvrc, recipe(tmp_path, ilsvrc, out), out) == 2
    err = capsys.readouterr().err
    assert f"--out {str(out)!r}: lies inside {str(ilsvrc / inside.split('/')[0])!r}" in err
    assert len(err.strip().splitlines()) == 1 and sorted(ilsvrc.rglob("*")) == before
    # the tree is as it was: a prepare beside the splits works
    assert _prepare(ilsvrc, recipe(tmp_path, ilsvrc, ilsvrc), ilsvrc) == 0


def test_an_out_reached_through_a_symlink_into_train_is_refused(ilsvrc, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(ilsvrc / "train")
    assert _prepare(ilsvrc, TINY, link / "prepared") == 2
    assert "lies inside" in capsys.readouterr().err
    assert not (ilsvrc / "train" / "prepared").exists()


@pytest.mark.parametrize("case", ["no-val", "not-imagenet", "flat-val-unlabelled", "bad-val-labels"])
def test_latents_requirements_are_checked_before_anything_is_written(ilsvrc, tmp_path, capsys, case):
    """Each of these failed after classes.json & co. were written (and not-imagenet named keys
    the user never wrote: "data: unknown key 'p_flip'; unknown key 'root'")."""
    out = tmp_path / "o"
    r = recipe(tmp_path, ilsvrc, out)
    extra = ["--latents"]
    if case == "no-val":
        shutil.rmtree(ilsvrc / "val")
        extra += ["--split", "val"]
        message = f"--split val: {ilsvrc} has no val/ folder"
    elif case == "not-imagenet":
        r = TINY
        message = f"{TINY}: --latents encodes the images as the recipe's [data] reads them, and that is 'shapes', not imagenet"
    elif case == "flat-val-unlabelled":
        _flatten_val(ilsvrc)
        message = f"--latents: {ilsvrc / 'val'} holds its pictures directly, which the imagenet dataset reads only with data.val_labels"
    else:
        _flatten_val(ilsvrc)
        (tmp_path / "labels.txt").write_text("n01440764_0.JPEG " + "7" * 5000 + "\n")
        extra += ["--set", f"data.val_labels={json.dumps(str(tmp_path / 'labels.txt'))}"]
        message = "labels.txt:1: '7777"
    assert _prepare(ilsvrc, r, out, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert "unknown key" not in err and not out.exists()


def test_a_flat_val_is_counted_by_its_labels_and_encoded(ilsvrc, tmp_path):
    _flatten_val(ilsvrc)
    (ilsvrc / "val" / "stray.JPEG").write_bytes((ilsvrc / "val" / "n01440764_0.JPEG").read_bytes())  # not listed
    (tmp_path / "labels.txt").write_text("n01440764_0.JPEG n01443537\n")
    out = tmp_path / "o"
    r = recipe(tmp_path, ilsvrc, out)
    labels = f"data.val_labels={json.dumps(str(tmp_path / 'labels.txt'))}"
    assert _prepare(ilsvrc, r, out, "--latents", "--set", labels) == 0
    assert json.loads((out / "prepare.json").read_text())["splits"] == {"train": 3, "val": 1}
    val = json.loads((out / "latents" / "val" / "index.json").read_text())["entries"]
    assert [e["label"] for e in val] == [1]


def test_a_flat_val_without_labels_counts_0_and_train_alone_is_encoded(ilsvrc, tmp_path, capsys):
    """The documented run (reproduce.md): a flat val/, no val_labels, --latents --split train."""
    _flatten_val(ilsvrc)
    out = tmp_path / "o"
    assert _prepare(ilsvrc, recipe(tmp_path, ilsvrc, out), out, "--latents", "--split", "train") == 0
    assert json.loads((out / "prepare.json").read_text())["splits"] == {"train": 3, "val": 0}
    assert (out / "latents" / "train" / "index.json").is_file() and not (out / "latents" / "val").exists()


def test_pictures_lying_directly_in_train_are_not_counted(ilsvrc, tmp_path, capsys):
    """split_counts said train 1 for a flat picture the dataset never reads."""
    stray = ilsvrc / "train" / "stray.JPEG"
    stray.write_bytes(next((ilsvrc / "train" / "n01440764").iterdir()).read_bytes())
    out = tmp_path / "o"
    assert _prepare(ilsvrc, TINY, out) == 0
    assert json.loads((out / "prepare.json").read_text())["splits"] == {"train": 3, "val": 1}

    flat = tmp_path / "flat"
    (flat / "train").mkdir(parents=True)
    stray.rename(flat / "train" / "stray.JPEG")
    assert _prepare(flat, TINY, tmp_path / "o2") == 2
    err = capsys.readouterr().err
    assert f"{flat}: train/ holds no images in class folders" in err and "the 1 lying directly in train/ are not read" in err
    assert not (tmp_path / "o2").exists()


def test_a_folder_named_like_a_picture_is_refused_before_anything_is_written(ilsvrc, tmp_path, capsys):
    """Was: counted, the tables written, and training failed at the folder's batch."""
    (ilsvrc / "train" / "n01440764" / "dir.JPEG").mkdir()
    out = tmp_path / "o"
    assert _prepare(ilsvrc, TINY, out) == 2
    err = capsys.readouterr().err
    assert f"{ilsvrc / 'train' / 'n01440764' / 'dir.JPEG'}: not a picture file" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_val_labels_listing_none_of_the_pictures_are_named_as_the_problem(ilsvrc, tmp_path, capsys):
    """An empty labels file read 'holds its pictures directly ... reads only with
    data.val_labels (set it ...)', though it was set."""
    _flatten_val(ilsvrc)
    (tmp_path / "labels.txt").write_text("")
    out = tmp_path / "o"
    labels = tmp_path / "labels.txt"
    assert _prepare(ilsvrc, recipe(tmp_path, ilsvrc, out), out, "--latents", "--set",
                    f"data.val_labels={json.dumps(str(labels))}") == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"--latents: data.val_labels = {labels} lists none of the pictures lying in {ilsvrc / 'val'} "
                        "(an empty file, or the labels of another copy of ImageNet?)"), err
