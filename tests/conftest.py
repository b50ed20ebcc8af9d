"""Shared fixtures: run the real `minfm` CLI in a subprocess, toy registries."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# pytest-xdist runs a worker per core; next to each other, OpenMP's spinning waiters (libgomp's
# default) fight for the cores: tests/test_engine_train.py + test_checkpoint_faults.py +
# test_core_recipe_errors.py took 61 s on 2 workers, 36 s with sleeping waiters. Set before
# anything loads torch (and libgomp with it); the subprocesses inherit it. One process: kept.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

pytest.register_assert_rewrite("hub_fixtures")
from checkpoint_helpers import trained_run  # noqa: E402, F401  (fixtures)
from hub_fixtures import hub_env, hub_server  # noqa: E402, F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_DISTS = Path(__file__).resolve().parent / "plugin_dists"


def run_minfm(*args: str, env: dict | None = None, cwd: str | Path | None = None, timeout: float = 300):
    """Run ``python -m minfm_core.cli.main ARGS`` and return the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "minfm_core.cli.main", *args],
        capture_output=True, text=True, env=full_env, cwd=cwd or ROOT, timeout=timeout,
    )


def minfm_in_process(*args: str, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """``minfm ARGS`` run by ``minfm_core.cli.main.main`` in this process, its output captured:
    what :func:`run_minfm` returns, without a fresh interpreter's 3-5 s of imports. For
    commands whose outcome does not hang on the process (its environment, signals, exit
    path); a test about those uses :func:`run_minfm`."""
    from cli_capture import call_main

    here = os.getcwd()
    os.chdir(cwd or ROOT)
    try:
        code, out, err = call_main(list(args))
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(["minfm", *args], code, out, err)


def minfm_call(*args: str, env: dict | None = None, cwd: str | Path | None = None, timeout: float = 300):
    """:func:`minfm_in_process` where the call sets no environment of its own, else :func:`run_minfm`."""
    if env:
        return run_minfm(*args, env=env, cwd=cwd, timeout=timeout)
    return minfm_in_process(*args, cwd=cwd)


@pytest.fixture
def runtime():
    """A CPU world of one (gloo), shut down after the test."""
    from minfm_core.engine.runtime import init_runtime, shutdown_runtime

    rt = init_runtime("cpu")
    yield rt
    shutdown_runtime()


@pytest.fixture
def minfm():
    return run_minfm


@pytest.fixture
def toy_registry():
    from toy_components import toy_registry as make

    return make()


@pytest.fixture
def example_plugin_env():
    """Environment that makes the third-party test plugins importable (their dist-info included)."""
    path = os.pathsep.join([str(PLUGIN_DISTS), os.environ.get("PYTHONPATH", "")])
    return {"PYTHONPATH": path}


def stop_process(proc: subprocess.Popen) -> None:
    """Ctrl-C a server or run started by a test; kill it if it does not stop in 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def site_without_minfm(tmp_path: Path) -> Path:
    """This interpreter's site-packages without minFM's own installation (its dist-info and
    editable hooks), as a folder of links: for tests that install minFM somewhere else."""
    import site

    deps = tmp_path / "deps"
    deps.mkdir()
    for sp in site.getsitepackages():
        for entry in os.listdir(sp):
            if entry.startswith(("minfm", "__editable__")) or entry.endswith(".pth") or (deps / entry).exists():
                continue
            (deps / entry).symlink_to(os.path.join(sp, entry))
    return deps


def pytest_collection_modifyitems(config, items):
    """The tests marked slow first (in their own order): with pytest-xdist's workers, one left
    running a minute-long test at the end of the suite while the others wait is the suite's tail."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
