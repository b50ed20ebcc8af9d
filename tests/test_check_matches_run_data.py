"""Data and model shapes: `minfm check` refuses what a run would fail on late (a `mix` source
the VAE and patch cannot take, a VAE whose image channels are not the data's RGB, a missing
`sample.source`), with one line naming the recipe field."""

from __future__ import annotations

import json

import attrs
import pytest

from engine_helpers import TINY
from minfm_core.cli.main import main
from minfm_core.errors import RecipeError
from minfm_core.recipe import load_recipe
from minfm_core.recipe.checks import job_checks
from minfm_core.registry import get_registry

#: The tiny recipe's VAE x patch: identity x (1, 2, 2).
MULTIPLE = "2x2"


def _toml(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


def _datasets(field: str):
    """Every registered dataset whose config has ``field`` (mix itself aside)."""
    return [c.name for c in get_registry().components("dataset")
            if c.name != "mix" and c.config is not None and field in attrs.fields_dict(c.config)]


def _table(name: str, root, **fields) -> dict:
    cfg = get_registry().get("dataset", name).config
    return {"name": name, **({"root": str(root)} if "root" in attrs.fields_dict(cfg) else {}), **fields}


def _train_problems(tmp_path, *overrides) -> list[str]:
    resolved = load_recipe(TINY, [f"run.exp_dir={json.dumps(str(tmp_path / 'exp'))}", *overrides])
    return job_checks(resolved, "train", 1)


def test_the_sweep_covers_the_drawn_and_the_read_datasets():
    assert {"shapes", "moving_shapes", "image_folder", "video_folder"} <= set(_datasets("size_multiple"))
    assert {"moving_shapes", "video_folder"} <= set(_datasets("frames"))


@pytest.mark.parametrize("name", _datasets("size_multiple"))
def test_a_mix_source_is_held_to_the_model_as_a_dataset_is(name, tmp_path):
    """Was: the mix passed `minfm check`, then its first batch failed 'not divisible by patch_size'."""
    table = _table(name, tmp_path, size_multiple=1)
    alone = _train_problems(tmp_path, f"data={_toml(table)}")
    assert alone == [f"data.size_multiple: 1 is not a multiple of the VAE's compression x patch = {MULTIPLE} "
                     "(from --set data)"]
    mix = {"name": "mix", "sources": [{"weight": 1.0, "dataset": _table(name, tmp_path)},
                                      {"weight": 1.0, "dataset": table}]}
    assert _train_problems(tmp_path, f"data={_toml(mix)}") == [
        f"data.sources[1].dataset.size_multiple: 1 is not a multiple of the VAE's compression x patch = {MULTIPLE} "
        "(from --set data)"]


@pytest.mark.parametrize("name", _datasets("frames"))
def test_a_mix_source_frame_count_is_checked(name, tmp_path):
    video = ["model.patchifier.patch_size=[2, 2, 2]", "model.denoiser.d_img=24", "sample.size=[2, 16, 16]"]
    table = _table(name, tmp_path, frames=3)
    mix = {"name": "mix", "sources": [{"weight": 1.0, "dataset": table}]}
    problems = _train_problems(tmp_path, *video, f"data={_toml(mix)}")
    assert len(problems) == 1 and problems[0].startswith("data.sources[0].dataset.frames: 3 frames: this model "
                                                         "cannot draw that"), problems


def test_a_mix_source_without_its_root_is_refused(tmp_path):
    mix = {"name": "mix", "sources": [{"weight": 1.0, "dataset": {"name": "shapes"}},
                                      {"weight": 1.0, "dataset": {"name": "image_folder", "size_multiple": 8}}]}
    assert _train_problems(tmp_path, f"data={_toml(mix)}") == [
        "data.sources[1].dataset.root: a train job needs it set (from --set data)"]


def test_the_testers_mix_recipe_fails_check(tmp_path, capsys):
    recipe = tmp_path / "mixbad.toml"
    recipe.write_text(f'extends = {json.dumps(str(TINY))}\n[run]\nexp_dir = {json.dumps(str(tmp_path / "exp"))}\n'
                      '[data]\nname = "mix"\n[[data.sources]]\nweight = 1.0\n'
                      'dataset = { name = "shapes", sizes = [[17, 17]], size_multiple = 1 }\n')
    assert main(["check", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.sources[0].dataset.size_multiple: 1 is not a multiple" in err, err


def _image_channel_fields():
    """(vae, field) for every registered VAE config with an image-channel field."""
    for comp in get_registry().components("vae"):
        fields = attrs.fields_dict(comp.config) if comp.config is not None else {}
        for field in ("image_channels", "channels"):
            if field in fields:
                yield pytest.param(comp.name, field, id=f"{comp.name}.{field}")
                break


@pytest.mark.parametrize(("vae", "field"), list(_image_channel_fields()))
def test_a_vae_must_take_rgb_images(vae, field):
    """Was: accepted, then the first batch (or the first saved sample) failed on the image shape."""
    def problems(channels):
        table = {"name": vae, field: channels}
        if vae != "identity":
            table["pretrained"] = ""  # no weights to find
        try:
            load_recipe(TINY, [f"model.vae={_toml(table)}"])
        except RecipeError as exc:
            return [p for p in exc.problems if p.startswith("model.vae.")]
        return []

    assert problems(3) == []
    for channels in (1, 4):
        assert problems(channels) == [f"model.vae.{field}: {channels}, but images have 3 channels (RGB: what every "
                                      "dataset yields and every sample is saved as) (from --set model.vae)"]


def test_an_identity_vae_of_one_channel_fails_check_not_the_run(tmp_path, capsys):
    exp = tmp_path / "exp"
    assert main(["run", str(TINY), "--set", f"run.exp_dir={json.dumps(str(exp))}", "--set", "model.vae.channels=1",
                 "--set", "model.denoiser.d_img=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.vae.channels: 1, but images have 3 channels" in err, err
    assert not exp.exists()


def _sample_check(tmp_path, source: str, capsys) -> tuple[int, str]:
    rc = main(["check", str(TINY), "--set", 'job="sample"', "--set", f"sample.source={json.dumps(source)}",
               "--set", f"run.exp_dir={json.dumps(str(tmp_path / 'exp'))}"])
    return rc, capsys.readouterr().err.strip()


def test_a_sample_job_needs_its_source_to_exist(tmp_path, capsys):
    """Was: accepted by check (unlike train.init_from); the run failed at the source."""
    missing = str(tmp_path / "nosuch")
    rc, err = _sample_check(tmp_path, missing, capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and f"sample.source: {missing}: no such file or folder" in err, err
    rc, err = _sample_check(tmp_path, "org/name", capsys)
    assert rc == 2 and "sample.source: org/name: no such file or folder (a Hub repo is hf://org/name)" in err, err
    (tmp_path / "run").mkdir()
    assert _sample_check(tmp_path, str(tmp_path / "run"), capsys)[0] == 0
    resolved = load_recipe(TINY, ['sample.source="hf://org/name"'])
    assert not [p for p in job_checks(resolved, "sample", 1) if p.startswith("sample.source")]  # not a local path
