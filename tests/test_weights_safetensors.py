"""minfm_core.weights reads safetensors from outside: bounded, contained, one MinfmError naming the file."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hub_fixtures import header_bytes, hostile_safetensors, shard_index
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from minfm_core.errors import MinfmError
from minfm_core.weights import (
    MAX_HEADER_BYTES, index_shards, load_safetensors_file, open_safetensors, read_safetensors,
)

pytest_plugins = ["hub_fixtures"]  # the canary fixture


def _one_line(exc: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    return msg


@pytest.mark.parametrize("kind", list(hostile_safetensors("unused")))
def test_what_is_not_safetensors_is_one_error_naming_the_file(tmp_path, canary, kind):
    path = tmp_path / "model.safetensors"
    path.write_bytes(hostile_safetensors(canary)[kind])
    for read in (load_safetensors_file, lambda p: open_safetensors(p).__enter__()):
        with pytest.raises(MinfmError) as exc:
            read(path)
        _one_line(exc, str(path))


def test_the_header_length_is_bounded_before_parsing(tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes(header_bytes(b"{}", declared=MAX_HEADER_BYTES + 1, body=b" " * 64))
    with pytest.raises(MinfmError) as exc:
        load_safetensors_file(path)
    _one_line(exc, "header of", str(MAX_HEADER_BYTES))


def test_valid_files_still_load(tmp_path):
    save_file({"w": torch.arange(4.0)}, tmp_path / "model.safetensors")
    assert torch.equal(load_safetensors_file(tmp_path / "model.safetensors")["w"], torch.arange(4.0))
    with open_safetensors(tmp_path / "model.safetensors") as f:
        assert list(f.keys()) == ["w"]
    assert set(read_safetensors(tmp_path, "model")) == {"w"}


def _sharded(folder, *names, outside=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors.index.json").write_bytes(shard_index(*names))
    return folder


@pytest.mark.parametrize("name, reason", [
    ("../outside.safetensors", "it leaves"),
    ("sub/../../outside.safetensors", "it leaves"),
    ("OUTSIDE_ABS", "it leaves"),
    ("~/outside.safetensors", "it leaves"),
    ("a\\..\\..\\outside.safetensors", "not a plain relative path"),
    ("link/outside.safetensors", "a symlink leads outside"),
    ("notes.txt", "not a .safetensors file"),
])
def test_index_names_that_leave_the_folder_are_refused(tmp_path, name, reason):
    outside = tmp_path / "outside.safetensors"
    save_file({"t0": torch.ones(1)}, outside)  # a real file: following the name would work
    name = str(outside) if name == "OUTSIDE_ABS" else name
    folder = _sharded(tmp_path / "repo", name)
    (folder / "link").symlink_to(tmp_path)
    (folder / "notes.txt").write_text("x")
    with pytest.raises(MinfmError) as exc:
        read_safetensors(folder, "model")
    _one_line(exc, "model.safetensors.index.json", reason)


@pytest.mark.parametrize("text, reason", [
    (b"{not json", "bad JSON"),
    (b"[1, 2]", "no 'weight_map'"),
    (b'{"weight_map": {}}', "no 'weight_map'"),
    (b'{"weight_map": {"a": 3}}', "must be file names"),
    (b'{"weight_map": {"a": ["x.safetensors"]}}', "must be file names"),
    (b"\xff\xfe\x00", "bad JSON"),
])
def test_malformed_indexes_are_one_line(tmp_path, text, reason):
    (tmp_path / "model.safetensors.index.json").write_bytes(text)
    with pytest.raises(MinfmError) as exc:
        read_safetensors(tmp_path, "model")
    _one_line(exc, "model.safetensors.index.json", reason)


def test_a_good_index_inside_still_loads(tmp_path):
    (tmp_path / "sub").mkdir()
    save_file({"t0": torch.ones(1)}, tmp_path / "model-1.safetensors")
    save_file({"t1": torch.zeros(1)}, tmp_path / "sub" / "model-2.safetensors")
    _sharded(tmp_path, "model-1.safetensors", "sub/model-2.safetensors")
    assert set(read_safetensors(tmp_path, "model")) == {"t0", "t1"}
    assert [p.name for p in index_shards(tmp_path / "model.safetensors.index.json")] == [
        "model-1.safetensors", "model-2.safetensors"]


@pytest.mark.parametrize("name", ["model", "ema"])
def test_a_weights_file_that_is_a_symlink_out_of_its_folder_is_refused(tmp_path, name):
    save_file({"w": torch.ones(1)}, tmp_path / "elsewhere.safetensors")
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / f"{name}.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(MinfmError) as exc:
        read_safetensors(tmp_path / "repo", name)
    _one_line(exc, f"{name}.safetensors", "a symlink leads outside")


def test_a_symlink_inside_the_folder_is_fine(tmp_path):
    save_file({"w": torch.ones(1)}, tmp_path / "model.safetensors")
    os.symlink("model.safetensors", tmp_path / "ema.safetensors")
    assert set(read_safetensors(tmp_path, "ema")) == {"w"}


def test_the_hf_cache_layout_is_inside(tmp_path):
    """Snapshot entries are symlinks into the repo's blobs/: that is the repo's own folder."""
    repo = tmp_path / "hub" / "models--org--m"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    save_file({"w": torch.ones(1)}, repo / "blobs" / "abc")
    (snap / "model.safetensors").symlink_to("../../blobs/abc")
    assert set(read_safetensors(snap, "model")) == {"w"}


# -- property: bytes from outside never do more than raise MinfmError ---------------------------------

_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _only_minfm_error(path):
    try:
        load_safetensors_file(path)
    except MinfmError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)


@_SETTINGS
@given(data=st.binary(max_size=512))
def test_random_bytes_raise_only_minfm_error(tmp_path, canary, data):
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    _only_minfm_error(path)


@_SETTINGS
@given(header=st.binary(max_size=256), body=st.binary(max_size=64), lie=st.integers(-8, 8))
def test_random_headers_with_a_plausible_length_raise_only_minfm_error(tmp_path, canary, header, body, lie):
    path = tmp_path / "model.safetensors"
    path.write_bytes(header_bytes(b"{" + header, declared=max(0, len(header) + 1 + lie), body=body))
    _only_minfm_error(path)


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                     max_leaves=8)


@_SETTINGS
@given(meta=st.dictionaries(st.text(max_size=8), _JSON, max_size=4))
def test_random_json_headers_raise_only_minfm_error(tmp_path, canary, meta):
    path = tmp_path / "model.safetensors"
    path.write_bytes(header_bytes(json.dumps(meta).encode(), body=b"\0" * 32))
    _only_minfm_error(path)


@_SETTINGS
@given(index=_JSON)
def test_random_indexes_raise_only_minfm_error(tmp_path, canary, index):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    try:
        read_safetensors(tmp_path, "model")
    except MinfmError as exc:
        assert "\n" not in str(exc)


def test_a_folder_is_vetted_before_a_library_reads_it(tmp_path):
    """transformers / diffusers read safetensors themselves: the folder is checked first."""
    from minfm_core.weights import check_weights_folder

    save_file({"w": torch.ones(1)}, tmp_path / "model.safetensors")
    check_weights_folder(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_bytes(shard_index("/etc/passwd"))
    with pytest.raises(MinfmError) as exc:
        check_weights_folder(tmp_path)
    _one_line(exc, "model.safetensors.index.json", "it leaves")
    (tmp_path / "model.safetensors.index.json").unlink()
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"\x80\x04junk")
    with pytest.raises(MinfmError) as exc:
        check_weights_folder(tmp_path)
    _one_line(exc, "diffusion_pytorch_model.safetensors", "not a safetensors file")


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    from minfm_core.checkpoint import export_for_hub

    return export_for_hub(trained_run, tmp_path_factory.mktemp("exported") / "folder")


def _ema_edited(exported, tmp_path, edit):
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "folder"
    shutil.copytree(exported, folder)
    sd = load_file(folder / "ema.safetensors")
    edit(sd)
    save_file(sd, folder / "ema.safetensors")
    return folder


@pytest.mark.parametrize("edit, why", [
    (lambda sd: sd.pop("img_in.bias"), "missing keys: img_in.bias"),
    (lambda sd: sd.__setitem__("img_in.bias", torch.ones(1)), "shape mismatches: img_in.bias (1,)"),
], ids=["missing", "broadcastable"])
@pytest.mark.parametrize("how", ["init_from", "sample"])
def test_ema_weights_of_an_exported_folder_must_all_fit(exported, tmp_path, capsys, edit, why, how):
    # a [1] bias was broadcast into the EMA by copy_; a missing parameter kept its random init
    from engine_helpers import TINY
    from minfm_core.cli.main import main

    folder = _ema_edited(exported, tmp_path, edit)
    argv = (["run", str(TINY), "--set", f"run.exp_dir={tmp_path / 'run'}", "--set", f"train.init_from={folder}",
             "--set", "train.init_load_plan=model:model,ema:ema", "--set", "train.max_steps=1"]
            if how == "init_from" else
            ["sample", str(folder), "--prompt", "x", "--n", "1", "--steps", "1", "--out", str(tmp_path / "o")])
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert "ema.safetensors: weights do not fit the model: " in err and why in err, err


@pytest.mark.parametrize("how", ["exported", "checkpoint"])
def test_weights_holding_nan_are_refused_for_sampling(trained_run, exported, tmp_path, capsys, how):
    import shutil

    from safetensors.torch import load_file

    from checkpoint_helpers import copy_run
    from minfm_core import checkpoint as ck
    from minfm_core.cli.main import main

    if how == "exported":
        src = tmp_path / "folder"
        shutil.copytree(exported, src)
        for name in ("model", "ema"):
            sd = load_file(src / f"{name}.safetensors")
            sd["img_in.bias"] = torch.full_like(sd["img_in.bias"], float("nan"))
            save_file(sd, src / f"{name}.safetensors")
    else:  # a diverged run: its own checkpoint holds the NaN, checksums and all
        run = copy_run(trained_run, tmp_path / "run")
        model = ck.build_denoiser(run / "recipe.toml")
        ck.load_weights(ck.list_checkpoints(run)[-1], model)
        model.img_in.bias.data.fill_(float("nan"))
        saver = ck.Checkpointer(tmp_path / "diverged", async_save=False, recipe_text=(run / "recipe.toml").read_text())
        saver.save(7, {"model": model.state_dict()}, {}, {})
        src = tmp_path / "diverged" / "checkpoints" / "step_00000007"
    code = main(["sample", str(src), "--prompt", "x", "--n", "1", "--steps", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "NaN or infinite values in img_in.bias (a run that diverged?)" in err, err


@pytest.mark.parametrize("how", ["sample", "demo"])
def test_a_recipe_its_weights_do_not_fit_is_refused_before_the_model_is_built(exported, tmp_path, capsys,
                                                                              monkeypatch, how):
    """A downloaded recipe.toml of d_model 8192 and 64 blocks (each in its range) filled 250 GiB
    building the model before its 276 KB of weights were compared with it. The headers are
    compared with the recipe's model on the meta device first: no model is built."""
    import shutil

    from minfm_core.cli.main import main
    from minfm_core.engine import pipeline

    folder = tmp_path / "folder"
    shutil.copytree(exported, folder)
    recipe = folder / "recipe.toml"
    recipe.write_text(recipe.read_text().replace("n_ss_blocks = 1", "n_ss_blocks = 64").replace("d_model = 32",
                                                                                                "d_model = 8192"))

    def never(*a, **k):
        raise AssertionError("the model was built before its weights were compared with the recipe")

    monkeypatch.setattr(pipeline, "build_pipeline", never)
    if how == "sample":
        monkeypatch.setattr("minfm_core.engine.sample.build_pipeline", never)
        code = main(["sample", str(folder), "--prompt", "x", "--n", "1", "--steps", "1", "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err, err
    else:
        from minfm_apps.model import DemoModel

        with pytest.raises(MinfmError) as info:
            DemoModel.load(str(folder), use_ema=True)
        err = str(info.value)
    assert "ema.safetensors: weights do not fit the model: " in err and "shape mismatches" in err, err
    assert f"(the model as {recipe} describes it)" in err
