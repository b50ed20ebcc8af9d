"""A sample job needs weights, and a sampling request has a bounded size: both refused up
front, one line, exit 2, nothing written (docs/reliability.md, "Pre-flight checks")."""

from __future__ import annotations

import time

import pytest

from engine_helpers import TINY, tiny
from minfm_core.cli.main import main
from minfm_core.errors import RecipeError
from minfm_core.recipe.checks import start_problems
from minfm_core.validators import MAX_DRAW


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minfm: error: "), err
    return err[0]


def test_a_sample_job_without_weights_is_refused(tmp_path, capsys):
    """No ``sample.source`` and no pretrained denoiser: it sampled random weights and exited 0."""
    exp = tmp_path / "run"
    assert main(["check", str(TINY), "--set", "job=sample"]) == 2
    line = _one_error_line(capsys)
    assert "sample.source: a sample job needs weights" in line and "model.denoiser.pretrained" in line
    assert main(["run", str(TINY), "--set", "job=sample", "--set", f"run.exp_dir={exp}"]) == 2
    assert "sample.source: a sample job needs weights" in _one_error_line(capsys)
    assert not exp.exists()  # refused before the run folder (and its samples/) was made


def test_the_sample_engine_refuses_it_too(tmp_path):
    """``job = "sample"`` from Python (engine.run_job) applies the same rule."""
    from minfm_core.engine import run_job

    resolved = tiny(tmp_path / "run", "job=sample")
    with pytest.raises(RecipeError, match="sample.source: a sample job needs weights"):
        run_job(resolved, job="sample")
    assert not (tmp_path / "run").exists()


def test_a_source_or_a_pretrained_denoiser_is_enough(tmp_path):
    assert start_problems(tiny(tmp_path, "job=sample", f"sample.source={str(tmp_path)!r}"), "sample") == []
    assert start_problems(tiny(tmp_path, "job=sample", 'model.denoiser.pretrained="org/name/flux.safetensors"'),
                          "sample") == []


def test_an_oversized_request_is_refused_before_anything(tmp_path, capsys):
    """4 prompts x 100,000,000 samples planned 400 M items (30 s, then 'out of memory')."""
    out = tmp_path / "out"
    argv = ["sample", str(tmp_path), *sum((["--prompt", p] for p in "abcd"), []), "--n", "100000000", "--out", str(out)]
    start = time.monotonic()
    assert main(argv) == 2
    assert time.monotonic() - start < 5
    line = _one_error_line(capsys)
    assert line.startswith("minfm: error: --n: 4 prompt(s) x 100,000,000 samples = 400,000,000") and f"{MAX_DRAW:,}" in line
    assert not out.exists()
    # the recipe's own request: minfm check and minfm run name the setting
    big = f"sample.samples_per_prompt={MAX_DRAW}"
    assert main(["check", str(TINY), "--set", "job=sample", "--set", f"sample.source={str(tmp_path)!r}", "--set", big]) == 2
    assert "sample.samples_per_prompt: 2 prompt(s)" in _one_error_line(capsys)
    assert start_problems(tiny(tmp_path, "job=sample", f"sample.source={str(tmp_path)!r}",
                               f"sample.samples_per_prompt={MAX_DRAW // 2}"), "sample") == []


def test_the_plan_is_lazy_and_unchanged():
    from minfm_core.engine.sample import plan_batches

    for n_prompts, per, size in [(3, 3, 2), (3, 3, 4), (1, 1, 16), (5, 7, 3), (2, 1, 1)]:
        items = [(i, k) for i in range(n_prompts) for k in range(per)]
        want = [items[b : b + size] for b in range(0, len(items), size)]
        plan = plan_batches(n_prompts, per, size)
        assert list(plan) == want and len(plan) == len(want) and plan[-1] == want[-1]
    start = time.monotonic()
    plan = plan_batches(4, 10**8, 16)
    assert len(plan) == 25_000_000 and plan[-1][-1] == (3, 10**8 - 1)
    assert time.monotonic() - start < 0.1
