"""``minfm ARGS`` run by ``minfm_core.cli.main.main`` inside the calling process, with its
output captured: what a ``minfm`` subprocess would return, less the interpreter's start-up.

Used by conftest.minfm_in_process (in the test process) and by hub_helpers.main_in_process
(one child process that runs many calls).
"""

from __future__ import annotations

import contextlib
import io
import sys
import traceback


def call_main(args: list[str]) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of one call, ending as the interpreter would end it:
    ``SystemExit``'s code (argparse's usage errors), or a traceback on stderr and 1."""
    from minfm_core.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code
            if code is not None and not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
        except Exception:  # noqa: BLE001 - a traceback is what the tests look for
            traceback.print_exc()
            code = 1
    return code or 0, out.getvalue(), err.getvalue()


def main_with_command(monkeypatch, func) -> int:
    """``minfm test-command``, a command of the test's own (``func(args)``), run by ``main``:
    how a test drives main's error boundary with a failure no real command makes on cue."""
    import argparse

    from minfm_core.cli import main as cli_main

    parser = cli_main.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands.add_parser("test-command").set_defaults(func=func)
    monkeypatch.setattr(cli_main, "build_parser", lambda: parser)
    return cli_main.main(["test-command"])
