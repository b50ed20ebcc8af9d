"""A run whose every optimizer step is skipped (a NaN loss, a diverged model) stops with one
line, exit 2, instead of running to max_steps and exiting 0 with nothing learnt; one skipped
step now and then (a real spike) is not a reason to stop."""

from __future__ import annotations

import json

import torch

from conftest import minfm_in_process
from engine_helpers import TINY, read_metrics
from minfm_core import config, field, hookimpl, protocols
from minfm_core.plugins import plugin


@config
class EveryConfig:
    every: int = field(1, doc="every how many steps the velocity is NaN (1: always)")


class SometimesNaN(torch.nn.Module, protocols.Denoiser):
    def __init__(self, cfg):
        super().__init__()
        self.every, self.calls = cfg.every, 0
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, img, img_pos, img_lens, txt, txt_lens, t, vec=None, guidance=None):
        if self.training:
            self.calls += 1
        nan = self.training and self.calls % self.every == 0
        return img * self.scale * (float("nan") if nan else 1.0)


class NaNPlugin:
    @hookimpl
    def register_denoisers(self, register):
        register("sometimes_nan", lambda cfg, *, load_weights=True, attention=None, balancer=None: SometimesNaN(cfg),
                 EveryConfig)


def _run(tmp_path, every: int, monkeypatch):
    from minfm_core.engine import train as train_mod

    monkeypatch.setattr(train_mod, "MAX_SKIPPED_IN_A_ROW", 3)
    with plugin(NaNPlugin(), "nan_probe"):
        return minfm_in_process("run", str(TINY), "--set", f"run.exp_dir={json.dumps(str(tmp_path))}",
                                "--set", f'model.denoiser={{name = "sometimes_nan", every = {every}}}',
                                "--set", "train.max_steps=6", "--set", "train.ckpt_every=2",
                                "--set", "train.batch_size=8")


def test_a_run_that_skips_every_step_stops(tmp_path, monkeypatch):
    res = _run(tmp_path, 1, monkeypatch)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith(
        "minfm: error: step 3: 3 optimizer steps in a row skipped (grad norm nan, loss nan): the run has diverged")
    assert [m["step"] for m in read_metrics(tmp_path) if m.get("skipped")] == [1, 2, 3]
    assert (tmp_path / "checkpoints" / "step_00000002").is_dir()  # what was saved is kept
    assert not (tmp_path / "checkpoints" / "step_00000004").exists()


def test_a_run_that_skips_now_and_then_goes_on(tmp_path, monkeypatch):
    res = _run(tmp_path, 2, monkeypatch)  # every other step: never 3 in a row
    assert res.returncode == 0, res.stderr[-2000:]
    assert [m["step"] for m in read_metrics(tmp_path) if m.get("skipped")] == [2, 4, 6]
