"""``train.profile_steps`` count from 1 like the logs and checkpoints, and are refused outside
1..max_steps; a ``train.val_num_samples`` larger than the val split is said, not silently capped."""

from __future__ import annotations

import warnings

import pytest

from engine_helpers import TINY, read_metrics, tiny
from minfm_core.cli.main import main
from minfm_core.errors import MinfmWarning, RecipeError


@pytest.mark.parametrize("steps", ["[0]", "[3]", "[1, 0]"])
def test_profile_steps_outside_the_run_are_refused(tmp_path, capsys, steps):
    """``[0]`` traced logged step 1 under the name step_00000000; ``[2]`` of 2 steps traced nothing."""
    exp = tmp_path / "run"
    assert main(["check", str(TINY), "--set", "train.max_steps=2", "--set", f"train.profile_steps={steps}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.profile_steps: " in err[0] and "train.max_steps = 2" in err[0]
    assert main(["run", str(TINY), "--set", f"run.exp_dir={exp}", "--set", "train.max_steps=2",
                 "--set", f"train.profile_steps={steps}"]) == 2
    assert not exp.exists()


def test_the_trainer_refuses_them_too(tmp_path, runtime):
    from minfm_core.engine.train import Trainer

    with pytest.raises(RecipeError, match="train.profile_steps: 0 not in 1..train.max_steps = 6"):
        Trainer(tiny(tmp_path / "run", "train.profile_steps=[0]"), runtime)
    assert not (tmp_path / "run").exists()


def test_profile_steps_are_the_logged_steps(tmp_path):
    """The last step of the run is traced, under its logged number."""
    exp = tmp_path / "run"
    assert main(["run", str(TINY), "--set", f"run.exp_dir={exp}", "--set", "train.max_steps=2",
                 "--set", "train.ckpt_every=0", "--set", "train.profile_steps=[2]"]) == 0
    assert sorted(p.name for p in (exp / "profile").iterdir()) == ["step_00000002_rank0.json"]
    assert [m["step"] for m in read_metrics(exp)] == [1, 2]


def test_val_num_samples_above_the_val_split_is_said_once(tmp_path, runtime):
    from minfm_core.engine.train import Trainer

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer = Trainer(tiny(tmp_path / "run", "train.val_every=3", "train.val_num_samples=100000",
                               "data.num_val_samples=12"), runtime)
    trainer.close()
    said = [str(w.message) for w in seen if issubclass(w.category, MinfmWarning)]
    assert said == ["train.val_num_samples = 100000 is more than the data's 'val' split holds (12): "
                    "validation uses its 12 samples"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", MinfmWarning)  # within the split: nothing to say
        Trainer(tiny(tmp_path / "run2", "train.val_every=3", "train.val_num_samples=12",
                     "data.num_val_samples=12"), runtime).close()
