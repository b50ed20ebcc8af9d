"""Fault handling, piece by piece and in one process: a lost peer, failure agreement, a killed
torchrun, durable checkpoints, the single-process store, the run lock's clean-up, run_outputs."""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import pytest
import torch

from minfm_core import checkpoint as ck
from minfm_core import runlock
from minfm_core.errors import MinfmError, peer_lost_line

GLOO = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
        "[127.0.0.1]:13232. This is typically caused by a remote worker crashing. Check the logs of the remote "
        "worker before reporting an error. GLHF!")


def test_a_collective_that_lost_its_peer_is_one_line():
    line = peer_lost_line(RuntimeError(GLOO))
    assert line.startswith("lost the connection to another process of this run "
                           "(Connection closed by peer [127.0.0.1]:13232): ") and "\n" not in line
    assert peer_lost_line(RuntimeError("NCCL error: ncclRemoteError: remote process exited or there was a "
                                       "network error")) is not None
    assert peer_lost_line(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None  # a bug stays one
    assert peer_lost_line(BrokenPipeError(errno.EPIPE, "Broken pipe")) is None  # not a collective's


@pytest.mark.parametrize("world", ["2", None])
def test_the_cli_reports_a_lost_peer_without_a_traceback(monkeypatch, capsys, world):
    from minfm_core.cli import main as cli

    def boom(args):
        raise RuntimeError(GLOO)

    parser = types.SimpleNamespace(parse_args=lambda argv: argparse.Namespace(func=boom))
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if world:
        monkeypatch.setenv("WORLD_SIZE", world)
    rc = cli.main([])
    err = capsys.readouterr().err
    if world:  # one of several processes: the other one's error is the cause
        assert rc == 2 and err.startswith("minfm: error: lost the connection to another process") and "Traceback" not in err
        assert err.count("\n") == 1
    else:  # a process of its own has no peer: whatever this is, it is a bug
        assert rc == 1 and "Traceback" in err


def test_barrier_raises_the_first_failed_ranks_error_on_every_rank(monkeypatch):
    ck.barrier()  # a world of one, nothing failed: nothing to do
    with pytest.raises(MinfmError, match=r"^disk full$"):
        ck.barrier("disk full")  # one process: its own error, as it is

    def gather(out, obj):  # rank 0 passed nothing, rank 1 its error
        out[:] = [obj, "x/rank_1.safetensors: No space left on device"]

    monkeypatch.setattr(ck.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(ck.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(ck.dist, "all_gather_object", gather)
    with pytest.raises(MinfmError) as info:
        ck.barrier(None)
    assert str(info.value) == "rank 1: x/rank_1.safetensors: No space left on device"


def test_a_rank_file_that_cannot_be_written_is_one_line(runtime, tmp_path, monkeypatch):
    import safetensors.torch as st

    def full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    saver = ck.Checkpointer(tmp_path, async_save=False)
    monkeypatch.setattr(st, "save_file", full)
    with pytest.raises(MinfmError) as info:
        saver.save(1, {"model": {"w": torch.ones(2)}}, {"g": torch.zeros(1)}, {})
    assert str(info.value) == (f"{tmp_path}/checkpoints/.tmp-step_00000001: cannot write checkpoint: "
                               "rank_0.safetensors: No space left on device (the previous checkpoints are intact)")
    assert ck.list_checkpoints(tmp_path) == []


def test_checkpoint_files_and_folders_are_synced_before_anything_is_pruned(runtime, tmp_path, monkeypatch):
    """A power cut after the prune must not find the newest checkpoint's files or name unwritten."""
    events = []
    real_fsync, real_rmtree = os.fsync, shutil.rmtree

    def fsync(fd):
        events.append(("sync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rmtree(path, *a, **kw):
        events.append(("prune", str(path)))
        real_rmtree(path, *a, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    saver = ck.Checkpointer(tmp_path, keep_last=1, async_save=False)
    for step in (1, 2):
        saver.save(step, {"model": {"w": torch.full((4,), float(step))}}, {"g": torch.zeros(1)}, {})
    root = tmp_path / "checkpoints"
    tmp2 = root / ".tmp-step_00000002"
    prune = events.index(("prune", str(root / "step_00000001")))
    synced = [Path(p) for kind, p in events[:prune] if kind == "sync"]
    # every file (ours, DCP's, the manifest under its temporary name), then the folder's
    # entries, then its new name: all on disk before the old checkpoint goes
    assert synced[-5].parent == tmp2 and synced[-5].name.startswith(".rank_0.safetensors.")
    assert synced[-4] == tmp2 / "__0_0.distcp"
    assert synced[-3].name.startswith(".manifest.json.") and synced[-2:] == [tmp2, root]
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000002"]


def test_a_torchrun_killed_by_a_signal_is_128_plus_it_and_one_line(monkeypatch, capsys):
    from minfm_core.cli import run_cmd

    real = subprocess.Popen

    def popen(cmd, **kw):  # a "torchrun" the OOM killer ends
        return real([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], **kw)

    monkeypatch.setattr(run_cmd.subprocess, "Popen", popen)
    assert run_cmd.relaunch(2, ["run", "recipe.toml"]) == 137  # not sys.exit(-9): 247
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("minfm: error: the launcher's torchrun") and "SIGKILL" in err


def test_a_world_of_one_leaves_no_store_file(monkeypatch, tmp_path):
    from minfm_core.engine.runtime import init_runtime, shutdown_runtime

    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where a file store would go
    init_runtime("cpu")
    try:
        assert list(tmp_path.iterdir()) == []  # a SIGKILL now leaves nothing behind
    finally:
        shutdown_runtime()


def test_a_run_folder_made_for_nothing_is_removed_with_its_lock(tmp_path):
    new = tmp_path / "a" / "run"
    runlock.acquire(new)
    runlock.acquire(new)  # re-entrant: the folder stays until the last release
    runlock.release(new)
    assert (new / runlock.LOCK_NAME).is_file()
    runlock.release(new)
    assert list(tmp_path.iterdir()) == []  # the folders this lock made, and only those
    used = tmp_path / "used"
    runlock.acquire(used)
    (used / "metrics.jsonl").write_text("")
    runlock.release(used)
    assert (used / runlock.LOCK_NAME).is_file()  # something was written: kept
    mine = tmp_path / "mine"
    mine.mkdir()
    runlock.acquire(mine)
    runlock.release(mine)
    assert (mine / runlock.LOCK_NAME).is_file()  # the user's folder: the lock is never deleted there


def test_a_lock_file_removed_before_it_was_locked_is_taken_afresh(tmp_path, monkeypatch):
    """The protocol that makes removing a lock file safe: whoever opened the old file before its
    holder removed it finds, once it has the lock, that the path names another file, and starts over."""
    import fcntl

    run = tmp_path / "run"
    calls = []

    def flock(fd, how):
        if not calls:  # the holder removes the file between our open and our lock
            os.unlink(run / runlock.LOCK_NAME)
            (run / runlock.LOCK_NAME).write_text("")
        calls.append(fd)
        fcntl.flock(fd, how)

    monkeypatch.setattr(runlock, "fcntl", types.SimpleNamespace(flock=flock, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB))
    lock = runlock.acquire(run)
    try:
        assert len(calls) == 2
        assert os.fstat(lock.fd).st_ino == os.stat(run / runlock.LOCK_NAME).st_ino
    finally:
        lock.release()


@pytest.mark.parametrize("name", ["/etc/minfm-probe", "../outside.txt", "logs/../../x/"])
def test_run_outputs_must_stay_in_the_run_folder(tmp_path, name):
    run = types.SimpleNamespace(exp_dir=str(tmp_path / "run"))
    train = types.SimpleNamespace(sample_every=0, sample_at_start=False, profile_steps=[])
    slot = types.SimpleNamespace(config=types.SimpleNamespace(run_outputs=("ok.txt", name)),
                                 component=types.SimpleNamespace(name="mylog"))
    resolved = types.SimpleNamespace(recipe=types.SimpleNamespace(run=run, train=train),
                                     slots={"logging.loggers[1]": slot})
    with pytest.raises(MinfmError) as info:
        runlock.run_outputs(resolved, "train")
    assert str(info.value).startswith(f"logging.loggers[1] (mylog): run_outputs: refusing path {name!r}")
    slot.config.run_outputs = ("ok.txt", "logs/")
    assert runlock.run_outputs(resolved, "train")[1:] == [(Path(run.exp_dir) / "ok.txt", False, "logging.loggers[1] (mylog)"),
                                                         (Path(run.exp_dir) / "logs", True, "logging.loggers[1] (mylog)")]
