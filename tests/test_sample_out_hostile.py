"""Sampling's out folder and inputs under a hostile tester: nothing written or deleted through a
symlink, sizes the writer cannot hold refused up front, check refusing what run refuses,
checkpoints with leftover weights refused, and default outputs out of keep_last's reach."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from engine_helpers import tiny
from minfm_core.errors import MinfmError, RecipeError


def test_overwrite_never_deletes_or_writes_through_a_symlinked_images(tmp_path):
    from minfm_core.engine.sample import prepare_out

    victim, out = tmp_path / "victim", tmp_path / "out"
    victim.mkdir()
    out.mkdir()
    (victim / "00007_03.jpg").write_text("precious")
    (out / "images").symlink_to(victim)
    (out / "metadata.json").write_text(json.dumps({"settings": {"seed": 5}}))
    with pytest.raises(MinfmError, match=r"--out .*out: .*images is a symlink"):
        prepare_out(out, {"seed": 1}, overwrite=True, flag="--out")
    assert (victim / "00007_03.jpg").read_text() == "precious"


def test_a_clip_side_past_the_webp_limit_is_refused_when_the_recipe_loads(tmp_path):
    """16384 passed every check, then the WebP encoder failed after the clip was drawn."""
    with pytest.raises(RecipeError, match=r"sample.size: each element must be in \[1, 16383\], got 16384"):
        tiny(tmp_path, "sample.size=[2, 16, 16384]")


def test_check_refuses_an_out_dir_that_is_a_file(tmp_path):
    from minfm_core.recipe.checks import job_checks

    f = tmp_path / "huge.txt"
    f.write_text("x")
    resolved = tiny(tmp_path / "run", "job=sample", f"sample.out_dir={json.dumps(str(f))}",
                    f"sample.source={json.dumps(str(tmp_path))}", 'sample.prompts=["a"]')
    assert f"sample.out_dir: {f} is a file, not a folder (from --set sample.out_dir)" in job_checks(resolved, "sample")


def test_default_out_of_a_checkpoint_is_beside_the_run_not_inside_the_checkpoint(tmp_path):
    from minfm_core.engine.sample import default_out

    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    assert default_out(str(step), step) == run / "samples_cli"
    assert default_out(str(run), run) == run / "samples_cli"
    other = tmp_path / "x" / "step_00000004"  # a step_ folder that is not in a checkpoints/ one
    other.mkdir(parents=True)
    assert default_out(str(other), other) == other / "samples_cli"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from minfm_core.engine.train import train

    run = tmp_path_factory.mktemp("extra_keys") / "run"
    train(tiny(run, "train.max_steps=1"))
    return run


def test_a_checkpoint_with_weights_the_model_lacks_is_refused(trained, tmp_path):
    """n_ds_blocks=0 over a checkpoint with one double block loaded the rest in silence."""
    from minfm_core import checkpoint as ckpt_mod

    ckpt = ckpt_mod.open_checkpoint(ckpt_mod.find_checkpoint(trained))
    for source in sorted(ckpt.parts() & {"model", "ema"}):
        small = tiny(tmp_path, "model.denoiser.n_ds_blocks=0")["model.denoiser"].build(load_weights=False)
        with pytest.raises(MinfmError, match=rf"\({source} weights\): weights do not fit the model: "
                                             r"unexpected keys: double_blocks\.0\."):
            ckpt_mod.load_weights(ckpt, small, source=source)
        same = tiny(tmp_path)["model.denoiser"].build(load_weights=False)
        ckpt_mod.load_weights(ckpt, same, source=source)  # the model it was saved from still loads
        assert all(torch.isfinite(p).all() for p in same.parameters())


@pytest.mark.parametrize("inside", ["", "mine"])
def test_an_out_folder_inside_the_checkpoint_sampled_is_refused(trained, inside):
    """--out <checkpoint> wrote the samples into the checkpoint, which keep_last deletes whole."""
    from conftest import minfm_in_process
    from minfm_core import checkpoint as ckpt_mod

    ckpt = ckpt_mod.find_checkpoint(trained)
    before = sorted(p.name for p in ckpt.iterdir())
    out = ckpt / inside if inside else ckpt
    res = minfm_in_process("sample", str(ckpt), "--out", str(out), "--prompt", "a", "--steps", "1")
    assert res.returncode == 2, res.stderr
    assert f"--out {out}: lies inside the checkpoint {ckpt}, which its run's keep_last may delete" in res.stderr
    assert sorted(p.name for p in ckpt.iterdir()) == before


def test_an_out_folder_inside_another_runs_checkpoint_is_refused(trained, tmp_path):
    """Only the checkpoint sampled was refused: samples went into another checkpoint of a run,
    where keep_last would delete them with it. A checkpoint outside a run stays a folder like any."""
    from conftest import minfm_in_process

    other = tmp_path / "other" / "checkpoints" / "step_00000005"
    other.mkdir(parents=True)
    res = minfm_in_process("sample", str(trained), "--out", str(other / "mine"), "--prompt", "a", "--steps", "1")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"lies inside the checkpoint {other}, which its run's keep_last may delete" in res.stderr
    assert list(other.iterdir()) == []
    loose = tmp_path / "copied" / "step_00000005"  # not under a run's checkpoints/
    res = minfm_in_process("sample", str(trained), "--out", str(loose), "--prompt", "a", "--steps", "1")
    assert res.returncode == 0, res.stderr


def test_a_source_that_holds_no_model_says_what_would_do(tmp_path):
    """'an exported folder' read as `minfm export diffusers`'s output, which got only 'no complete
    checkpoint found': the error now names the model folder too, and says what a diffusers folder is."""
    from conftest import minfm_in_process

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    res = minfm_in_process("sample", str(tmp_path), "--prompt", "a")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert ("nor a model folder (model.safetensors with a recipe.toml, as minfm hub push and pull make); this is "
            "a diffusers folder (minfm export diffusers writes it for diffusers): use the run or checkpoint "
            "it was exported from") in res.stderr
    assert not any(p.name.startswith("samples") for p in tmp_path.iterdir())


def test_a_checkpoint_outside_a_run_samples_into_its_default_folder(trained, tmp_path):
    """The refusal above is about keep_last, which prunes only a run's own checkpoints: a copied
    step_N (no run around it) was refused its own default out folder, <ckpt>/samples_cli."""
    import shutil

    from conftest import minfm_in_process
    from minfm_core import checkpoint as ckpt_mod

    copy = tmp_path / "x" / "step_00000004"
    shutil.copytree(ckpt_mod.find_checkpoint(trained), copy)
    res = minfm_in_process("sample", str(copy), "--prompt", "a", "--steps", "1", "--size", "16x16")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (copy / "samples_cli" / "images").iterdir()) == ["00000_00.png"]


def test_an_export_into_a_runs_checkpoint_is_refused(trained, tmp_path):
    """`minfm export diffusers RUN RUN/checkpoints/step_N` exited 0 with the export inside the
    checkpoint, which the run's keep_last deletes whole (as --out of `minfm sample` was)."""
    from conftest import minfm_in_process
    from minfm_core import checkpoint as ckpt_mod

    ckpt = ckpt_mod.find_checkpoint(trained)
    before = sorted(p.name for p in ckpt.iterdir())
    res = minfm_in_process("export", "diffusers", str(trained), str(ckpt / "diffusers"))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip() == (f"minfm: error: OUT_DIR {ckpt / 'diffusers'}: lies inside the checkpoint {ckpt}, "
                                  "which its run's keep_last may delete with the export; choose another OUT_DIR")
    assert sorted(p.name for p in ckpt.iterdir()) == before
    res = minfm_in_process("export", "diffusers", str(trained), str(tmp_path / "diffusers"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "diffusers" / "config.json").is_file()


def test_a_recorded_recipe_is_not_expanded_again_only_the_users_set_is(trained, tmp_path, monkeypatch):
    """A run's or checkpoint's recipe.toml was resolved when minFM wrote it. A copied one (no
    download marker) holding ``${HF_TOKEN}`` had it expanded into the samples' metadata.json
    and index.html; the user's own --set still expands."""
    from checkpoint_helpers import copy_run, refresh_record
    from conftest import minfm_in_process
    from minfm_core import checkpoint as ckpt_mod

    monkeypatch.setenv("MINFM_TEST_SECRET", "topsecret")
    run = copy_run(trained, tmp_path / "copied")
    ckpt = ckpt_mod.find_checkpoint(run)
    recipe = ckpt / "recipe.toml"
    text = recipe.read_text()
    assert text.count('\nneg_prompt = ""\n') == 1
    os.chmod(recipe, 0o644)
    recipe.write_text(text.replace('\nneg_prompt = ""\n', '\nneg_prompt = "${MINFM_TEST_SECRET}"\n'))
    refresh_record(ckpt, "recipe.toml")  # whoever wrote it also vouched for it in the manifest
    res = minfm_in_process("sample", str(ckpt), "--out", str(tmp_path / "a"), "--prompt", "a", "--steps", "1")
    assert res.returncode == 0, res.stderr
    written = (tmp_path / "a" / "metadata.json").read_text()
    assert "topsecret" not in written and json.loads(written)["settings"]["neg_prompt"] == "${MINFM_TEST_SECRET}"
    res = minfm_in_process("sample", str(ckpt), "--out", str(tmp_path / "b"), "--prompt", "a", "--steps", "1",
                           "--set", 'sample.neg_prompt="x ${MINFM_TEST_SECRET:-none}"')
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "b" / "metadata.json").read_text())["settings"]["neg_prompt"] == "x topsecret"


def test_a_table_set_on_a_recorded_recipe_expands_only_what_it_gives(trained, tmp_path, monkeypatch):
    """--set sample={...} merges into the recorded [sample]: its recorded values stay as they
    are (they were expanded again with it, a recorded ``${HF_TOKEN}`` among them)."""
    from checkpoint_helpers import copy_run, refresh_record
    from minfm_core import checkpoint as ckpt_mod
    from minfm_core.recipe import load_recipe

    monkeypatch.setenv("MINFM_TEST_SECRET", "topsecret")
    run = copy_run(trained, tmp_path / "copied")
    ckpt = ckpt_mod.find_checkpoint(run)
    recipe = ckpt / "recipe.toml"
    os.chmod(recipe, 0o644)
    recipe.write_text(recipe.read_text().replace('\nneg_prompt = ""\n', '\nneg_prompt = "${MINFM_TEST_SECRET}"\n'))
    refresh_record(ckpt, "recipe.toml")
    for sets in (['sample={steps = 3}'], ['sample.prompts+=["${MINFM_TEST_SECRET}"]']):
        s = load_recipe(recipe, sets, recorded=True).recipe.sample
        assert s.neg_prompt == "${MINFM_TEST_SECRET}", sets
    assert s.prompts[-1] == "topsecret"  # what the user's own --set gave is expanded
