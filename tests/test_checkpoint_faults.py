"""Checkpoint faults heal: a corrupt newest checkpoint is skipped (named, kept) and the run
continues bitwise-equal to one that never saw the fault."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from checkpoint_helpers import copy_run
from engine_helpers import TINY, losses, tiny
from minfm_core import checkpoint as ck
from minfm_core.checkpoint_format import CheckpointError
from minfm_core.errors import MinfmError

STEPS = ("train.max_steps=6", "train.ckpt_every=2", "train.keep_last=0")


def _train(run: Path, until: int | None = None) -> None:
    from minfm_core.engine.runtime import init_runtime, shutdown_runtime
    from minfm_core.engine.train import Trainer

    rt = init_runtime("cpu")
    try:
        trainer = Trainer(tiny(run, *STEPS), rt)
        try:
            trainer.fit(until=until)
        finally:
            trainer.close()
    finally:
        shutdown_runtime()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """Six steps, never interrupted."""
    run = tmp_path_factory.mktemp("ref") / "run"
    _train(run)
    return run


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """The same run stopped after step 4 (checkpoints at steps 2 and 4)."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    _train(run, until=4)
    return run


def _file(ckpt: Path, kind: str) -> Path:
    return next(ckpt.glob("*.distcp")) if kind == "distcp" else ckpt / kind


def truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


def delete(p: Path) -> None:
    p.unlink()


def empty(p: Path) -> None:
    p.write_bytes(b"")


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    opened = ck.open_checkpoint(ckpt)
    out = {}
    for part in ("model", "ema"):
        model = ck.build_denoiser(ckpt / "recipe.toml")
        ck.load_weights(opened, model, source=part)
        out.update({f"{part}.{k}": v for k, v in model.state_dict().items()})
    return out


@pytest.mark.parametrize("kind", ["distcp", "manifest.json", "rank_0.safetensors", "recipe.toml"])
@pytest.mark.parametrize("fault", [truncate, flip, delete, empty], ids=lambda f: f.__name__)
def test_corrupt_newest_checkpoint_falls_back_and_continues_exactly(reference, stopped, tmp_path, capsys, kind, fault):
    run = copy_run(stopped, tmp_path / "run")
    newest = run / "checkpoints" / "step_00000004"
    fault(_file(newest, kind))
    with pytest.raises(CheckpointError):
        ck.open_checkpoint(newest)
    _train(run)
    out = capsys.readouterr().out
    assert "warning: skipping checkpoint step_00000004" in out, out
    assert "resumed from" in out and "step_00000002 at step 2" in out
    assert losses(run) == losses(reference)
    got, want = _weights(run / "checkpoints" / "step_00000006"), _weights(reference / "checkpoints" / "step_00000006")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # The corrupt checkpoint is evidence: kept aside when its step was saved again, never deleted.
    assert (run / "checkpoints" / "step_00000004.superseded-1").is_dir()


def test_no_checkpoint_verifies_is_one_clear_error(stopped, tmp_path, capsys):
    from minfm_core.cli.main import main
    from engine_helpers import TINY

    run = copy_run(stopped, tmp_path / "run")
    for step in ("step_00000002", "step_00000004"):
        flip(next((run / "checkpoints" / step).glob("*.distcp")))
    code = main(["run", str(TINY), "--set", f"run.exp_dir={run}", *(f"--set={s}" for s in STEPS)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "no checkpoint verifies" in err and "fails its checksum" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]


def test_keep_last_never_prunes_a_skipped_checkpoint(stopped, tmp_path, capsys):
    run = copy_run(stopped, tmp_path / "run")
    flip(next((run / "checkpoints" / "step_00000004").glob("*.distcp")))
    from minfm_core.engine.runtime import init_runtime, shutdown_runtime
    from minfm_core.engine.train import Trainer

    rt = init_runtime("cpu")
    try:
        trainer = Trainer(tiny(run, "train.max_steps=8", "train.ckpt_every=2", "train.keep_last=1"), rt)
        trainer.fit()
        trainer.close()
    finally:
        shutdown_runtime()
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_00000004.superseded-1", "step_00000008"], names


def test_a_step_folder_without_manifest_is_skipped_by_name(stopped, tmp_path):
    run = copy_run(stopped, tmp_path / "run")
    shutil.copytree(run / "checkpoints" / "step_00000004", run / "checkpoints" / "step_00000005")
    os.unlink(run / "checkpoints" / "step_00000005" / "manifest.json")
    found, skipped = ck.resume_point(run)
    assert found.path.name == "step_00000004"
    assert [(p.name, "no manifest.json" in why) for p, why in skipped] == [("step_00000005", True)]


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (root only: skipped where mounting is not allowed)."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("async_save", [False, True])
def test_full_disk_is_one_error_and_loses_nothing(small_disk, capsys, async_save):
    from minfm_core.engine.runtime import init_runtime, shutdown_runtime
    from minfm_core.engine.train import Trainer

    run = small_disk / "run"
    rt = init_runtime("cpu")
    try:
        trainer = Trainer(tiny(run, *STEPS), rt)
        trainer.checkpointer.async_save = async_save
        trainer.fit(until=2)
        trainer.checkpointer.wait()
        good = ck.list_checkpoints(run)
        assert [p.name for p in good] == ["step_00000002"]
        _fill(small_disk)
        trainer.fit(until=3)
        with pytest.raises(MinfmError, match="No space left on device") as info:
            trainer.save()
            trainer.checkpointer.wait()
        # One line: where, the reason, and that nothing complete was touched.
        assert re.fullmatch(r"\S+/\.tmp-step_00000003: cannot write checkpoint: (\S+: )?No space left on device "
                            r"\(the previous checkpoints are intact\)", str(info.value)), str(info.value)
        trainer.checkpointer._pending = None
    finally:
        shutdown_runtime()
    assert ck.list_checkpoints(run) == good
    ck.open_checkpoint(good[0])  # still verifies


def _fill(disk: Path) -> None:
    """Fill ``disk`` (a file ``filler`` in it, written until the disk refuses more)."""
    with open(disk / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (256 << 10))
                f.flush()
        except OSError:
            pass


@pytest.mark.parametrize("size", [0, 3 << 20], ids=["full", "fills-while-writing"])
def test_a_safetensors_write_onto_a_full_disk_is_an_os_error(small_disk, size):
    """safetensors' Rust writer reports a full disk as its own SafetensorError: every caller that
    says a file error in one line (checkpoint saves, export, hub push, latent caches) let it
    through as a bug, a traceback and exit 1. It is an OSError now, and nothing is left."""
    import errno

    from minfm_core.weights import save_safetensors_file

    if size:  # room for part of the file: the disk fills while it is written
        (small_disk / "filler").write_bytes(b"\0" * size)
    else:
        _fill(small_disk)
    path = small_disk / "w.safetensors"
    with pytest.raises(OSError) as info:
        save_safetensors_file({"w": torch.zeros(1 << 18)}, path)  # 1 MiB
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_a_failed_saves_leftovers_do_not_stop_the_resume(small_disk, capsys):
    """A save that failed on a full disk leaves its .tmp-step_* folder, which only the next save
    removed: the start's room check refused the resume ("0.0 MiB free"), and the run's first
    write would fail, on a disk that holds the next checkpoint once they are gone. The start
    removes them now, under the run lock."""
    from minfm_core.cli.main import main

    run = small_disk / "run"
    args = ["run", str(TINY), "--set", f"run.exp_dir={run}", "--set", "train.ckpt_every=2",
            "--set", "train.max_steps=2"]
    assert main(args) == 0
    partial = run / "checkpoints" / ".tmp-step_00000003"
    partial.mkdir()
    _fill(partial)  # what a save that ran out of disk leaves
    capsys.readouterr()
    assert main([*args[:-1], "train.max_steps=4"]) == 0, capsys.readouterr().err
    assert not partial.exists()
    assert [p.name for p in ck.list_checkpoints(run)] == ["step_00000002", "step_00000004"]


def test_an_export_onto_a_full_disk_is_one_line(small_disk, trained_run):
    from conftest import minfm_in_process

    (small_disk / "filler").write_bytes(b"\0" * ((4 << 20) - (120 << 10)))  # a folder fits, not the weights
    res = minfm_in_process("export", "diffusers", str(trained_run), str(small_disk / "out"))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().endswith("No space left on device"), res.stderr
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # no empty out/ left


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_load_failures_quote_the_error_not_dcps_wrapping(runtime, tmp_path):
    """DCP reports a rank's failure as an (error, traceback summary) pair: the message quotes the error."""
    saver = ck.Checkpointer(tmp_path, async_save=False)
    saver.save(1, {"model": {"w": torch.ones(4, 4)}}, {}, {})
    path = ck.list_checkpoints(tmp_path)[-1]

    with pytest.raises(CheckpointError) as info:  # DCP's own ValueError, one line, after the checkpoint
        ck.open_checkpoint(path).load({"model": {"w": torch.zeros(5, 5)}})
    assert str(info.value) == (f"{path}: does not fit: Size mismatch between saved torch.Size([4, 4]) and "
                               "current: torch.Size([5, 5]) for model.w")

    data = _file(path, "distcp")
    data.write_bytes(b"not safetensors")  # past the file check (verify_files=False): the reader refuses it
    with pytest.raises(CheckpointError) as info:  # ours passes through unchanged
        ck.open_checkpoint(path, verify_files=False).load({"model": {"w": torch.zeros(4, 4)}})
    assert str(info.value).startswith(f"{data}: unreadable tensor data (")
    assert "FrameSummary" not in str(info.value)


def test_a_failed_dcp_write_names_the_reason():
    """The full-disk test above fails in our own first write; a failure inside DCP's writer arrives wrapped."""
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    try:
        raise OSError(28, "No space left on device")
    except OSError as exc:
        wrapped = CheckpointException("save failed", {0: _wrap_exception(exc)})
    assert str(ck._save_error(Path("/r/.tmp-step_00000003"), wrapped)) == (
        "/r/.tmp-step_00000003: cannot write checkpoint: No space left on device (the previous checkpoints are intact)")


def test_a_failed_dcp_write_of_many_ranks_names_the_rank_that_failed(monkeypatch):
    """DCP's coordinator reports rank 1's full disk as its own: every rank said "rank 0: ... No
    space left", sending the user to the wrong node's disk."""
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    try:
        raise OSError(28, "No space left on device")
    except OSError as exc:
        wrapped = CheckpointException("save failed", {1: _wrap_exception(exc)})
    monkeypatch.setattr(ck.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(ck.dist, "get_world_size", lambda: 2)
    assert str(ck._save_error(Path("/r/.tmp-step_00000003"), wrapped)) == (
        "/r/.tmp-step_00000003: cannot write checkpoint: on rank 1: No space left on device (the previous "
        "checkpoints are intact)")


def _fit(run: Path, *overrides: str) -> None:
    from minfm_core.engine.runtime import init_runtime, shutdown_runtime
    from minfm_core.engine.train import Trainer

    rt = init_runtime("cpu")
    try:
        trainer = Trainer(tiny(run, *overrides), rt)
        try:
            trainer.fit()
        finally:
            trainer.close()
    finally:
        shutdown_runtime()


def test_keep_last_counts_only_checkpoints_that_verify(stopped, tmp_path):
    # resumed at 2 behind a corrupt 4, the run saves 3: the corrupt one must not count as
    # one of the keep_last, or step 3 (just written) and step 2 (last good) both go
    run = copy_run(stopped, tmp_path / "run")
    flip(next((run / "checkpoints" / "step_00000004").glob("*.distcp")))
    _fit(run, "train.max_steps=3", "train.ckpt_every=1", "train.keep_last=1")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003", "step_00000004"]
    found, skipped = ck.resume_point(run)
    assert found.path.name == "step_00000003" and [p.name for p, _ in skipped] == ["step_00000004"]



def test_keep_last_leaves_a_checkpoint_that_is_being_read(stopped, tmp_path):
    """minfm sample / export / push / the demo read a live run's newest checkpoint while
    the run may prune it: a reader's shared lock keeps it until the reader lets go."""
    run = copy_run(stopped, tmp_path / "run")
    with ck.held(run) as reading:
        assert reading.name == "step_00000004"
        _fit(run, "train.max_steps=8", "train.ckpt_every=2", "train.keep_last=1")
        # step 2 went at the save of 6, step 6 at the save of 8; 4 stayed, readable
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004", "step_00000008"]
        assert ck.open_checkpoint(reading).path == reading
    _fit(run, "train.max_steps=10", "train.ckpt_every=2", "train.keep_last=1")  # let go: pruned as usual
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000010"]


def test_a_reader_takes_the_next_newest_when_its_pick_is_pruned_first(stopped, tmp_path, monkeypatch):
    run = copy_run(stopped, tmp_path / "run")
    newest = ck.find_checkpoint(run)
    picks = iter([run / "checkpoints" / "step_00000006"])  # found, then pruned before the lock
    monkeypatch.setattr(ck, "find_checkpoint", lambda src, also="": next(picks, newest))
    with ck.held(run) as reading:
        assert reading == newest
    monkeypatch.setattr(ck, "find_checkpoint", lambda src, also="": run / "checkpoints" / "step_00000006")
    with pytest.raises(MinfmError, match="deleted while minfm tried to open one"), ck.held(run):
        pass


def test_steps_past_eight_digits_are_found_in_step_order(tmp_path):
    """train.max_steps goes to 1e9: step_100000000 was invisible (eight digits only) and would
    have sorted before step_99999999 by name."""
    ckpts = tmp_path / "checkpoints"
    for name in ("step_99999999", "step_100000000", "step_000000002"):  # the last: no second spelling
        (ckpts / name).mkdir(parents=True)
        (ckpts / name / "manifest.json").write_text("{}")
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_99999999", "step_100000000"]
    assert ck.step_dir(100_000_000) == "step_100000000"


def test_a_save_removes_every_partial_folder_a_crash_left(stopped, tmp_path):
    """Only the .tmp- of the step being saved was removed: one left by a failed save of
    another step (a full disk) kept a checkpoint's worth of disk for good."""
    run = copy_run(stopped, tmp_path / "run")
    for name in (".tmp-step_00000003", ".tmp-step_00000099"):
        (run / "checkpoints" / name).mkdir()
        (run / "checkpoints" / name / "__0_0.distcp").write_bytes(b"half")
    _fit(run, "train.max_steps=6", "train.ckpt_every=2", "train.keep_last=0")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004", "step_00000006"]

def test_a_symlinked_or_renamed_step_folder_is_skipped(stopped, tmp_path):
    run = copy_run(stopped, tmp_path / "run")
    elsewhere = copy_run(stopped, tmp_path / "elsewhere")
    (run / "checkpoints" / "step_00000009").symlink_to(elsewhere / "checkpoints" / "step_00000004")
    shutil.copytree(run / "checkpoints" / "step_00000002", run / "checkpoints" / "step_00000007")
    found, skipped = ck.resume_point(run)
    assert found.path.name == "step_00000004"
    assert [(p.name, why.split(": ", 1)[1]) for p, why in skipped] == [
        ("step_00000009", "is a symlink, not a checkpoint folder of this run"),
        ("step_00000007", "holds step 2, not the step its name says")]


@pytest.mark.parametrize("position, why", [
    ({"consumed": -5}, "consumed must be a whole number in [0, 4611686018427387904], got -5"),
    ({"consumed": 1e400}, "consumed must be a whole number in [0, 4611686018427387904], got inf"),
    ({"consumed": 3, "epoch": 1e400, "dataset_len": 7}, "epoch must be a whole number"),
    ({"consumed": 3, "world_size": 0}, "world_size must be at least 1"),
    ({"consumed": True}, "consumed must be a whole number"),
    ({"consumed": None}, "consumed is missing"),
    ([1, 2], "expected an object, got list"),
], ids=["negative", "inf", "epoch-inf", "world-0", "bool", "null", "list"])
def test_a_hostile_data_position_is_one_line(stopped, tmp_path, capsys, position, why):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from checkpoint_helpers import refresh_record
    from engine_helpers import TINY
    from minfm_core.cli.main import main

    run = copy_run(stopped, tmp_path / "run")
    newest = run / "checkpoints" / "step_00000004"
    with safe_open(str(newest / "rank_0.safetensors"), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    data = json.loads(meta["data"])
    meta["data"] = json.dumps({**data, **position} if isinstance(position, dict) else position)
    save_file(tensors, newest / "rank_0.safetensors", metadata=meta)
    refresh_record(newest, "rank_0.safetensors")
    code = main(["run", str(TINY), "--set", f"run.exp_dir={run}", *(f"--set={s}" for s in STEPS)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert "rank_0.safetensors: bad per-rank state (data position: " in err and why in err, err


def test_a_refused_start_leaves_the_runs_recipe_and_links_are_replaced(stopped, tmp_path, capsys):
    from engine_helpers import TINY
    from minfm_core.cli.main import main

    run = copy_run(stopped, tmp_path / "run")
    before = (run / "recipe.toml").read_bytes()
    argv = ["run", str(TINY), "--set", f"run.exp_dir={run}", *(f"--set={s}" for s in STEPS)]
    assert main([*argv, "--set", "model.denoiser.d_model=64"]) == 2  # the checkpoints do not fit
    assert "does not fit" in capsys.readouterr().err
    assert (run / "recipe.toml").read_bytes() == before
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "recipe.toml").symlink_to(notes)
    assert main(["run", str(TINY), "--set", f"run.exp_dir={fresh}", "--set", "train.max_steps=1"]) == 0
    assert notes.read_text() == "mine" and not (fresh / "recipe.toml").is_symlink()
    assert "max_steps = 1" in (fresh / "recipe.toml").read_text()


def test_a_peer_lost_mid_load_is_not_blamed_on_the_checkpoint(trained_run, monkeypatch):
    """A rank whose peer died (OOM-killed) while DCP loaded was told the good checkpoint "does
    not fit", and a user may delete it for that; the lost connection now reaches the CLI's
    one line for it (cli/main.py, peer_lost_line)."""
    import minfm_core.checkpoint as ckpt_mod
    from minfm_core.checkpoint_format import CheckpointError

    ckpt = ckpt_mod.open_checkpoint(trained_run / "checkpoints" / "step_00000004")
    for message, kind in (("[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer", RuntimeError),
                          ("size mismatch for model.x", CheckpointError)):
        def fail(*args, message=message, **kwargs):
            raise RuntimeError(message)

        monkeypatch.setattr(ckpt_mod.dcp, "load", fail)
        with pytest.raises(Exception) as info:
            ckpt.load({"step": torch.tensor(0)})
        assert type(info.value) is kind, info.value
        assert ("Connection reset by peer" if kind is RuntimeError else "does not fit: size mismatch") in str(info.value)
