"""The launch environment is refused the same way by every command that reads it: ``check``
too, and a launcher pid that is no pid is one line, not an OverflowError."""

from __future__ import annotations

import pytest

from engine_helpers import TINY
from minfm_core.cli.main import main
from minfm_core.errors import MinfmError
from minfm_core.launch_env import launch_env
from minfm_core.runlock import LAUNCHER_ENV, MAX_PID, launcher_pid

VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@pytest.fixture
def clean_env(monkeypatch):
    for name in (*VARS, LAUNCHER_ENV):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minfm: error: "), err
    return err[0]


@pytest.mark.parametrize("value", ["999999999999", "0", str(MAX_PID + 1), "1" * 5000, "0" * 30])
def test_an_out_of_range_launcher_pid_is_one_line(tmp_path, capsys, clean_env, value):
    clean_env.setenv(LAUNCHER_ENV, value)
    with pytest.raises(MinfmError, match=f"^{LAUNCHER_ENV}="):
        launcher_pid()
    clean_env.setenv("LOCAL_RANK", "0")
    exp = tmp_path / "run"
    assert main(["run", str(TINY), "--set", f"run.exp_dir={exp}"]) == 2
    assert _one_error_line(capsys).startswith(f"minfm: error: {LAUNCHER_ENV}=")
    assert not exp.exists()


def test_a_launcher_pid_in_range_is_read(clean_env):
    clean_env.setenv(LAUNCHER_ENV, " 4321\n")
    assert launcher_pid() == 4321


@pytest.mark.parametrize("env", [{"RANK": "x", "LOCAL_RANK": "-3"}, {"LOCAL_RANK": "-3"}, {"WORLD_SIZE": "two"},
                                 {"WORLD_SIZE": "2", "RANK": "2"}])
def test_check_refuses_what_run_refuses(capsys, clean_env, env):
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert main(["check", str(TINY)]) == 2
    line = _one_error_line(capsys)
    assert " (environment): expected an integer from " in line
    assert main(["sample", "no/such/source", "--prompt", "a"]) == 2  # before the source is looked at
    assert _one_error_line(capsys) == line


def test_a_huge_number_is_out_of_range_not_a_traceback(clean_env):
    clean_env.setenv("WORLD_SIZE", "2" * 5000)  # int() refuses more than 4300 digits
    with pytest.raises(MinfmError, match="^WORLD_SIZE="):
        launch_env()
    clean_env.setenv("WORLD_SIZE", "0002")
    assert launch_env().world_size == 2
