"""``minfm``: entry point, subcommand table and exit codes.

Exit codes (contract): 0 success; 2 bad usage, recipe or input (one clear message,
no traceback); 1 unexpected failure (traceback kept); 130 Ctrl-C; 143 SIGTERM: a
training run stops after saving a checkpoint (engine/stop_signal.py), any other command
at once, after the same clean-up as Ctrl-C (temporary files and folders removed).

:func:`main` is the one error boundary: an exception leaving a command is either a
:class:`MinfmError` (the user's to fix: one line, exit 2) or a bug (traceback, a request to
report it, exit 1). Errors are translated into MinfmErrors where they arise, naming the
file; three kinds are translated here as a last resort because any command can meet them:
``OSError`` (a full or read-only disk, a missing permission: ``minfm: error: FILE: reason``),
a failed allocation (``minfm: error: out of memory: ...``) and torch's
``CheckpointException``, which derives from ``BaseException`` and so slips past
``except Exception``. In a multi-process run, a collective that fails because another
process went away (it printed its own error and exited) is one line too, exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Sequence
from typing import NoReturn

from .. import __version__
from ..errors import (
    MinfmError, MinfmWarning, RecipeError, checkpoint_failures, data_worker_lost_line, first_line, os_error_line,
    out_of_memory_line, peer_lost_line, terminal_safe,
)
from ..launch_env import is_multi_process
from .argtypes import Parser as _Parser


def build_parser() -> argparse.ArgumentParser:
    from . import cache_cmd, check_cmd, plugins_cmd, run_cmd

    parser = _Parser(prog="minfm", description="Minimal flow matching: train and sample text-to-image models.")
    parser.add_argument("--version", action="version", version=f"minfm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    plugins_cmd.register(sub)
    check_cmd.register(sub)
    run_cmd.register(sub)
    cache_cmd.register(sub)

    from ..plugins import load_plugins

    load_plugins().pm.hook.register_commands(subparsers=sub)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that clean-up runs as for Ctrl-C (``finally``
    blocks, temporary folders, atomic writes' temporary files). A BaseException, so that no
    ``except Exception`` swallows it."""


def _terminate(signum, frame) -> NoReturn:
    signal.signal(signum, signal.SIG_IGN)  # copies of it (torchrun passes it on again) must not cut the clean-up short
    raise Terminated


@contextlib.contextmanager
def _sigterm_raises():
    """Without this, SIGTERM (``kill``, a scheduler, torchrun stopping a failed job) ends
    Python at once and an export, a latents cache or a sample run leaves its temporary files
    behind (model-sized, for an export). A training run installs its own handler over this
    one (stop after a checkpoint). Only where SIGTERM still has its default action and only
    the main thread may set handlers: a host program's own handler is left alone."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _plain_warnings():
    """A MinfmWarning reads ``minfm: warning: <message>`` like minfm's other lines; Python's
    own format (file, line number, the source line) is for a library's warnings."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, MinfmWarning):
            print(terminal_safe(f"minfm: warning: {message}"), file=sys.stderr if file is None else file)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def main(argv: Sequence[str] | None = None) -> int:
    code = None
    try:
        with _sigterm_raises(), _plain_warnings():
            code = _main(argv)
    except Terminated:
        # SIGTERM during the command (_main lets it through), or after it, while it printed
        # its error or left these context managers: torchrun stops the other workers of a run
        # whose one worker failed, and a worker that had failed too crashed there with a
        # traceback and exit 1, which outweighed the 2s of a recipe error (torchrun.exit_code).
        if code is None:
            print("minfm: terminated (SIGTERM)", file=sys.stderr)
            return 143
    return code


def _main(argv: Sequence[str] | None) -> int:
    from .run_cmd import ARGV_ENV

    try:
        if argv is None and ARGV_ENV in os.environ:  # re-launched by --nproc-per-node
            argv = _relaunch_argv(ARGV_ENV, os.environ[ARGV_ENV])
            sys.argv = [sys.argv[0], *argv]
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):  # a plugin's command that set no func
            parser.print_help(sys.stderr)
            return 2
        return int(args.func(args) or 0)
    except MinfmError as exc:
        # a RecipeError lists its problems one per line; any other error is one line
        lines = isinstance(exc, RecipeError)
        _say(f"minfm: error: {exc}" + ("" if lines else _raised_in(exc)), lines=lines)
        return exc.exit_code
    except KeyboardInterrupt:
        print("minfm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`minfm plugins | head`): nothing is wrong with the command.
        _silence_stdout()
        return 0
    except OSError as exc:
        _say(f"minfm: error: {os_error_line(exc)}{_raised_in(exc)}")
        return 2
    except Exception as exc:
        # A failed allocation, or a data worker the machine killed, is the machine's limit; a
        # collective that lost its peer is the other process's error (printed there), not a
        # bug here: one line, exit 2 on this rank as on that one (cli/torchrun.exit_code).
        line = (out_of_memory_line(exc) or data_worker_lost_line(exc)
                or (peer_lost_line(exc) if is_multi_process() else None))
        if line is None:
            return _bug()
        _say(f"minfm: error: {line}")
        return 2
    except BaseException as exc:
        if _is_checkpoint_exception(exc):
            _say(f"minfm: error: {checkpoint_error_line(exc)}")
            return 2
        raise  # SystemExit and the like keep their meaning


def _say(line: str, lines: bool = False) -> None:
    """One line on stderr in one write: print's separate newline let the lines of two workers
    of one run run into each other. Control and format characters are shown escaped: an error
    quotes what it refuses, and a hostile recipe value, file name or repo name holding ESC
    sequences, a text-direction override or a newline (a second line that reads like minfm's
    own) would otherwise drive the terminal or disguise the message. ``lines``: the text is
    a RecipeError's list, whose problems were escaped one by one. Secrets are masked
    (minfm_core.secrets): an error quotes the value it refuses, which may be an expanded
    ``${HF_TOKEN}``, and a CI log is read by others."""
    from ..secrets import mask_secrets

    sys.stderr.write(terminal_safe(mask_secrets(line), newlines=lines) + "\n")
    sys.stderr.flush()


def _relaunch_argv(name: str, text: str) -> list[str]:
    """The arguments ``minfm run --nproc-per-node`` hands its workers in ``name`` (a JSON list of strings)."""
    from ..jsonio import parse_json

    argv = parse_json(text, f"{name} (environment)")
    if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
        raise MinfmError(f"{name} (environment): expected a JSON list of arguments; "
                         f"minfm sets it for its own workers, unset it")
    return argv


REPORT = "minfm: this is a bug in minFM or one of its plugins; please report it with the traceback above"


def bug_report_line(exc: BaseException) -> str:
    """The request that closes a bug's traceback, naming whose code raised it where that is known."""
    from ..plugins import whose_code

    who = whose_code(exc)
    if who is None:
        return REPORT
    if who == "minFM":
        return "minfm: this is a bug in minFM; please report it with the traceback above"
    return f"minfm: this is a bug in {who}, whose code raised it; please report it to its authors with the traceback above"


def _raised_in(exc: BaseException) -> str:
    """`` (raised in plugin 'acme' (distribution acme-minfm))`` when a third-party plugin's
    code raised the user's error ``exc`` (a file its logger could not write, its own refusal):
    the line alone left the user guessing which of the recipe's components spoke."""
    from ..plugins import whose_code

    who = whose_code(exc, plugin_first=True)
    return "" if who is None else f" (raised in {who})"


def _bug() -> int:
    traceback.print_exc()
    print(bug_report_line(sys.exc_info()[1]), file=sys.stderr)
    return 1


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _is_checkpoint_exception(exc: BaseException) -> bool:
    # Matched by name: importing torch here would slow every command down.
    return any(c.__name__ == "CheckpointException" for c in type(exc).__mro__)


def checkpoint_error_line(exc: BaseException) -> str:
    """One line for a DCP failure: the checkpoint (when known) and each failing rank's first error."""
    where = getattr(exc, "checkpoint_path", None) or getattr(exc, "path", None)
    parts = []
    for rank, inner in checkpoint_failures(exc):
        if isinstance(inner, OSError):
            text = os_error_line(inner)
        elif isinstance(inner, BaseException):
            text = f"{type(inner).__name__}: {first_line(inner)}" if str(inner).strip() else type(inner).__name__
        else:
            text = str(inner)
        parts.append(f"rank {rank}: {text}")
    head = f"checkpoint {where}" if where else "checkpoint"
    return f"{head}: could not be read or written ({'; '.join(parts) or 'no detail'})"


def busy_machine(load: float, cpus: int) -> bool:
    """Whether other work already holds at least half of the CPUs (1-minute load average)."""
    return load >= max(cpus, 1) / 2


def entry() -> None:
    # OpenMP threads that finish a parallel region spin a while before they sleep. On a
    # machine other jobs share, that spinning fights them for the cores: the video
    # quickstart took 40 min instead of 6 next to four other jobs, and a quickstart step
    # ran 1.5x slower next to one busy process. On an idle machine the spinning is what
    # makes the many short parallel regions cheap: sleeping waiters made the same steps
    # 1.3x slower (docs/performance.md, "OpenMP wait policy"). So sleeping waiters
    # (PASSIVE) only where the machine is already busy when minfm starts; a user's own
    # OMP_WAIT_POLICY or GOMP_SPINCOUNT wins. Set before torch loads libgomp.
    os.environ.update(omp_wait_policy())
    code = main()
    if is_multi_process():
        exit_worker(code)
    sys.exit(code)


def exit_worker(code: int) -> NoReturn:
    """End one process of a multi-process run as the interpreter would, up to its teardown:
    wait for the other non-daemon threads (as ``threading`` does at exit: executors shut
    down first), run the atexit handlers, flush stdout and stderr; then ``os._exit``.

    Why: once FSDP2 has sharded a module, the gloo process group outlives
    ``destroy_process_group`` (torch 2.13 holds it outside Python's reach), so its threads
    still run while the interpreter tears itself down, and about one 2-process run in 20
    had a worker abort there ("terminate called without an active exception", SIGABRT):
    torchrun then reported a finished run as failed (docs/reliability.md, measured by
    bench/worker_exit.py). Nothing is left to that teardown: files are closed, the process
    group destroyed, and Python's atexit handlers (loggers, compile workers) run here first.
    """
    import atexit
    import threading

    # The first two steps of Py_FinalizeEx, which has no public spelling of either.
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken stream: nothing left to say
            stream.flush()
    os._exit(code)


def omp_wait_policy(idle: dict[str, str] | None = None) -> dict[str, str]:
    """The OpenMP settings ``minfm`` adds to its environment at start (see ``entry``).

    Nothing where the user set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``; PASSIVE waiters
    where the machine is already busy; else ``idle`` (by default nothing: libgomp's own
    spinning). A bench pins ``idle`` to spell the choice out for runs it starts later.
    """
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return {}
    with contextlib.suppress(OSError, AttributeError):  # no load average on this OS
        if busy_machine(os.getloadavg()[0], os.cpu_count() or 1):
            return {"OMP_WAIT_POLICY": "PASSIVE"}
    return dict(idle or {})


if __name__ == "__main__":
    entry()
