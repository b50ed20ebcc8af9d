"""Pictures are one-frame clips: a patch more than one frame deep cannot cut them, and `minfm
check` (and a run's start-up checks, the same code) says so, naming the dataset, where the first
batch failed with a hint about the image size."""

from __future__ import annotations

import json

import pytest

from engine_helpers import TINY
from minfm_core.cli.main import main
from minfm_core.errors import MinfmError
from minfm_core.recipe import load_recipe
from minfm_core.recipe.checks import job_checks
from minfm_plugins.flow.config import Patch3DConfig
from minfm_plugins.flow.patchify import Patch3D

#: Patches two latent frames deep, a denoiser sized for them, and galleries it can draw.
DEEP = ["model.patchifier.patch_size=[2, 2, 2]", "model.denoiser.d_img=24", "sample.size=[2, 16, 16]"]
REFUSED = ("pictures, 1 frame each, but model.patchifier.patch_size cuts latents 2 frames deep: this model "
           "cannot train on them (a patch 1 frame deep can)")


def _train_problems(tmp_path, *overrides) -> list[str]:
    resolved = load_recipe(TINY, [f"run.exp_dir={json.dumps(str(tmp_path / 'exp'))}", *overrides])
    return job_checks(resolved, "train", 1)


@pytest.mark.parametrize("table", [
    "{name = 'shapes', sizes = [[16, 16]]}",
    "{name = 'image_folder', root = '/nowhere', size_multiple = 8}",
])
def test_a_picture_dataset_is_refused_by_a_patch_two_frames_deep(tmp_path, table):
    """Was: passed, then the first batch failed 'frames 1 % 2 != 0; pick an image size ...'."""
    problems = _train_problems(tmp_path, *DEEP, f"data={table}")
    assert problems == [f"data: {REFUSED} (from --set data)"], problems


def test_a_mix_names_its_picture_source_and_passes_its_clips(tmp_path):
    mix = ("{name = 'mix', sources = [{weight = 1.0, dataset = {name = 'moving_shapes', frames = 4, "
           "sizes = [[16, 16]]}}, {weight = 1.0, dataset = {name = 'shapes', sizes = [[16, 16]]}}]}")
    problems = _train_problems(tmp_path, *DEEP, f"data={mix}")
    assert problems == [f"data.sources[1].dataset: {REFUSED} (from --set data)"], problems
    clips_only = mix.replace("'shapes'", "'moving_shapes', frames = 2")
    assert _train_problems(tmp_path, *DEEP, f"data={clips_only}") == []
    assert _train_problems(tmp_path, f"data={mix}") == []  # a patch 1 frame deep takes pictures


def test_check_exits_2_naming_the_picture_dataset(tmp_path, capsys):
    rc = main(["check", str(TINY), "--set", f"run.exp_dir={json.dumps(str(tmp_path / 'exp'))}",
               *(a for o in DEEP for a in ("--set", o))])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and f"data: {REFUSED}" in err, err


def test_patch3d_blames_the_frame_count_not_the_image_size():
    p = Patch3D(Patch3DConfig(patch_size=(2, 2, 2)))
    with pytest.raises(MinfmError, match=r"\(frames 1 % 2 != 0\); pick a frame count that makes a multiple of 2 "
                                         r"latent frames \(a picture is 1 frame\)$"):
        p.grid((3, 1, 16, 16), 0)
    with pytest.raises(MinfmError, match=r"\(height 5 % 2 != 0\); pick an image size that is a multiple"):
        p.grid((3, 2, 5, 16), 0)
