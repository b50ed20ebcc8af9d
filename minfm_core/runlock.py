"""One writer per run directory, workers that die with their launcher, and pre-flight checks.

**The lock.** ``<exp_dir>/.minfm.lock`` is held with ``fcntl.flock`` (exclusive,
non-blocking) for the run's life, and holds JSON ``{pid, host, started}`` naming its
holder. The kernel drops a flock when its holder dies, even by SIGKILL, so a stale file
never blocks a new run. The file is deleted only by its holder, with the folders the run
made for it, when the run wrote nothing else there (:meth:`RunLock.release`); whoever takes
the lock checks afterwards that the path still names the file it locked and starts over if
not, so a deleted lock file is never held by one run while another locks its successor.

Who holds it: the process the user started. ``minfm run`` takes it before anything
else (before spawning workers with ``--nproc-per-node``); its workers then see, through
``MINFM_LAUNCHER_PID``, that their own launcher holds it and do not try to take it again
(that would deadlock against their parent). Under a plain ``torchrun`` (no minFM launcher)
rank 0 takes it in the trainer. Within one process the lock is re-entrant, so a trainer
built twice in a notebook or a test does not lock itself out.

**Orphans.** Workers started by ``--nproc-per-node`` exit when their launcher dies: the
torchrun agent gets a parent-death signal (SIGKILL), each worker sets one too and watches
the launcher's pid, so a SIGKILLed launcher stops all writing within about a second.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
import tomllib
from pathlib import Path

from .errors import MinfmError, first_line
from .jsonio import parse_json
from .safepath import relative_inside, require_folder_room
from .textfiles import read_text

LOCK_NAME = ".minfm.lock"
LAUNCHER_ENV = "MINFM_LAUNCHER_PID"


class RunLock:
    """An acquired run-dir lock (or the launcher's, held on this process's behalf).

    ``created``: the folders :func:`acquire` made for it, deepest first. A run that ends
    having written nothing there (a component that failed to build) removes them again
    on release, rather than leaving an empty run folder behind."""

    def __init__(self, path: Path, fd: int | None, created: tuple[Path, ...] = ()):
        self.path, self.fd, self.count, self.created = path, fd, 1, created

    def release(self) -> None:
        self.count -= 1
        if self.count == 0:
            _held.pop(self.path, None)
            if self.fd is not None:
                if self.created:
                    self._remove_unused()
                os.close(self.fd)  # closing the last descriptor drops the flock
                self.fd = None

    def _remove_unused(self) -> None:
        """Remove the lock file and the folders made for it when nothing else was written
        there. Done while the lock is held; whoever opened the file meanwhile finds, once it
        has the lock, that the path no longer names that file and starts over (:func:`acquire`)."""
        try:
            if os.listdir(self.path.parent) != [LOCK_NAME]:
                return
            os.unlink(self.path)
            for folder in self.created:
                os.rmdir(folder)  # only while empty: another run may have put its lock there since
        except OSError:
            pass  # left as it is: nothing is lost by an empty folder


_held: dict[Path, RunLock] = {}
_held_guard = threading.Lock()


def holder(path: Path) -> dict:
    try:
        data = parse_json(Path(path).read_bytes(), str(path))
        return data if isinstance(data, dict) else {}
    except (OSError, MinfmError):
        return {}  # being written, or not ours: the message then says "unknown"


def prepare_run_dir(exp_dir: Path, *, what: str = "run.exp_dir") -> Path:
    """Create ``exp_dir`` if needed; a file or an uncreatable folder is a MinfmError."""
    exp_dir = Path(exp_dir)
    require_folder_room(exp_dir, what)
    try:
        exp_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a link to nothing above it (or a file made there meanwhile)
        raise MinfmError(f"{what}: cannot create {exp_dir}: something that is not a folder is in the way") from None
    except OSError as exc:
        raise MinfmError(f"{what}: cannot create {exp_dir}: {exc.strerror}") from None
    return exp_dir


def acquire(exp_dir: str | Path, *, what: str = "run.exp_dir") -> RunLock:
    """Lock ``exp_dir`` for this process or raise a MinfmError naming the holder (pid, host).

    ``what`` names the setting that chose the folder (``minfm sample`` locks its ``--out``)."""
    exp_dir = Path(exp_dir)
    with _held_guard:
        held = _held.get(Path(os.path.realpath(exp_dir)) / LOCK_NAME)
        if held is not None:
            held.count += 1
            return held
        # A lock file its holder removed (RunLock._remove_unused) between our open and our
        # flock is not the run's lock any more: open the one now at the path.
        for _ in range(10):
            lock = _lock(exp_dir, what)
            if lock is not None:
                return lock
        raise MinfmError(f"{exp_dir}: its run lock keeps being replaced while minfm takes it; try again")


def _lock(exp_dir: Path, what: str) -> RunLock | None:
    """One attempt of :func:`acquire` (under ``_held_guard``); None when the lock file was
    removed or replaced before it was locked."""
    absolute = Path(os.path.abspath(exp_dir))
    created = tuple(p for p in (absolute, *absolute.parents) if not os.path.lexists(p))
    exp_dir = prepare_run_dir(exp_dir, what=what)
    path = Path(os.path.realpath(exp_dir)) / LOCK_NAME  # the folder resolved, never the lock file itself
    try:
        # O_NOFOLLOW: a symlink planted at the lock path is refused, never written through.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise MinfmError(f"{path}: cannot open the run lock: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device there: not ours to write
        os.close(fd)
        raise MinfmError(f"{path}: the run lock is not a regular file; remove it or choose another {what}")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        info = holder(path)
        launcher = os.environ.get(LAUNCHER_ENV)
        if launcher and str(info.get("pid")) == launcher:
            lock = _held[path] = RunLock(path, None)  # our own launcher holds it for us
            return lock
        raise MinfmError(
            f"{exp_dir}: in use by another run (pid {info.get('pid', 'unknown')} on host "
            f"{info.get('host', 'unknown')}, since {info.get('started', 'unknown')}); "
            f"wait for it to end or choose another {what}"
        ) from None
    if not _same_file(fd, path):
        os.close(fd)
        return None
    # Written in place (not replaced): the lock lives on this inode.
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    lock = _held[path] = RunLock(path, fd, created)
    return lock


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        now = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)


def release(exp_dir: str | Path) -> None:
    path = Path(os.path.realpath(exp_dir)) / LOCK_NAME
    with _held_guard:
        lock = _held.get(path)
        if lock is not None:
            lock.release()


# ---- pre-flight -------------------------------------------------------------------------
def check_writable(folder: Path, *, what: str) -> None:
    """Prove a file can be written in ``folder`` (mode bits alone would not do: root ignores them).

    A folder that does not exist yet is not created: whether it can be is the question for
    the nearest folder above it that exists, which is probed instead (the run dir, once
    :func:`prepare_run_dir` made it); a file on the way (``samples`` for ``samples/step_1``)
    is refused by name.
    """
    folder = Path(folder)
    probe_in = folder
    while not probe_in.is_dir():
        if os.path.lexists(probe_in):  # the file on the way is named (not "... cannot be made")
            require_folder_room(probe_in, what)
        if probe_in.parent == probe_in:
            break
        probe_in = probe_in.parent
    try:
        fd, probe = tempfile.mkstemp(dir=probe_in, prefix=".minfm-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise MinfmError(f"{what}: {probe_in} is not writable: {exc.strerror}") from None


def check_file_writable(path: Path, *, what: str) -> None:
    """A file the run will write: its folder takes a file, and one already there is a regular
    file that opens for writing (a read-only ``metrics.jsonl`` failed at the first log line,
    after steps)."""
    path = Path(path)
    check_writable(path.parent, what=what)
    if not os.path.lexists(path):
        return
    try:
        info = os.stat(path)
    except OSError as exc:  # a dangling link: the write would follow it
        raise MinfmError(f"{what}: {path} cannot be written: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):  # a folder, FIFO or device (opening a FIFO would block)
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise MinfmError(f"{what}: {path} is {kind}; the run writes a file there")
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC))  # nothing written
    except OSError as exc:
        raise MinfmError(f"{what}: {path} is not writable: {exc.strerror}") from None


def checkpoint_bytes(param_bytes: int, margin: float = 1.25) -> int:
    """Estimated size of one checkpoint: model + EMA + AdamW's two moments, with a margin."""
    return int(param_bytes * 4 * margin)


def check_room(folder: Path, need: int, *, what: str = "run.exp_dir") -> None:
    free = shutil.disk_usage(folder).free
    if free < need:
        raise MinfmError(f"{what}: {folder} has {_gb(free)} free; a checkpoint needs about {_gb(need)} "
                         "(model, EMA and optimizer state)")


def preflight(exp_dir: Path, ckpt_dir: Path, param_bytes=None, outputs=()) -> None:
    """Writable run and checkpoint folders, every other place the run writes (``outputs``,
    see :func:`run_outputs`) and room for one checkpoint, before any work.

    ``param_bytes`` is a callable (it may build the model on the meta device), asked only
    once the cheap checks have passed; None or a None result skips the room estimate.
    """
    check_writable(exp_dir, what="run.exp_dir")
    check_writable(ckpt_dir, what="checkpoints")
    check_run_record(exp_dir / "recipe.toml")
    for path, folder, what in outputs:
        if folder:
            check_writable(path, what=what)
        else:
            check_file_writable(path, what=what)
    n = param_bytes() if param_bytes is not None else None
    if n:
        check_room(ckpt_dir if ckpt_dir.is_dir() else exp_dir, checkpoint_bytes(n))


#: A run's recorded recipe is a few KB; anything far larger there is not one.
MAX_RECORD_BYTES = 1 << 20


def check_run_record(path: Path) -> None:
    """``path``, a run folder's ``recipe.toml``, is the run's record, rewritten at every start:
    refuse one a person wrote (comments, ``extends``: a recorded recipe is resolved and has
    neither), which the start would replace. A folder holding its own hand-written recipe
    (``exp_dir = "."``) lost it, with every comment, to the resolved dump."""
    if path.is_symlink() or not path.is_file():
        return  # none yet (a folder there is check_file_writable's to refuse); a link is replaced, its target kept
    why = None
    try:
        text = read_text(path, str(path), MAX_RECORD_BYTES)
        if any(line.lstrip().startswith("#") for line in text.splitlines()):
            why = "it has comments"
        elif "extends" in tomllib.loads(text):
            why = "it extends another recipe"
    except (MinfmError, OSError, tomllib.TOMLDecodeError, RecursionError) as exc:
        # garbage or cut short: a damaged record (a crash, a full disk), or someone's other file
        raise MinfmError(f"run.exp_dir: {path} is no recipe minfm can read ({first_line(exc, 120)}); a run records "
                         "its resolved recipe there at every start: if it is this run's damaged record, remove "
                         "it (each checkpoint keeps its own recipe.toml), else keep it outside run.exp_dir or "
                         "choose another run.exp_dir") from None
    if why is not None:
        raise MinfmError(f"run.exp_dir: {path} looks written by hand ({why}); a run records its resolved "
                         "recipe there at every start, which would replace it: keep the recipe outside "
                         "run.exp_dir, or choose another run.exp_dir")


#: What the core writes in a run folder (the loggers add theirs, each config's ``run_outputs``):
#: names a logger's own folder must not take (plugins/loggers/configs.py). A trailing "/" marks
#: a folder.
RUN_DIR_NAMES = (LOCK_NAME, "recipe.toml", "checkpoints/", "samples/", "samples_cli/", "profile/", "latents/")


def run_outputs(resolved, job: str = "train") -> list[tuple[Path, bool, str]]:
    """Where a ``job`` run of ``resolved`` writes in its run folder, as (path, is a folder,
    the setting that sends it there), for :func:`preflight`. A logger lists its own files
    through its config's ``run_outputs`` (protocols.RunOutputsConfig: relative paths, a trailing "/" for a folder); one
    without it is not probed."""
    if job != "train":
        return []
    exp = Path(resolved.recipe.run.exp_dir)
    train = resolved.recipe.train
    out = [(exp / "recipe.toml", False, "run.exp_dir")]
    if train.sample_every or train.sample_at_start:
        out.append((exp / "samples", True, "train.sample_every (galleries)"))
    if train.profile_steps:
        out.append((exp / "profile", True, "train.profile_steps"))
    for path, slot in resolved.slots.items():
        if not path.startswith("logging.loggers"):
            continue
        names = getattr(slot.config, "run_outputs", ())
        what = f"{path} ({slot.component.name})"
        if not isinstance(names, (tuple, list)):
            raise MinfmError(f"{what}: run_outputs: expected a tuple of names in the run folder, "
                             f"got {type(names).__name__}")
        for name in names:
            # A plugin's names: an absolute or ../ one would be probed (written) outside the run folder.
            place = relative_inside(exp, name, what=f"{what}: run_outputs")
            out.append((place, name.endswith("/"), what))
    return out


def hold_run_dir(exp_dir: Path, ckpt_dir: Path, param_bytes=None, outputs=(), tidy=None) -> RunLock | None:
    """The trainer's start: rank 0 locks ``exp_dir``, calls ``tidy()`` (what only the lock's holder
    may remove) and runs :func:`preflight`.

    Its verdict is broadcast, so with several ranks every one of them stops with the same
    one-line error instead of waiting for rank 0 in a collective. Returns the lock on
    rank 0, None elsewhere.
    """
    import torch.distributed as dist

    many = dist.is_initialized() and dist.get_world_size() > 1
    lock, error = None, None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            lock = acquire(exp_dir)
            if tidy is not None:
                tidy()
            preflight(exp_dir, ckpt_dir, param_bytes, outputs)
        except MinfmError as exc:
            if lock is not None:
                lock.release()
            error = str(exc)
    if many:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise MinfmError(error)
    return lock


def denoiser_param_bytes(resolved) -> int | None:
    """Bytes of the denoiser's parameters, counted on the meta device (no memory, no weights)."""
    import torch

    try:
        with torch.device("meta"):
            model = resolved["model.denoiser"].build(load_weights=False)
    except Exception:  # noqa: BLE001  a plugin that cannot build on meta: no estimate, no veto
        return None
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# ---- orphans ------------------------------------------------------------------------------
PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent (thread) dies; False elsewhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def launcher_child_setup() -> None:
    """``preexec_fn`` of the torchrun agent: it dies with the launcher."""
    parent = os.getppid()
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:  # the launcher died before prctl took effect
        os._exit(1)


def die_with_launcher() -> None:
    """In a worker started by ``--nproc-per-node``: exit (SIGKILL) as soon as the launcher is gone.

    Two guards: a parent-death signal for the torchrun agent (our parent), and a thread
    waiting on the launcher itself (a pidfd, no pid-reuse race; polling where there is none).
    Kill is safe here: checkpoints and images are only ever renamed into place complete.
    """
    pid = launcher_pid()
    parent = os.getppid()
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent or not _alive(pid):
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=_watch, args=(pid,), name="minfm-launcher-watch", daemon=True).start()


#: Process ids go up to 2**22 on Linux (PID_MAX_LIMIT); os.kill overflows beyond a C int.
MAX_PID = 1 << 22


def launcher_pid() -> int:
    """``MINFM_LAUNCHER_PID``: the pid minfm's launcher leaves for its workers, checked."""
    raw = os.environ[LAUNCHER_ENV].strip()
    # minfm's launcher writes a pid; anything else came from elsewhere
    if not (raw.isascii() and raw.isdigit()):
        raise MinfmError(f"{LAUNCHER_ENV}={raw!r} (environment): minfm's launcher sets it to its pid for its workers; "
                         "unset it")
    if len(raw.lstrip("0")) > len(str(MAX_PID)) or not 1 <= int(raw) <= MAX_PID:  # (int() of 5,000 digits raises)
        raise MinfmError(f"{LAUNCHER_ENV}={raw!r} (environment): expected a process id from 1 to {MAX_PID} "
                         "(minfm's launcher sets it to its pid for its workers); unset it")
    return int(raw)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watch(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        pass  # already gone
    except (AttributeError, OSError):  # no pidfds here (old kernel, not Linux): poll
        while _alive(pid):
            time.sleep(0.5)
    else:
        select.select([fd], [], [])  # readable once the process has exited
    os.kill(os.getpid(), signal.SIGKILL)
