"""Training-run faults: a SIGTERM during the final step, a max_steps below the checkpoint,
a component that fails to build in a fresh run folder, a logger's full disk, an unreadable
image in a data worker."""

from __future__ import annotations

import os
import signal

import pytest

from checkpoint_helpers import copy_run
from engine_helpers import read_metrics, tiny
from minfm_core import checkpoint as ck
from minfm_core.errors import MinfmError


@pytest.fixture
def sigterm_restored():
    """train() leaves SIGTERM ignored once a stop was requested (the process only exits then)."""
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_a_sigterm_during_the_final_step_finishes_the_run(tmp_path, monkeypatch, capsys, sigterm_restored):
    from minfm_core.engine import train as T

    real = T.Trainer.train_step

    def train_step(self):
        if self.step + 1 == self.cfg.max_steps:  # the scheduler's signal arrives during the last step
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self)

    monkeypatch.setattr(T.Trainer, "train_step", train_step)
    run = tmp_path / "run"
    assert T.train(tiny(run, "train.max_steps=3", "train.ckpt_every=2")) == 0  # finished, not 143
    assert "stopped by SIGTERM" not in capsys.readouterr().out
    assert [c.name for c in ck.list_checkpoints(run)] == ["step_00000002", "step_00000003"]


def test_a_max_steps_below_the_checkpoint_is_refused_and_changes_nothing(trained_run, tmp_path, capsys):
    from minfm_core.engine.train import train

    run = copy_run(trained_run, tmp_path / "run")  # checkpoints at steps 2 and 4
    def files():  # all but the run lock, which records who held it last
        return {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".minfm.lock"}

    before = files()
    with pytest.raises(MinfmError) as info:
        train(tiny(run, "train.max_steps=3", "train.ckpt_every=2", "train.keep_last=0"))
    assert str(info.value).startswith(f"train.max_steps = 3 is below step 4 of the checkpoint this run resumes "
                                      f"from ({run / 'checkpoints' / 'step_00000004'}): nothing to train; ")
    assert files() == before  # recipe.toml still says max_steps = 4
    # The same max_steps: nothing left to train, said so; exit 0
    capsys.readouterr()
    assert train(tiny(run, "train.max_steps=4", "train.ckpt_every=2", "train.keep_last=0")) == 0
    out = capsys.readouterr().out
    assert "at step 4 = train.max_steps: the run is finished, nothing to train" in out
    assert "trained to step" not in out  # nothing was
    assert read_metrics(run) == read_metrics(trained_run)


def test_a_finished_run_says_where_its_results_are(trained_run, tmp_path, capsys):
    """The progress lines ended at the last step; nothing named the checkpoint or what to do next."""
    import re

    from minfm_core.engine.train import train

    run = copy_run(trained_run, tmp_path / "run")
    assert train(tiny(run, "train.max_steps=5", "train.ckpt_every=2", "train.keep_last=0")) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(rf"minfm: trained to step 5 in 0:00:\d\d: checkpoint {re.escape(str(run))}/checkpoints/"
                        rf"step_00000005(, galleries \S+index.html)?; sample it with: minfm sample "
                        rf'{re.escape(str(run))} --prompt "\.\.\."', last), last


def test_a_component_that_fails_to_build_leaves_no_run_folder(tmp_path):
    from minfm_core.engine.train import train

    bad = 'data={name="image_folder", root="/nonexistent"}'
    with pytest.raises(MinfmError, match="image_folder: root '/nonexistent' is not a folder"):
        train(tiny(tmp_path / "new" / "run", bad))
    assert list(tmp_path.iterdir()) == []  # the folders it made for the run, and their lock, are gone
    (tmp_path / "mine").mkdir()
    with pytest.raises(MinfmError):
        train(tiny(tmp_path / "mine", bad))
    assert [p.name for p in (tmp_path / "mine").iterdir()] == [".minfm.lock"]  # the user's folder stays as it was


def test_an_unreadable_image_in_a_data_worker_is_one_line(tmp_path):
    """With train.dataloader_num_workers, a corrupt picture read `minfm: error: Caught
    MinfmError in DataLoader worker process 0. Original Traceback ...` (the worker's
    traceback, escaped onto one line), and the run then never exited."""
    import json
    import subprocess
    import sys

    from PIL import Image

    from conftest import ROOT
    from engine_helpers import TINY

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(8):
        Image.new("RGB", (16, 16), (30 * i, 0, 0)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"picture {i}")
    (folder / "3.png").write_bytes(b"not a picture")
    data = f'data={{name = "image_folder", root = {json.dumps(str(folder))}, val_fraction = 0.0, size_multiple = 8}}'
    res = subprocess.run([sys.executable, "-m", "minfm_core.cli.main", "run", str(TINY), "--set", f"run.exp_dir={tmp_path / 'run'}",
                          "--set", data, "--set", "train.val_every=0", "--set", "train.dataloader_num_workers=1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.splitlines()[-1] == (f"minfm: error: {folder / '3.png'}: not a readable image "
                                           f"(cannot identify image file '{folder / '3.png'}')")
