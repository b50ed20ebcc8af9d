"""train.init_from with and without an EMA on either side: the default plan's ema:ema means
"the EMA too, where both runs keep one"; a plan of one's own that loads into a missing EMA
is refused by `minfm check` as by `minfm run`."""

from __future__ import annotations

import json

import pytest
import torch

from engine_helpers import TINY, tiny
from minfm_core import checkpoint as ck
from minfm_core.cli.main import main
from minfm_core.engine.train import Trainer, train
from minfm_core.errors import MinfmError


def _ckpt(trained_run):
    return str(ck.list_checkpoints(trained_run)[-1])


def test_a_run_without_ema_takes_the_default_plan_from_a_run_with_one(trained_run, tmp_path):
    """The default plan's ema:ema failed a run that only turned its EMA off ('keeps no EMA')."""
    assert train(tiny(tmp_path / "new", f"train.init_from={json.dumps(_ckpt(trained_run))}", "train.ema_decay=0",
                      "train.max_steps=5")) == 0


def test_a_plan_of_ones_own_into_a_missing_ema_is_refused_by_check_and_run(trained_run, tmp_path, capsys):
    sets = ["--set", f"run.exp_dir={json.dumps(str(tmp_path / 'new'))}", "--set", f"train.init_from={json.dumps(_ckpt(trained_run))}",
            "--set", "train.ema_decay=0", "--set", "train.init_load_plan='model:model,ema:ema'", "--set", "train.max_steps=5"]
    for command in ("check", "run"):
        assert main([command, str(TINY), *sets]) == 2, command
        err = capsys.readouterr().err
        assert "train.init_load_plan: loads 'ema' into 'ema', but this run keeps no EMA" in err, err
    assert not (tmp_path / "new").exists()


def _initialised(resolved, check):
    """A Trainer built (so initialised from train.init_from), ``check(trainer)``, then closed."""
    from minfm_core import runlock
    from minfm_core.engine.runtime import init_runtime, shutdown_runtime

    rt = init_runtime("cpu")
    try:
        trainer = Trainer(resolved, rt)
        try:
            check(trainer)
        finally:
            trainer.close()
    finally:
        runlock.release(resolved.recipe.run.exp_dir)
        shutdown_runtime()


def test_the_default_plan_starts_the_ema_from_the_model_of_a_source_without_one(tmp_path):
    """It failed with 'has no 'ema' to load', where a resume of the same source went on."""
    src = tmp_path / "src"
    assert train(tiny(src, "train.ema_decay=0", "train.max_steps=2")) == 0

    def ema_is_the_loaded_model(trainer):
        loaded = dict(trainer.model.named_parameters())
        assert trainer.ema.state_dict()
        for name, value in trainer.ema.state_dict().items():
            torch.testing.assert_close(value, loaded[name].detach(), rtol=0, atol=0)

    _initialised(tiny(tmp_path / "new", f"train.init_from={json.dumps(str(src))}", "train.max_steps=3"),
                 ema_is_the_loaded_model)
    with pytest.raises(MinfmError, match="has no 'ema' to load"):  # a plan of one's own still needs its source
        _initialised(tiny(tmp_path / "new2", f"train.init_from={json.dumps(str(src))}",
                          "train.init_load_plan='ema:model'", "train.max_steps=3"), lambda trainer: None)


def test_a_source_that_does_not_fit_is_named_by_the_setting(trained_run, tmp_path, capsys):
    """It named only the checkpoint's folder, which reads as the run's own on a resume."""
    new = tmp_path / "new"
    sets = ["--set", f"run.exp_dir={json.dumps(str(new))}", "--set", f"train.init_from={json.dumps(str(trained_run))}",
            "--set", "model.denoiser.d_model=64", "--set", "train.max_steps=1"]
    assert main(["run", str(TINY), *sets]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"minfm: error: train.init_from = {trained_run}: "), err
    assert "does not fit" in err and "Traceback" not in err, err


def test_weights_only_source_under_the_default_plan_says_which_plan_takes_it(trained_run, tmp_path, capsys):
    """A Hub folder pushed without --include-training-state under the default plan (which
    also wants the optimizer and the step) failed with 'no complete checkpoint found', no
    word on the plan that takes its weights; that plan then works."""
    folder = ck.export_for_hub(trained_run, tmp_path / "exported")
    sets = ["--set", f"run.exp_dir={json.dumps(str(tmp_path / 'new'))}", "--set", f"train.init_from={json.dumps(str(folder))}",
            "--set", "train.max_steps=1"]
    assert main(["run", str(TINY), *sets]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds weights only (pushed without --include-training-state): " \
           'train.init_load_plan = "model:model,ema:ema" starts from them' in err, err
    assert main(["run", str(TINY), *sets, "--set", "train.init_load_plan=model:model,ema:ema"]) == 0
