"""The launcher's environment is input too: a malformed RANK / WORLD_SIZE / LOCAL_RANK is refused
by name, before any work starts (minfm_core/launch_env.py)."""

from __future__ import annotations

import pytest

from minfm_core.errors import MinfmError
from minfm_core.launch_env import MAX_WORLD_SIZE, LaunchEnv, is_multi_process, launch_env

VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# Malformed anywhere, plus each variable's own out-of-range values (with WORLD_SIZE=2 beside them).
MALFORMED = ["", "two", "1.0", "-1", "+1", "0x2", "1e3", "٣", "2 3"]
OUT_OF_RANGE = {"RANK": ["2", "7"], "WORLD_SIZE": ["0", str(MAX_WORLD_SIZE + 1)], "LOCAL_RANK": ["2"]}


@pytest.fixture
def env(monkeypatch):
    for name in VARS:
        monkeypatch.delenv(name, raising=False)

    def set_env(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_env


def test_no_launcher_is_rank_0_of_1(env):
    assert launch_env() == LaunchEnv(rank=0, world_size=1, local_rank=0)
    assert not is_multi_process()


def test_torchrun_values_are_read(env):
    env(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1")
    assert launch_env() == LaunchEnv(rank=3, world_size=4, local_rank=1)
    assert is_multi_process()
    env(RANK="1", WORLD_SIZE=" 2\n")  # surrounding whitespace (a shell's echo) is not an error
    assert launch_env().world_size == 2


@pytest.mark.parametrize("name,value", [(n, v) for n in VARS for v in MALFORMED + OUT_OF_RANGE[n]])
def test_bad_values_are_refused_by_name(env, name, value):
    env(**{"WORLD_SIZE": "2", name: value})
    with pytest.raises(MinfmError) as err:
        launch_env()
    assert str(err.value).startswith(f"{name}={value!r} (environment): expected an integer from ")
    # The exit path never fails on it: the error was already reported, the process is not one of many.
    assert is_multi_process() == (name != "WORLD_SIZE")


@pytest.mark.parametrize("name", VARS)
def test_cli_refuses_before_any_work(minfm, tmp_path, name):
    exp = tmp_path / "run"
    res = minfm("run", "tests/recipes/tiny.toml", "--set", f"run.exp_dir={exp}",
                env={"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", name: "x1"})
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"minfm: error: {name}='x1' (environment): expected an integer from ")
    assert not exp.exists()


def test_a_launcher_pid_not_set_by_minfm_is_refused(minfm, tmp_path):
    """Workers of ``--nproc-per-node`` watch the pid their launcher leaves in MINFM_LAUNCHER_PID."""
    from minfm_core.runlock import LAUNCHER_ENV

    res = minfm("run", "tests/recipes/tiny.toml", "--set", f"run.exp_dir={tmp_path / 'run'}",
                env={"LOCAL_RANK": "0", LAUNCHER_ENV: "12ab"})
    assert res.returncode == 2 and res.stderr.strip() == (
        f"minfm: error: {LAUNCHER_ENV}='12ab' (environment): minfm's launcher sets it to its pid for its workers; unset it")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["junk", '{"a": 1}', "[1, 2]", "[" * 50_000])
def test_a_relaunch_argv_not_set_by_minfm_is_refused(minfm, value):
    """Workers of ``--nproc-per-node`` read their arguments from MINFM_RELAUNCH_ARGV; junk there was a traceback."""
    from minfm_core.cli.run_cmd import ARGV_ENV

    res = minfm(env={ARGV_ENV: value})
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"minfm: error: {ARGV_ENV} (environment): ")
    assert minfm(env={ARGV_ENV: '["--version"]'}).stdout.startswith("minfm ")


def test_the_launchers_exit_code_is_the_workers():
    from minfm_core.cli.torchrun import exit_code

    assert exit_code([2, 2]) == 2  # bad input on every rank: the user's error, not a crash
    # (so is bad input on one rank: the other exits 2 having lost its peer, test_faults_distributed.py)
    assert exit_code([2, 143]) == 2 and exit_code([-15, 2]) == 2  # the other rank was stopped by torchrun
    assert exit_code([2, 1]) == 1 and exit_code([0, 143]) == 143 and exit_code([-9]) == 137
    assert exit_code([]) == 1


def test_torchruns_agent_acts_on_the_first_sigterm_only():
    """torchrun's handler raised for every copy of SIGTERM, the later ones inside its shutdown,
    whose wait for the workers they cut short: the workers, saving their stop checkpoint,
    died with the agent (tests/test_stop_signal.py signals every process twice)."""
    import os
    import signal
    import time

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import parse_args

    from minfm_core.cli.torchrun import take_sigterm

    mine = parse_args(["--signals-to-handle=SIGINT,SIGUSR1", "-m", "x"])
    take_sigterm(mine)  # a user who leaves SIGTERM out of torchrun's hands keeps it that way
    assert mine.signals_to_handle == "SIGINT,SIGUSR1"

    old = signal.getsignal(signal.SIGTERM)
    try:
        args = parse_args(["--standalone", "--nproc-per-node=2", "-m", "x"])
        take_sigterm(args)
        assert args.signals_to_handle == "SIGINT,SIGHUP,SIGQUIT"  # torchrun installs these, not SIGTERM
        with pytest.raises(SignalException) as raised:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs between bytecodes
        assert raised.value.sigval == signal.SIGTERM
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGTERM)  # ignored: the test process lives on
        time.sleep(0.05)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, old)


def test_a_recipe_error_under_the_launcher_is_exit_2_without_torchruns_traceback(tmp_path):
    from conftest import run_minfm
    from engine_helpers import TINY

    res = run_minfm("run", str(TINY), "--nproc-per-node", "2", "--set", "parallel.name=fsdp2",
                    "--set", f"run.exp_dir={tmp_path / 'run'}", "--set", 'data={name="image_folder", root="/nonexistent"}')
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "ChildFailedError" not in res.stderr, res.stderr
    # each rank prints it, unless torchrun stopped it first, having seen the other fail
    assert res.stderr.count("minfm: error: data: image_folder: root '/nonexistent' is not a folder") in (1, 2)
    assert list(tmp_path.iterdir()) == []  # the launcher made the run folder for nothing: removed


def test_more_processes_than_the_host_runs_are_refused_before_any_spawn(tmp_path, monkeypatch, capsys):
    """1,024 workers on a 2-core box held it ten minutes before a step; on a CPU host at most 4
    processes a core, refused before a worker (or the run folder) exists."""
    import os

    from engine_helpers import TINY
    from minfm_core.cli import run_cmd
    from minfm_core.cli.main import main

    monkeypatch.setattr(run_cmd.os, "cpu_count", lambda: 2)
    args = ["run", str(TINY), "--set", f"run.exp_dir={tmp_path / 'run'}", "--set", 'parallel.name="fsdp2"',
            "--set", "train.total_batch_size=-1", "--nproc-per-node", "9"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == "minfm: error: --nproc-per-node 9: this host has 2 CPU core(s) and no GPU; at most 8 processes (4 per core)"
    assert not (tmp_path / "run").exists()
    assert run_cmd.host_procs_problem(8) is None and os.cpu_count() >= 1


def test_a_sigterm_while_a_failed_worker_unwinds_keeps_its_exit_code(monkeypatch):
    """torchrun SIGTERMs the other workers once one fails; one that had failed too (each rank
    refuses a bad recipe) could get it while leaving main's context managers: a traceback and
    exit 1 there read as a crash (exit 1 overall) instead of the recipe error's 2."""
    import contextlib
    import os
    import signal
    import time

    from minfm_core.cli import main as cli

    @contextlib.contextmanager
    def sigterm_on_exit():
        yield
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs between bytecodes

    old = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # main installs its handler only over the default
    try:
        monkeypatch.setattr(cli, "_plain_warnings", sigterm_on_exit)
        monkeypatch.setattr(cli, "_main", lambda argv: 2)
        assert cli.main([]) == 2
        monkeypatch.setattr(cli, "_main", lambda argv: (_ for _ in ()).throw(cli.Terminated()))
        assert cli.main([]) == 143  # while the command still ran: stopped
    finally:
        signal.signal(signal.SIGTERM, old)
