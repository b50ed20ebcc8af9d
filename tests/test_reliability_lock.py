"""One writer per run dir, workers that die with their launcher, pre-flight checks (docs/reliability.md)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, minfm_in_process, run_minfm, stop_process
from engine_helpers import TINY, tiny
from minfm_core import runlock
from minfm_core.errors import MinfmError

LONG = ["--set", "train.max_steps=100000", "--set", "train.ckpt_every=5"]


def start_run(exp: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "minfm_core.cli.main", "run", str(TINY), "--set", f"run.exp_dir={exp}", *LONG, *args],
        cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"run ended (rc {proc.returncode}) before {what}: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def checkpoints(exp: Path) -> list[str]:
    root = exp / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) if root.is_dir() else []


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc: no psutil needed)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has stopped running; only its exit status is left




def test_second_run_on_a_busy_dir_exits_2_naming_the_holder(tmp_path):
    exp = tmp_path / "run"
    first = start_run(exp)
    try:
        holder = wait_for(lambda: runlock.holder(exp / runlock.LOCK_NAME), 60, "the lock", first)
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        t0 = time.monotonic()
        second = run_minfm("run", str(TINY), "--set", f"run.exp_dir={exp}", "--set", "train.max_steps=1")
        assert second.returncode == 2, second.stderr
        line = second.stderr.strip()
        assert "\n" not in line and "Traceback" not in line
        assert f"{exp}: in use by another run (pid {first.pid} on host {socket.gethostname()}" in line
        assert time.monotonic() - t0 < 30  # refused at the start, not after building anything
        assert first.poll() is None  # the first run goes on
    finally:
        stop_process(first)
    # The holder gone (even by a signal), the dir is free again: the kernel dropped the flock.
    # (one step past its last checkpoint: a max_steps below that is refused, tests/test_faults_train.py)
    last = max((int(n[5:]) for n in checkpoints(exp)), default=0)
    again = run_minfm("run", str(TINY), "--set", f"run.exp_dir={exp}", "--set", f"train.max_steps={last + 1}",
                      "--set", "train.ckpt_every=1")
    assert again.returncode == 0, again.stderr[-2000:]


def test_trainer_refuses_a_dir_locked_by_another_process(tmp_path, runtime):
    """The path a plain ``torchrun`` takes: rank 0's trainer locks the dir itself."""
    from minfm_core.engine.train import Trainer

    exp = tmp_path / "run"
    code = ("import sys, time; from minfm_core import runlock; runlock.acquire(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(exp)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(MinfmError, match=rf"in use by another run \(pid {holder.pid} on host "):
            Trainer(tiny(exp), runtime)
        assert not (exp / "recipe.toml").exists()  # refused before writing anything
    finally:
        holder.kill()
        holder.wait()
    Trainer(tiny(exp), runtime)  # the holder died: the lock went with it
    # Re-entrant in one process: a second trainer on the same dir (a notebook, a test) is fine.
    Trainer(tiny(exp), runtime)


def test_killed_launcher_takes_its_workers_with_it(tmp_path):
    """SIGKILL the ``--nproc-per-node`` launcher alone: every worker is gone within 10 s."""
    exp = tmp_path / "run"
    launcher = start_run(exp, "--nproc-per-node", "2", "--set", "parallel.name=fsdp2")
    below: set[int] = set()
    try:
        # The launcher holds the lock and its workers still train and save (no deadlock on it).
        wait_for(lambda: checkpoints(exp), 240, "a checkpoint", launcher)
        assert runlock.holder(exp / runlock.LOCK_NAME)["pid"] == launcher.pid
        below = descendants(launcher.pid)
        assert len(below) >= 3  # the torchrun agent and two workers
        busy = run_minfm("run", str(TINY), "--set", f"run.exp_dir={exp}", "--set", "train.max_steps=1")
        assert busy.returncode == 2 and f"pid {launcher.pid} on host" in busy.stderr

        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        t0 = time.monotonic()
        wait_for(lambda: not any(alive(p) for p in below), 10, "the workers to exit")
        print(f"workers gone {time.monotonic() - t0:.2f} s after the launcher's SIGKILL")
        # Nothing writes any more: every file under the run dir stays as it is.
        before = written(exp)
        time.sleep(2)
        assert written(exp) == before
    finally:
        for p in below | descendants(launcher.pid):
            if alive(p):
                os.kill(p, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def written(root: Path) -> dict[str, tuple[int, int]]:
    return {str(f): (f.stat().st_size, f.stat().st_mtime_ns) for f in root.rglob("*") if f.is_file()}


# ---- pre-flight ----------------------------------------------------------------------------
def test_exp_dir_that_is_a_file_exits_2(tmp_path):
    f = tmp_path / "afile"
    f.write_text("keep me")
    res = minfm_in_process("run", str(TINY), "--set", f"run.exp_dir={f}")
    assert res.returncode == 2
    # the recipe's job checks (shared with `minfm check`) catch it before the lock is tried
    assert res.stderr.strip() == f"minfm: error: {TINY}: run.exp_dir: {f} is a file, not a folder (from --set run.exp_dir)"
    assert f.read_text() == "keep me"


@pytest.mark.parametrize("procs", [[], ["--nproc-per-node", "2", "--set", "parallel.name=fsdp2"]], ids=["one", "launcher"])
def test_unwritable_checkpoints_found_at_start(tmp_path, procs):
    """A ``checkpoints`` that cannot take a file stops the run before step 1, not at the first save;
    with ``--nproc-per-node`` the launcher finds it before spawning anything."""
    exp = tmp_path / "run"
    exp.mkdir()
    (exp / "checkpoints").write_text("not a folder")
    res = (run_minfm if procs else minfm_in_process)("run", str(TINY), "--set", f"run.exp_dir={exp}", *procs)
    assert res.returncode == 2 and "OMP_NUM_THREADS" not in res.stderr  # torchrun never started
    assert res.stderr.strip() == f"minfm: error: checkpoints: {exp / 'checkpoints'} is a file, not a folder"
    assert not (exp / "metrics.jsonl").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_checkpoints_found_at_start(tmp_path):
    exp = tmp_path / "run"
    (exp / "checkpoints").mkdir(parents=True)
    (exp / "checkpoints").chmod(0o555)
    try:
        res = run_minfm("run", str(TINY), "--set", f"run.exp_dir={exp}")
    finally:
        (exp / "checkpoints").chmod(0o755)
    assert res.returncode == 2 and "checkpoints: " in res.stderr and "is not writable" in res.stderr
    assert not (exp / "metrics.jsonl").exists()


def test_room_for_a_checkpoint(tmp_path):
    """The estimate covers a real checkpoint; a disk without that much room is refused up front."""
    from minfm_core.engine.train import train

    resolved = tiny(tmp_path / "run", "train.max_steps=1")
    estimate = runlock.checkpoint_bytes(runlock.denoiser_param_bytes(resolved))
    train(resolved)
    ckpt = tmp_path / "run" / "checkpoints" / checkpoints(tmp_path / "run")[-1]
    real = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    assert real <= estimate < 2 * real
    import shutil

    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(MinfmError, match=r"run.exp_dir: .* free; a checkpoint needs about"):
        runlock.check_room(tmp_path, free * 2)
    runlock.check_room(tmp_path, 1)


def test_lock_refuses_a_planted_symlink(tmp_path):
    exp = tmp_path / "run"
    exp.mkdir()
    target = tmp_path / "elsewhere"
    target.write_text("precious")
    (exp / runlock.LOCK_NAME).symlink_to(target)
    with pytest.raises(MinfmError, match="cannot open the run lock"):
        runlock.acquire(exp)
    assert target.read_text() == "precious"


def test_exp_dir_below_a_file_exits_2(tmp_path, capsys):
    from minfm_core.cli.main import main

    f = tmp_path / "afile"
    f.write_text("keep me")
    assert main(["check", str(TINY), "--set", f"run.exp_dir={str(f / 'runs' / 'a')!r}"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"minfm: error: {TINY}: run.exp_dir: {f / 'runs' / 'a'} cannot be made: {f} is not a folder "
        "(from --set run.exp_dir)")
    assert f.read_text() == "keep me"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["run", "sample"])
def test_a_cuda_run_on_a_machine_without_cuda_is_one_line(tmp_path, command):
    """run.device = 'cuda' without a GPU was torch's AttributeError from deep inside set_device."""
    exp = tmp_path / "run"
    if command == "sample":
        assert minfm_in_process("run", str(TINY), "--set", f"run.exp_dir={exp}", "--set", "train.max_steps=1").returncode == 0
        res = minfm_in_process("sample", str(exp), "--prompt", "a red circle", "--set", 'run.device="cuda"')
    else:
        res = minfm_in_process("run", str(TINY), "--set", f"run.exp_dir={exp}", "--set", 'run.device="cuda"')
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().startswith("minfm: error: ") and \
        "run.device: 'cuda', but torch sees no CUDA device" in res.stderr, res.stderr
    # refused as the recipe is checked: `minfm check` says it too
    check = minfm_in_process("check", str(TINY), "--set", 'run.device="cuda"')
    assert check.returncode == 2 and "run.device: 'cuda', but torch sees no CUDA device" in check.stderr
    assert "\n" not in res.stderr.strip()
    if command == "run":
        assert not (exp / "metrics.jsonl").exists()
