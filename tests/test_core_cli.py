"""The `minfm` CLI contract: version, exit codes, one-line errors without tracebacks."""

from __future__ import annotations

import json
import textwrap

import pytest

import minfm_core
from conftest import ROOT
from ports import free_port


def test_version(minfm):
    res = minfm("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"minfm {minfm_core.__version__}"


def test_missing_recipe_exit_2(minfm, tmp_path):
    res = minfm("check", str(tmp_path / "nope.toml"))
    assert res.returncode == 2
    assert res.stderr.strip() == f"minfm: error: recipe file not found: {tmp_path / 'nope.toml'}"


def _commands(parser, prefix=()):
    """(words, parser) of every command and subcommand, from the parser minfm builds."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _commands(sub, (*prefix, name))


def test_a_mistyped_flag_is_refused_by_its_command_with_the_flag_meant():
    """`minfm sample SRC --promt x` showed `minfm`'s usage and no suggestion."""
    from minfm_core.cli.main import build_parser

    checked = 0
    for words, sub in _commands(build_parser()):
        flags = [f for f in sub._option_string_actions if f.startswith("--") and f != "--help" and len(f) > 5]
        for flag in flags:
            typo = flag[:3] + flag[4:]  # one letter dropped
            if not any(typo in other for other in flags):  # not an abbreviation argparse takes
                assert sub._meant([typo, "x"]) == f" (did you mean {flag}?)", (words, typo)
                checked += 1
    assert checked > 50


@pytest.mark.parametrize("argv, usage, line", [
    (["sample", "run", "--promt", "x"], "usage: minfm sample ", "unrecognized arguments: --promt x (did you mean --prompt?)"),
    (["plugins", "--jsn"], "usage: minfm plugins ", "unrecognized arguments: --jsn (did you mean --json?)"),
    (["hub", "push", "src", "org/name", "--revison", "v1"], "usage: minfm hub push ",
     "unrecognized arguments: --revison v1 (did you mean --revision?)"),
    (["check", "r.toml", "--zzz"], "usage: minfm check ", "unrecognized arguments: --zzz"),
])
def test_unknown_arguments_get_the_commands_usage(argv, usage, line, capsys):
    from minfm_core.cli.main import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(usage) and err.rstrip().endswith(f"minfm: error: {line}"), err


def test_bad_set_exit_2(minfm, tmp_path):
    p = tmp_path / "r.toml"
    p.write_text("")
    res = minfm("check", str(p), "--set", "train.max_steps")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.strip() == (
        "minfm: error: --set 'train.max_steps': expected KEY=VALUE with a dotted key, e.g. train.max_steps=100"
    )


def test_recipe_errors_exit_2_with_paths(minfm, tmp_path):
    p = tmp_path / "r.toml"
    p.write_text(textwrap.dedent("""
        [model.denoiser]
        name = "flux"
        [train]
        max_step = 3
        lr = "x"
    """))
    res = minfm("check", str(p))
    assert res.returncode == 2
    assert res.stderr.splitlines() == [  # the sections' problems and the components' together
        f"minfm: error: {p}: 3 problems",
        "  train.lr: expected float, got 'x'",
        "  train: unknown key 'max_step' (did you mean 'max_steps'?)",
        "  model.denoiser: no flavor given, so these must be set: d_model, d_head, n_ds_blocks, n_ss_blocks, d_txt, "
        "d_vec, d_img, rope_axes, rope_theta, guidance_embed, mlp_ratio, qkv_bias",
    ]


def test_every_problem_of_a_recipe_in_one_try(minfm, tmp_path):
    """A class's own checks stop at its first value out of range: the loader sets the values
    it names aside and tries again, so one run lists them all (it took one fix per value)."""
    p = tmp_path / "r.toml"
    p.write_text(textwrap.dedent(f"""
        extends = "{ROOT / 'recipes' / 'quickstart.toml'}"
        [model.denoiser]
        d_head = "x"
        [train]
        lr = 2.0
        warmup_steps = -1
        lrr = 1
        [sample]
        size = [1, 0, 16]
        steps = 0
    """))
    res = minfm("check", str(p), "--set", "train.batch_size=0")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert sorted(res.stderr.splitlines()[1:]) == sorted([
        "  train.lr: must be in [0, 1], got 2.0",
        "  train.warmup_steps: must be in [0, 1000000000], got -1",
        "  train.batch_size: must be in [1, 1048576], got 0 (from --set train.batch_size)",
        "  train: unknown key 'lrr' (did you mean 'lr'?)",
        "  sample.steps: must be in [1, 10000], got 0",
        "  sample.size: each element must be in [1, 16383], got 0",
        "  model.denoiser.d_head: expected int, got 'x'",
    ])
    # an unknown top-level table and a key too long to quote whole are set aside too
    p.write_text(f'extends = "{ROOT / "recipes" / "quickstart.toml"}"\n[trian]\nx = 1\n[train]\n{"k" * 100} = 1\n'
                 'lr = 5.0\nmin_lr = 7.0\n')
    res = minfm("check", str(p))
    assert "train.lr: must be in [0, 1], got 5.0" in res.stderr and "train.min_lr: must be in [0, 1], got 7.0" in res.stderr
    assert "<root>: unknown key 'trian' (did you mean 'train'?)" in res.stderr and "4 problems" in res.stderr
    # an array's element is never set aside: its default would stand in for what the user wrote
    p.write_text(f'extends = "{ROOT / "recipes" / "quickstart.toml"}"\n[[logging.loggers]]\nname = "csv"\n'
                 '[[logging.loggers]]\nname = 5\n[train]\nlr = 3.0\n')
    res = minfm("check", str(p))
    assert res.stderr.splitlines()[1:] == ["  train.lr: must be in [0, 1], got 3.0",
                                           "  logging.loggers[1]: expected the component's name as a string, got 5"]
    # a check of several fields is not repeated on the values left after setting others aside
    p.write_text(f'extends = "{ROOT / "recipes" / "quickstart.toml"}"\n[model.denoiser]\nd_head = 48\nd_model = 0\n')
    res = minfm("check", str(p))
    assert res.stderr.splitlines() == [f"minfm: error: {p}: model.denoiser.d_model: must be in [1, 65536], got 0"]


def test_unknown_component_lists_installed(minfm, tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[model.denoiser]\nname = "fluxx"\n')
    res = minfm("check", str(p))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "model.denoiser.name: unknown denoiser 'fluxx'" in res.stderr
    assert "installed: " in res.stderr


def test_usage_error_exit_2(minfm):
    res = minfm("check")
    assert res.returncode == 2
    assert "minfm: error: the following arguments are required: recipe" in res.stderr


def test_unknown_command_exit_2(minfm):
    res = minfm("fly")
    assert res.returncode == 2 and "invalid choice: 'fly'" in res.stderr


def test_nproc_must_be_positive(minfm, tmp_path):
    p = tmp_path / "r.toml"
    p.write_text("")
    res = minfm("run", str(p), "--nproc-per-node", "0")
    assert res.returncode == 2 and "--nproc-per-node: expected a positive integer, got 0" in res.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_serve_shows_a_run_directory(tmp_path, host):
    """`minfm serve` serves the run folder, on loopback unless told (galleries are plain files)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    (tmp_path / "recipe.toml").write_text("job = 'train'")
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "index.html").write_text("<h1>gallery</h1>")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "minfm_core.cli.main", "serve", str(tmp_path), "--port", str(port),
                             "--host", host],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 30
        while True:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/samples/index.html", timeout=2).read()
                break
            except OSError:
                assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "timeout"
                time.sleep(0.2)
        assert body == b"<h1>gallery</h1>"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    warning = f"minfm serve: warning: listening on {host}: other machines can read this run's files"
    assert (warning in proc.stderr.read()) == (host == "0.0.0.0")


def test_serve_missing_dir_exit_2(minfm, tmp_path):
    res = minfm("serve", str(tmp_path / "nope"))
    assert res.returncode == 2 and f"{tmp_path / 'nope'}: no such folder (a run directory)" in res.stderr
    (tmp_path / "t.sh").write_text("echo")  # a file was reported missing too
    res = minfm("serve", str(tmp_path / "t.sh"))
    assert res.returncode == 2 and f"{tmp_path / 't.sh'}: a file, not a folder (a run directory)" in res.stderr
    # it serves every file below the folder: a home folder by a slip of the tab key is refused
    res = minfm("serve", str(tmp_path))
    assert res.returncode == 2 and (f"{tmp_path}: neither a run directory (no recipe.toml) nor a gallery "
                                    "folder (no index.html); minfm serve shows only those") in res.stderr


def test_omp_waiters_sleep_only_on_a_busy_machine():
    # entry() sets OMP_WAIT_POLICY=PASSIVE when other work already holds half the CPUs
    # (sleeping waiters: 1.5x faster there, 1.3x slower on an idle machine).
    from minfm_core.cli.main import busy_machine

    assert not busy_machine(0.1, 2) and not busy_machine(0.9, 2)
    assert busy_machine(1.0, 2) and busy_machine(5.0, 2)
    assert not busy_machine(7.0, 16) and busy_machine(8.0, 16)
    assert busy_machine(0.5, 0)  # an unknown CPU count counts as one


def test_a_worker_ends_as_a_normal_exit_would(tmp_path):
    # entry() ends each process of a multi-process run with os._exit (see exit_worker):
    # the exit code, buffered output, running non-daemon threads and atexit handlers must
    # all be dealt with as at a normal exit.
    import os
    import subprocess
    import sys

    marker, late = tmp_path / "atexit-ran", tmp_path / "thread-finished"
    script = textwrap.dedent(f"""
        import atexit, pathlib, sys, threading, time
        atexit.register(lambda: pathlib.Path({str(marker)!r}).write_text("yes"))
        sys.argv = ["minfm", *sys.argv[1:]]
        import minfm_core.cli.main as cli

        def command_then_a_writer(real=cli.main):
            code = real()
            # A non-daemon thread still writing when the command returns (say, a checkpoint).
            write = lambda: (time.sleep(0.5), pathlib.Path({str(late)!r}).write_text("done"))
            threading.Thread(target=write).start()
            return code

        cli.main = command_then_a_writer
        cli.entry()
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout a buffered pipe
    env["WORLD_SIZE"] = "2"
    alone = subprocess.run([sys.executable, "-m", "minfm_core.cli.main", "plugins"], capture_output=True, text=True,
                           env={k: v for k, v in env.items() if k != "WORLD_SIZE"}, timeout=120)
    ok = subprocess.run([sys.executable, "-c", script, "plugins"], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0 and marker.read_text() == "yes" and late.read_text() == "done"
    assert ok.stdout == alone.stdout and len(ok.stdout) > 1000  # every buffered line arrived
    marker.unlink()
    bad = subprocess.run([sys.executable, "-c", script, "check", str(tmp_path / "nope.toml")], capture_output=True,
                         text=True, env=env, timeout=120)
    assert bad.returncode == 2 and marker.read_text() == "yes"
    assert bad.stderr.strip() == f"minfm: error: recipe file not found: {tmp_path / 'nope.toml'}"


def test_a_failed_allocation_is_one_line_not_a_bug(capsys, monkeypatch):
    """torch's CPU allocator refuses what the machine cannot hold with a plain RuntimeError;
    minfm's error boundary names it as what it is (exit 2), not as a bug in minFM."""
    import torch

    from minfm_core.errors import out_of_memory_line

    with pytest.raises(RuntimeError) as real:
        torch.empty(2**47, dtype=torch.uint8)  # 128 TiB: past any overcommit heuristic
    line = out_of_memory_line(real.value)
    assert line is not None and line.startswith("out of memory: an allocation of 131,072.0 GiB failed")
    assert out_of_memory_line(MemoryError()).startswith("out of memory: MemoryError")
    assert out_of_memory_line(RuntimeError("shape mismatch")) is None
    assert out_of_memory_line(ValueError("can't allocate memory")) is None

    def command(args):
        torch.empty(2**47, dtype=torch.uint8)

    from cli_capture import main_with_command

    assert main_with_command(monkeypatch, command) == 2  # it asks for too much, as a huge model would
    err = capsys.readouterr().err
    assert err.startswith("minfm: error: out of memory: an allocation of 131,072.0 GiB failed")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_minfm_warning_is_one_plain_line(capsys):
    """A resume with another run.seed warned in Python's format: a source path, a line number
    and the source line of the warning call."""
    import warnings

    from minfm_core.cli.main import _plain_warnings
    from minfm_core.errors import MinfmWarning

    with _plain_warnings(), warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("data: resuming with seed 1 instead of 0", MinfmWarning)
        with pytest.warns(UserWarning, match="a library's own"):  # goes the usual way, untouched
            warnings.warn("a library's own", UserWarning)
    assert capsys.readouterr().err.splitlines() == ["minfm: warning: data: resuming with seed 1 instead of 0"]


@pytest.mark.parametrize("argv", [
    ["hub", "push", "~no_such_user_minfm/run", "org/model"],
    ["sample", "~no_such_user_minfm/run", "--prompt", "a"],
    ["export", "~no_such_user_minfm/run", "--out", "x"],
], ids=["hub-push", "sample", "export"])
def test_a_tilde_of_an_unknown_user_is_a_missing_path_not_a_crash(minfm, argv):
    # pathlib's expanduser raises RuntimeError for an unknown user; os.path's leaves the name
    r = minfm(*argv)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "~no_such_user_minfm/run" in r.stderr


def test_errors_show_control_characters_escaped(capsys):
    """An error quotes what it refuses; an ESC sequence or a text-direction override in a hostile
    value must not reach the terminal raw."""
    from minfm_core.cli.main import main

    hostile = "evil\x1b]0;owned\x07\u202etxt"
    assert main(["check", "minfm:quickstart.toml", "--set", "job=sample",
                 "--set", f"sample.prompt_file={json.dumps(hostile)}"]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "\u202e" not in err
    assert "evil\\x1b]0;owned\\x07\\u202etxt" in err


def test_success_lines_show_control_characters_escaped(tmp_path, capsys):
    """Errors were escaped, the lines of a run that went well were not: a (downloaded) recipe's
    run.exp_dir of ESC sequences set the terminal's title and colour in "trained to step 1"."""
    from engine_helpers import TINY

    from minfm_core.cli.main import main

    exp = tmp_path / "r\x1b]0;PWNED\x07\x1b[31mRED"
    assert main(["run", str(TINY), "--set", f"run.exp_dir={json.dumps(str(exp))}", "--set", "train.max_steps=1",
                 "--set", "train.sample_every=0", "--set", "train.val_every=0"]) == 0
    out = capsys.readouterr().out
    assert "trained to step 1" in out and "\x1b" not in out and "\x07" not in out
    assert "r\\x1b]0;PWNED\\x07\\x1b[31mRED" in out


def test_a_newline_in_a_quoted_name_cannot_start_a_line_of_its_own(tmp_path, capsys):
    """A file name holding a newline (a dataset, a repo) could print a second line reading like
    minfm's own ("minfm: all good"); errors are one line, a RecipeError's list one per problem."""
    from minfm_core.cli.main import main
    from minfm_core.errors import RecipeError

    fake = "x\nminfm: all good, training finished"
    assert main(["check", str(tmp_path / fake)]) == 2  # a MinfmError: no such recipe
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "x\\nminfm: all good" in err, err
    both = RecipeError([f"a.b: refusing {fake!s}", "c.d: out of range"], source=f"r{fake}.toml")
    assert str(both).count("\n") == 2 and "a.b: refusing x\\nminfm: all good" in str(both)
    assert str(both).startswith("rx\\nminfm: all good, training finished.toml: 2 problems\n")
