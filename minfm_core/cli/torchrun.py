"""torch.distributed.run for ``minfm ... --nproc-per-node N``: torchrun's own launcher, whose
way out is an exit code, not a traceback.

Plain torchrun ends a run whose workers failed with its ``ChildFailedError`` traceback and
exit code 1, whatever the workers said: a recipe error (each worker printed one line and
exited 2) read as a crash, and Ctrl-C as exit 1. Here the workers' own lines stay what
the user reads, and the exit code is theirs: 2 when every failed worker exited 2 (bad
input; the workers torchrun then stopped do not count), 128 + the signal when torchrun
itself was signalled (130 for Ctrl-C, 143 for SIGTERM), else the first failed worker's code
(see :func:`exit_code`).

SIGTERM is acted on once. A scheduler signals every process of a job, often twice, and the
launcher passes its copies on, so the agent gets several; torchrun's own handler raised
again for each, inside its shutdown, which cut short its wait for the workers: the agent
exited, and its workers, still writing the checkpoint the first copy asked for, died with it
(their parent-death signal). Here the first copy starts torchrun's shutdown and later ones
are ignored (see :func:`take_sigterm`).
"""

from __future__ import annotations

import signal
import sys


def exit_code(codes: list[int]) -> int:
    """The launcher's exit code for the failed workers' exit codes (a negative one: killed by
    that signal, as subprocess reports it).

    When one worker fails, torchrun SIGTERMs the others: they end with 143 (stopped) or -15,
    which says nothing about the failure, so those count only when nothing else failed. A
    worker that lost its peer in a collective exits 2 with a line saying so (cli/main.py):
    a user's error on one rank is then 2 overall, while a bug (1) or a kill by a signal on
    one rank, the likely cause of the others' lost peer, outweighs their 2s."""
    codes = [128 - c if c < 0 else c for c in codes]
    real = [c for c in codes if c not in (0, 143)]
    if not real:
        return 143 if codes else 1
    if all(c == 2 for c in real):
        return 2
    return next(c for c in real if c != 2)  # a crash on one rank outweighs bad input on another


def take_sigterm(args) -> None:
    """Handle SIGTERM here rather than in torchrun, if torchrun was to handle it: its
    ``--signals-to-handle`` (which it installs handlers for when it starts the workers) loses
    SIGTERM, and the first copy raises the exception torchrun's handler raises, so that its
    shutdown runs as before; every later copy is ignored."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    names = [n.strip() for n in args.signals_to_handle.split(",")]
    if "SIGTERM" not in names:
        return
    args.signals_to_handle = ",".join(n for n in names if n != "SIGTERM")

    def first_copy(signum, frame):
        signal.signal(signum, signal.SIG_IGN)  # the workers are stopping: let them finish
        raise SignalException(f"got signal: {signal.Signals(signum).name}", sigval=signal.Signals(signum))

    signal.signal(signal.SIGTERM, first_copy)


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    take_sigterm(args)
    try:
        run(args)  # not torchrun's main: its @record prints the failure table again
    except ChildFailedError as exc:
        return exit_code([f.exitcode for f in exc.failures.values()])
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
