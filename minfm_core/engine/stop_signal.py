"""Stopping a training run cleanly on SIGTERM: finish the step, save a checkpoint, exit.

SIGTERM is how schedulers end a job (SLURM at the end of a time limit or on preemption,
Kubernetes when it evicts a pod) and what a plain ``kill`` sends. They give the job a grace
period before SIGKILL; without a handler Python ends at once and the run loses everything
since its last periodic checkpoint. With :class:`StopRequest` installed, the trainer
finishes the step it is in, all ranks agree on stopping after the same step (one tiny
all-reduce per step), the checkpoint is written and the run exits with 128 + 15 = 143,
the code a process killed by SIGTERM reports, so schedulers read it as such. Running the
same command again resumes from that step. Further SIGTERMs change nothing (a scheduler
signals every process, torchrun passes the signal on again); SIGKILL or Ctrl-C end it at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

#: What ``minfm run`` exits with after a SIGTERM stop (and its checkpoint).
STOPPED_EXIT_CODE = 128 + signal.SIGTERM


class StopRequest:
    """Set by the signal handler; the trainer reads it between steps."""

    def __init__(self) -> None:
        self.requested = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Handle SIGTERM inside the block (only the main thread may install handlers)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame) -> None:
            # Further SIGTERMs change nothing: a scheduler signals every process, the launcher
            # and torchrun pass the signal on again, and a worker that died of the second
            # copy lost the checkpoint the first one asked for. The grace period's SIGKILL,
            # or Ctrl-C, still ends the process at once.
            self.requested = True

        previous = signal.signal(signal.SIGTERM, handler)
        try:
            yield self
        finally:
            # once stopping, the process only closes and exits: late copies are ignored
            signal.signal(signal.SIGTERM, signal.SIG_IGN if self.requested else previous)
