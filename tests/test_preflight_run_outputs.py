"""Every place a training run writes is probed before step 1, as ``checkpoints/`` is; a
logger's folder cannot take one of the run's own names (docs/reliability.md, "Pre-flight checks")."""

from __future__ import annotations

import os

import pytest

from engine_helpers import TINY, tiny
from minfm_core import runlock
from minfm_core.cli.main import main


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minfm: error: "), err
    return err[0]


def _tb(subdir: str) -> str:
    return f'logging.loggers=[{{name="tensorboard", subdir="{subdir}"}}]'


# ---- the tensorboard logger's subdir ------------------------------------------------------
RUN_OWN = ["recipe.toml", "checkpoints", "samples", "samples/tb", "metrics.jsonl", "loss.png", "profile",
           "latents", "samples_cli", "wandb", "wandb_id.txt", "checkpoints/step_00000001"]
NOT_PLAIN = ["./tb", "tb/", "a//b", ".", ".tb", "tb/.x", ".minfm.lock"]


@pytest.mark.parametrize("subdir", RUN_OWN + NOT_PLAIN)
def test_tensorboard_subdir_cannot_take_the_runs_own_names(tmp_path, capsys, subdir):
    """``subdir = "recipe.toml"`` made a folder of that name; every later run in the dir failed."""
    exp = tmp_path / "run"
    assert main(["check", str(TINY), "--set", _tb(subdir)]) == 2
    assert "logging.loggers[0].subdir: " in _one_error_line(capsys)
    assert main(["run", str(TINY), "--set", _tb(subdir), "--set", f"run.exp_dir={exp}"]) == 2
    assert "logging.loggers[0].subdir: " in _one_error_line(capsys)
    assert not exp.exists()


@pytest.mark.parametrize("subdir", ["tensorboard", "tb/run1", "my_logs"])
def test_plain_tensorboard_subdirs_are_accepted(capsys, subdir):
    assert main(["check", str(TINY), "--set", _tb(subdir)]) == 0


def test_the_reserved_names_are_what_the_run_writes():
    """The list follows the writers' own constants."""
    from minfm_core.checkpoint import CKPT_DIR
    from minfm_plugins.loggers import jsonl

    names = {n.rstrip("/") for n in runlock.RUN_DIR_NAMES}
    assert {CKPT_DIR, runlock.LOCK_NAME, "recipe.toml", "samples", "profile"} <= names
    assert jsonl.METRICS_FILE == "metrics.jsonl" and jsonl.PLOT_FILE == "loss.png"


# ---- probes at the start ------------------------------------------------------------------
def _refused_before_step_1(capsys, exp, *overrides) -> str:
    sets = sum((["--set", o] for o in (f"run.exp_dir={exp}", "train.max_steps=3", *overrides)), [])
    assert main(["run", str(TINY), *sets]) == 2
    line = _one_error_line(capsys)
    assert not (exp / "checkpoints").exists() and not (exp / "recipe.toml").exists()
    return line


def test_a_file_named_samples_is_found_at_start(tmp_path, capsys):
    """It failed at the first gallery, after steps and without a checkpoint."""
    exp = tmp_path / "run"
    exp.mkdir()
    (exp / "samples").write_text("x")
    line = _refused_before_step_1(capsys, exp, "train.sample_every=2")
    assert line == f"minfm: error: train.sample_every (galleries): {exp / 'samples'} is a file, not a folder"
    assert (exp / "samples").read_text() == "x"
    assert not (exp / "metrics.jsonl").exists()


def test_metrics_jsonl_that_is_not_a_file_is_found_at_start(tmp_path, capsys):
    exp = tmp_path / "run"
    (exp / "metrics.jsonl").mkdir(parents=True)
    line = _refused_before_step_1(capsys, exp)
    assert line == (f"minfm: error: logging.loggers[0] (jsonl): {exp / 'metrics.jsonl'} is a folder; "
                    "the run writes a file there")
    os.rmdir(exp / "metrics.jsonl")
    os.mkfifo(exp / "metrics.jsonl")  # opening it for writing would block
    assert "is not a regular file" in _refused_before_step_1(capsys, exp)


def test_a_logger_folder_below_a_file_is_found_at_start(tmp_path, capsys):
    exp = tmp_path / "run"
    exp.mkdir()
    (exp / "tb").write_text("x")
    line = _refused_before_step_1(capsys, exp, _tb("tb/events"))
    assert line == f"minfm: error: logging.loggers[0] (tensorboard): {exp / 'tb'} is a file, not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only files and folders")
@pytest.mark.parametrize("what", ["samples", "metrics.jsonl"])
def test_read_only_outputs_are_found_at_start(tmp_path, capsys, what):
    exp = tmp_path / "run"
    exp.mkdir()
    target = exp / what
    target.mkdir() if what == "samples" else target.write_text("")
    target.chmod(0o555 if what == "samples" else 0o444)
    try:
        line = _refused_before_step_1(capsys, exp, "train.sample_every=2")
    finally:
        target.chmod(0o755 if what == "samples" else 0o644)
    assert "is not writable" in line


def test_the_run_outputs_list(tmp_path):
    """What preflight probes for a run (the launcher of --nproc-per-node probes the same list)."""
    resolved = tiny(tmp_path, "train.sample_every=2", "train.profile_steps=[1]", _tb("tb/x"))
    got = {(p.relative_to(tmp_path).as_posix(), folder, what) for p, folder, what in runlock.run_outputs(resolved)}
    assert got == {("recipe.toml", False, "run.exp_dir"), ("samples", True, "train.sample_every (galleries)"),
                   ("profile", True, "train.profile_steps"), ("tb/x", True, "logging.loggers[0] (tensorboard)")}
    assert runlock.run_outputs(resolved, "sample") == []
    jsonl = {p.name for p, _, _ in runlock.run_outputs(tiny(tmp_path))}
    assert jsonl == {"recipe.toml", "metrics.jsonl", "loss.png"}


def test_the_launcher_probes_them_before_spawning(tmp_path):
    """With --nproc-per-node the launcher finds a file named samples before any worker exists."""
    from conftest import run_minfm

    exp = tmp_path / "run"
    exp.mkdir()
    (exp / "samples").write_text("x")
    res = run_minfm("run", str(TINY), "--set", f"run.exp_dir={exp}", "--set", "train.sample_every=2",
                    "--nproc-per-node", "2", "--set", "parallel.name=fsdp2")
    assert res.returncode == 2 and "OMP_NUM_THREADS" not in res.stderr  # torchrun never started
    assert res.stderr.strip() == f"minfm: error: train.sample_every (galleries): {exp / 'samples'} is a file, not a folder"


# ---- the run's recipe.toml ----------------------------------------------------------------
@pytest.mark.parametrize("head, why", [
    ("# lr sweep, second try\n", "it has comments"),
    ("", "it extends another recipe"),
])
def test_a_hand_written_recipe_in_the_run_folder_is_not_replaced(tmp_path, capsys, monkeypatch, head, why):
    """A folder holding its own recipe (``exp_dir = "."``, run from there) had it replaced by the
    resolved dump, comments and ``extends`` gone, and the run went on (exit 0)."""
    exp = tmp_path / "exp"
    exp.mkdir()
    mine = exp / "recipe.toml"
    text = f'{head}extends = "{TINY}"\n\n[run]\nexp_dir = "."\n\n[train]\nmax_steps = 2\n'
    mine.write_text(text)
    monkeypatch.chdir(exp)
    assert main(["run", "recipe.toml"]) == 2
    assert _one_error_line(capsys).endswith(
        f"run.exp_dir: recipe.toml looks written by hand ({why}); a run records its resolved recipe there at every "
        "start, which would replace it: keep the recipe outside run.exp_dir, or choose another run.exp_dir")
    assert mine.read_text() == text and not (exp / "checkpoints").exists()


@pytest.mark.parametrize("damage", ["garbage", "cut"])
def test_a_damaged_run_record_says_how_to_go_on(tmp_path, capsys, damage):
    """A run's recipe.toml cut short or overwritten with garbage (a crash, a full disk) was
    refused as "written by hand"; it names the damage and the way on: remove it, as every
    checkpoint keeps its own recipe, and the run resumes."""
    exp = tmp_path / "exp"
    args = ["run", str(TINY), "--set", f"run.exp_dir={exp}", "--set", "train.max_steps=2"]
    assert main(args) == 0
    record = exp / "recipe.toml"
    text = record.read_bytes()
    record.write_bytes(b"\x00\xff" * 64 if damage == "garbage" else text[: len(text) // 3] + b"[tra")
    capsys.readouterr()
    assert main([*args[:-1], "train.max_steps=3"]) == 2
    line = _one_error_line(capsys)
    assert f"run.exp_dir: {record} is no recipe minfm can read (" in line and line.endswith(
        "if it is this run's damaged record, remove it (each checkpoint keeps its own recipe.toml), else keep it "
        "outside run.exp_dir or choose another run.exp_dir")
    record.unlink()
    assert main([*args[:-1], "train.max_steps=3"]) == 0
    assert f"minfm: resumed from {exp / 'checkpoints' / 'step_00000002'} at step 2" in capsys.readouterr().out
    assert (exp / "checkpoints" / "step_00000003").is_dir()


def test_a_recorded_recipe_is_rewritten_on_resume(tmp_path):
    """The run's own record (resolved: no comments, no extends) is what a resume rewrites."""
    exp = tmp_path / "exp"
    assert main(["run", str(TINY), "--set", f"run.exp_dir={exp}", "--set", "train.max_steps=2"]) == 0
    recorded = (exp / "recipe.toml").read_text()
    assert "extends" not in recorded and "#" not in recorded
    assert main(["run", str(exp / "recipe.toml"), "--set", "train.max_steps=3"]) == 0
    assert "max_steps = 3" in (exp / "recipe.toml").read_text()
