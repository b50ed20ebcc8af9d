"""User-facing errors.

Anything raised as a :class:`MinfmError` is the user's to fix (a recipe, a flag, a
file): the CLI prints its message on one line and exits with code 2, no traceback.
Every other exception is a bug and keeps its traceback (exit code 1).
"""

from __future__ import annotations

import errno
import re


class MinfmWarning(UserWarning):
    """Something the user should know that stops nothing (a dataset changed size on resume,
    images without captions skipped). ``minfm`` prints it as ``minfm: warning: <message>``,
    without Python's source-line decoration."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-blank line of ``exc``'s message (at most ``limit`` characters), else its
    type's name: what a one-line error quotes from a library's multi-line exception."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0][:limit] if lines else type(exc).__name__


def os_error_line(exc: OSError) -> str:
    """``FILE: reason`` for an OSError (``reason`` alone when it names no file)."""
    reason = exc.strerror or (errno.errorcode.get(exc.errno, "") if exc.errno else "") or str(exc) or type(exc).__name__
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    return f"{' -> '.join(names)}: {reason}" if names else reason


def out_of_memory_line(exc: BaseException) -> str | None:
    """One line for a failed allocation, or None when ``exc`` is something else.

    torch reports CPU allocations the machine refuses as a plain RuntimeError
    ("DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes") and CUDA
    ones as ``torch.OutOfMemoryError``; both are a model, batch or size too big for the
    machine, not a bug.
    """
    text = str(exc)
    cpu = isinstance(exc, RuntimeError) and "can't allocate memory" in text
    if not (isinstance(exc, MemoryError) or cpu or type(exc).__name__ == "OutOfMemoryError"):
        return None
    asked = re.search(r"tried to allocate (\d+) bytes", text)
    what = f"an allocation of {int(asked[1]) / 2**30:,.1f} GiB failed" if asked else first_line(exc, 200)
    return (f"out of memory: {what} (a smaller model, train.batch_size, sample.batch_size or size "
            "fits; or more GPUs with parallel = fsdp2)")


#: torch's RuntimeError for a data worker that died: killed by a signal (its SIGCHLD
#: handler, which may raise anywhere in the training process), or found gone while waiting.
_WORKER_LOST = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) "
                          r"(?:is killed by signal: ([^.]+)\.|exited unexpectedly)")


def data_worker_lost_line(exc: BaseException) -> str | None:
    """One line for a data worker (``train.dataloader_num_workers``, ``cache latents
    --dataloader-num-workers``) that died, or None when ``exc`` is something else. The usual
    killer is the machine: the kernel's out-of-memory killer (SIGKILL), or a container's small
    ``/dev/shm`` (SIGBUS), through which workers hand over their batches; torch's message and
    traceback read as a bug in minFM."""
    found = _WORKER_LOST.search(str(exc)) if isinstance(exc, RuntimeError) else None
    if found is None:
        return None
    pids, signal_name = found[1].strip(), found[2]
    who = f"data worker{'s' if ',' in pids else ''} (pid {pids})"
    without = "with no data workers (dataloader_num_workers 0) the items load in this process, where a crash shows its cause"
    if signal_name is None:  # a dataset's error in a worker comes back as itself: this is a crash
        return f"{who} exited unexpectedly; {without}"
    if signal_name == "Bus error":
        why = "out of shared memory (/dev/shm, through which workers hand over batches: raise its size, " \
              "e.g. docker run --shm-size=8g)"
    elif signal_name == "Killed":
        why = "most often the out-of-memory killer (fewer data workers or smaller batches need less memory)"
    else:
        why = without
    return f"{who} killed by signal: {signal_name}; {why}"


#: What a collective raises in a process whose peer is gone (it exited after its own error, or
#: was killed): gloo's pair errors, NCCL's remote error, the store's lost connection.
_PEER_LOST = re.compile(r"(Connection closed by peer|Connection reset by peer|Broken pipe|ncclRemoteError"
                        r"|remote process exit\w*|failed to recv, got 0 bytes)( \[[^\]\s]*\]:\d+)?")


def peer_lost_line(exc: BaseException) -> str | None:
    """One line for a collective that failed because another process of the run went away,
    or None when ``exc`` is something else.

    In a multi-process run an error on one rank (a full disk, bad data) ends that process;
    the others then meet a closed connection in their next collective, a RuntimeError whose
    traceback said nothing about the cause and read as a bug in minFM. The cause is the
    other process's own line, printed above."""
    if not isinstance(exc, RuntimeError):  # gloo, NCCL and the store raise RuntimeError (DistError)
        return None
    found = _PEER_LOST.search(str(exc))
    if found is None:
        return None
    return (f"lost the connection to another process of this run ({found[0]}): it failed or was stopped "
            "(see its error above); stopping")


def checkpoint_failures(exc: BaseException) -> list[tuple[int, BaseException | str]]:
    """The per-rank errors of torch's ``CheckpointException``, in rank order.

    Its ``failures`` maps each failing rank to an ``(error, traceback summary)`` pair: the
    error is what a message should quote (never the pair, whose repr is a list of frames).
    Torch-free (matched by shape), so the CLI can explain one without importing torch.
    """
    out = []
    for rank, pair in sorted((getattr(exc, "failures", None) or {}).items()):
        out.append((rank, pair[0] if isinstance(pair, tuple) and pair else pair))
    return out


class MinfmError(Exception):
    """A problem with the user's input; printed without a traceback, exit code 2."""

    exit_code = 2


def _one_line(text: str) -> str:
    return str(text).replace("\r", "\\r").replace("\n", "\\n")


class RecipeError(MinfmError):
    """A recipe is malformed: each line of the message names a path in the recipe."""

    def __init__(self, problems: str | list[str], source: str | None = None):
        # one line each: a newline inside a quoted value must not start a line of its own
        self.problems = [_one_line(p) for p in ([problems] if isinstance(problems, str) else problems)]
        self.source = source = _one_line(source) if source else source
        head = f"{source}: " if source and len(self.problems) == 1 else ""
        body = "\n".join(self.problems)
        if source and len(self.problems) > 1:
            body = f"{source}: {len(self.problems)} problems\n" + "\n".join("  " + p for p in self.problems)
        super().__init__(head + body)


class NotCachedError(MinfmError):
    """A source (:class:`minfm_core.protocols.Source`) has no local copy of what it was asked
    for and may not download it (offline); ``minfm cache models`` gathers these into one line."""


class PluginError(MinfmError):
    """A plugin is broken in a way that stops the run (e.g. two plugins claim one name)."""


class UnknownComponentError(MinfmError):
    """A recipe names a component that no installed plugin registers."""


def terminal_safe(text: str, newlines: bool = False) -> str:
    """``text`` with every non-printable character but tabs (and newlines, if ``newlines``)
    escaped (``\\x1b``, ``\\n``): what minfm prints quotes paths and recipe values, which
    may come with a downloaded model, and an ESC sequence in one would drive the terminal
    (set its title, recolour what follows) or a newline forge a line of minfm's own."""
    if text.isprintable():
        return text
    keep = "\n\t" if newlines else "\t"
    return "".join(c if c.isprintable() or c in keep else ascii(c)[1:-1] for c in text)

