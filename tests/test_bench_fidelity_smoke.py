"""The fidelity benches the README and docs/video.md tell users to run, run end to end on a
tiny trained model (a changed engine API broke both once without a test noticing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from checkpoint_helpers import trained_run  # noqa: F401  (a session fixture)

ROOT = Path(__file__).resolve().parent.parent


def bench(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_quickstart_fidelity_scores_a_run(trained_run):  # noqa: F811
    r = bench("quickstart_fidelity.py", str(trained_run), "--seeds", "1", "--steps", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "colour accuracy" in r.stdout and "shape accuracy" in r.stdout


@pytest.mark.slow
def test_video_fidelity_scores_a_run(tmp_path):
    pytest.importorskip("av", reason="the video extra")
    from minfm_core.engine.train import train
    from minfm_core.recipe import load_recipe

    run = tmp_path / "run"
    tiny = ["model.denoiser.d_model=32", "model.denoiser.d_head=16", "model.denoiser.rope_axes=[2,6,8]",
            "model.denoiser.n_ds_blocks=1", "model.denoiser.n_ss_blocks=1", "train.max_steps=1",
            "train.val_every=0", "train.sample_every=0", f"run.exp_dir={str(run)!r}"]
    train(load_recipe(ROOT / "recipes" / "quickstart_video.toml", tiny))
    r = bench("video_fidelity.py", str(run), "--seeds", "1", "--steps", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "motion accuracy" in r.stdout and "colour accuracy" in r.stdout
