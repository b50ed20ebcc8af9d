"""Checkpoints: torch.distributed.checkpoint (DCP) directories, atomic, asynchronous, verified.

Layout of a run directory::

    <exp_dir>/recipe.toml
    <exp_dir>/checkpoints/step_00001000/   # complete: manifest.json + DCP shards + per-rank extras
    <exp_dir>/checkpoints/.tmp-step_00002000/   # being written; never taken as complete

A save is written under ``.tmp-<name>`` and renamed by rank 0 only once DCP's coordinator
has written ``manifest.json`` (after every rank's data is on disk), so a crash or SIGKILL
at any moment leaves every ``step_*`` directory complete. Per-rank state (the trainer's
RNG, the data position) goes to ``rank_<r>.safetensors`` beside the DCP files. Every file,
the folder's entries and its new name are synced to the disk before ``keep_last`` prunes an
older checkpoint, so a power cut never leaves the newest unverifiable and its predecessor gone.
A rank that cannot write stops every rank with its line (:func:`barrier`).

The format (``checkpoint_format``) holds no pickle: tensors are safetensors, the rest JSON,
and the manifest lists every file with its size and CRC-32. Opening a checkpoint verifies
it; resuming takes the newest checkpoint that verifies and names those it skipped. A
checkpoint without a manifest (an older minFM's, another tool's) carries DCP's pickled
``.metadata``: it is opened only on the user's explicit word (``allow_pickle``), and never
when it came from a Hub repo.

The same format serves one process and many: DCP reshards on load, so a run saved
with 2 processes resumes with 1 or 4.

Reading a live run: ``keep_last`` pruning must not delete a checkpoint that ``minfm sample``,
``export``, ``hub push`` or the demo is reading. A reader holds a shared ``flock`` on the
checkpoint's directory while it reads (:func:`held`); the pruner deletes a directory only
when it gets the exclusive lock at once, and otherwise leaves it to the next save.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from .checkpoint_format import MANIFEST, CheckpointError, Manifest, ManifestReader, ManifestWriter
from .checkpoint_format import read_manifest, split_state, verify
from .errors import MinfmError, checkpoint_failures, first_line, os_error_line, peer_lost_line
from .safepath import came_from_outside, is_inside, recipe_root, write_text_atomic

CKPT_DIR = "checkpoints"
HUB_STATE_DIR = "checkpoint"  # the DCP training state inside an exported (Hub) folder
LEGACY_METADATA = ".metadata"  # DCP's pickled metadata: only in checkpoints of older minFMs / other tools
PICKLE_OPT_IN = "--allow-pickle-checkpoint (train.allow_pickle_checkpoint = true)"
# Eight digits, more only past step 99,999,999 (train.max_steps goes to 1e9); never a second
# spelling of a step (step_000000002).
_STEP_DIR = re.compile(r"^step_(\d{8}|[1-9]\d{8,})\Z")


def _by_step(paths) -> list[Path]:
    """``step_*`` folders in step order (by name, step_100000000 came before step_99999999)."""
    return sorted(paths, key=lambda p: int(p.name[5:]))


def step_dir(step: int) -> str:
    return f"step_{step:08d}"


def run_folder(path: Path) -> Path | None:
    """The run folder of a checkpoint ``<run>/checkpoints/step_N``; None for any other path."""
    path = Path(path)
    if _STEP_DIR.match(path.name) and path.parent.name == CKPT_DIR:
        return path.parent.parent
    return None


def refuse_inside_checkpoint(out: Path, flag: str, what: str) -> None:
    """Refuse an output folder ``out`` (given as ``flag``) inside a run's checkpoint
    (``<run>/checkpoints/step_N``, any of them): the run's ``keep_last`` deletes old
    checkpoints whole, and ``what`` was written there (samples, an export) would go with it.
    A checkpoint outside a run (a copied ``step_N``) is pruned by nothing."""
    real = Path(os.path.realpath(out))
    for folder in (real, *real.parents):
        if run_folder(folder) is not None:
            raise MinfmError(f"{flag} {out}: lies inside the checkpoint {folder}, which its run's keep_last may "
                             f"delete with the {what}; choose another {flag}")


def _has_index(path: Path) -> bool:
    return (path / MANIFEST).is_file() or (path / LEGACY_METADATA).is_file()


def is_complete(path: Path) -> bool:
    return bool(_STEP_DIR.match(path.name)) and _has_index(path)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root`` (a run dir or its checkpoints/ dir), oldest first.

    Complete means renamed into place; whether its files are intact is :func:`open_checkpoint`'s
    question."""
    root = Path(root)
    ckpts = root / CKPT_DIR if (root / CKPT_DIR).is_dir() else root
    if not ckpts.is_dir():
        return []
    return _by_step(p for p in ckpts.iterdir() if p.is_dir() and not p.is_symlink() and is_complete(p))


def find_checkpoint(src: Path, also: str = "") -> Path:
    """A complete checkpoint directory for a checkpoint dir or a run dir (its latest).
    ``also``: what else the caller would have taken, for the error when there is none."""
    src = Path(src)
    if _has_index(src):
        return src
    if _has_index(src / HUB_STATE_DIR):  # a Hub folder pushed with its training state
        return src / HUB_STATE_DIR
    found = list_checkpoints(src)
    if not found:
        raise MinfmError(f"{src}: no complete checkpoint found (expected {CKPT_DIR}/step_NNNNNNNN/ with a {MANIFEST})"
                         f"{also}")
    return found[-1]


def _lock_dir(path: Path, how: int) -> int | None:
    """A descriptor of directory ``path`` holding ``flock(how)``; None when the directory is
    gone (or, for a non-blocking lock, when someone else holds it). A filesystem without
    locks gives an unlocked descriptor: readers and the pruner then behave as without this."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, how)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:  # ENOLCK, EOPNOTSUPP: no locks on this filesystem
        pass
    return fd


@contextlib.contextmanager
def held(src: Path, also: str = "") -> Iterator[Path]:
    """:func:`find_checkpoint`'s answer, kept from ``keep_last`` pruning while the block reads it.

    The newest checkpoint of a live run can be pruned between finding it and locking it: then
    the next newest is taken, a few times at most."""
    for _ in range(5):
        path = find_checkpoint(src, also)
        fd = _lock_dir(path, fcntl.LOCK_SH)
        if fd is not None and not _has_index(path):  # deleted between the open and the lock
            os.close(fd)
            fd = None
        if fd is None:
            continue
        try:
            yield path
        finally:
            os.close(fd)
        return
    raise MinfmError(f"{src}: its checkpoints were deleted while minfm tried to open one (keep_last pruning "
                     "by a live run?); try again")


class Checkpoint:
    """An opened checkpoint: its manifest verified, or (``manifest is None``) a legacy
    pickle-metadata checkpoint the user chose to trust."""

    def __init__(self, path: Path, manifest: Manifest | None):
        self.path = path
        self.manifest = manifest

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r})"

    @functools.cached_property
    def _legacy_names(self) -> frozenset[str]:
        # A legacy checkpoint's .metadata is a pickle (the user chose to trust it): read it once.
        return frozenset(dcp.FileSystemReader(str(self.path)).read_metadata().state_dict_metadata)

    def tensor_names(self) -> set[str]:
        """The flat names (``model.x.weight``) of the tensors it holds (a legacy checkpoint's
        metadata does not tell tensors from other saved objects: all of its names)."""
        return set(self.manifest.tensors) if self.manifest is not None else set(self._legacy_names)

    def parts(self) -> set[str]:
        if self.manifest is not None:
            return self.manifest.parts()
        return {k.split(".", 1)[0] for k in self._legacy_names}

    def has_part(self, part: str) -> bool:
        return part in self.parts()

    @property
    def world_size(self) -> int:
        if self.manifest is not None and self.manifest.world_size:
            return self.manifest.world_size
        return len(list(self.path.glob("rank_*.safetensors")))

    def load(self, state: dict[str, Any]) -> None:
        """Load into ``state`` in place (keys absent from ``state`` are not read)."""
        no_dist = not (dist.is_available() and dist.is_initialized())
        with warnings.catch_warnings():
            if no_dist:  # hub export, notebooks: one process by design; DCP warns about it even when told
                warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            try:
                if self.manifest is None:
                    dcp.load(state, storage_reader=dcp.FileSystemReader(str(self.path)), no_dist=no_dist)
                    return
                tensors, _ = split_state(state)
                dcp.load(tensors, storage_reader=ManifestReader(self.manifest), no_dist=no_dist)
            except CheckpointException as exc:  # a BaseException: would escape `except Exception`
                raise _explain(self.path, exc) from None
            except (RuntimeError, ValueError, KeyError) as exc:
                if peer_lost_line(exc) is not None:  # another rank died mid-load: no fault of this checkpoint's
                    raise
                raise CheckpointError(f"{self.path}: does not fit: {str(exc)[:300]}") from None
        self.manifest.set_objects(state)

    def rank_extras(self, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """This rank's RNG and data position (``rank_<r>.safetensors``), or None if not saved."""
        from .weights import open_safetensors

        name = f"rank_{rank}.safetensors"
        if self.manifest is not None and name not in self.manifest.files:
            return None
        path = self.path / name
        if not path.is_file():
            return None
        try:
            with open_safetensors(path) as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except MinfmError as exc:
            raise CheckpointError(str(exc)) from None


def _explain(path: Path, exc: CheckpointException) -> MinfmError:
    """One MinfmError for DCP's per-rank failure map (ours passes through unchanged)."""
    failures = [e for _, e in checkpoint_failures(exc)]
    for f in failures:
        if isinstance(f, MinfmError):
            return f
    first = failures[0] if failures else exc
    if isinstance(first, OSError):
        return CheckpointError(f"{path}: {os_error_line(first)}")
    return CheckpointError(f"{path}: does not fit: {first_line(first)}")


def open_checkpoint(path: Path, *, allow_pickle: bool = False, verify_files: bool = True) -> Checkpoint:
    """Open and verify the checkpoint at ``path`` (a ``step_*`` or Hub ``checkpoint/`` dir).

    Raises CheckpointError if its manifest is missing or malformed, a file is missing,
    truncated or fails its checksum; or if it is a legacy pickle checkpoint and
    ``allow_pickle`` is not set (or it came from outside: then never).
    """
    path = Path(path)
    try:
        stat = (path / MANIFEST).stat()
    except OSError:
        stat = None
    if stat is not None:
        return _open_verified(path, stat.st_mtime_ns, stat.st_size, verify_files)
    if not (path / LEGACY_METADATA).is_file():
        raise CheckpointError(f"{path}: not a checkpoint (no {MANIFEST})")
    if came_from_outside(path):
        raise CheckpointError(f"{path}: a downloaded checkpoint without {MANIFEST}: its DCP .metadata is a pickle, "
                              "which can run code; minFM never loads one from a Hub repo")
    if not allow_pickle:
        raise CheckpointError(f"{path}: written without {MANIFEST} (by an older minFM or another tool): its DCP "
                              f".metadata is a pickle, which can run code when loaded; if you trust where it came "
                              f"from, pass {PICKLE_OPT_IN}")
    return Checkpoint(path, None)


@functools.lru_cache(maxsize=8)
def _open_verified(path: Path, mtime_ns: int, size: int, verify_files: bool) -> Checkpoint:
    """Verified once per manifest version: a resume opens the checkpoint for every part."""
    manifest = read_manifest(path)
    if verify_files:
        verify(manifest)
    return Checkpoint(path, manifest)


def resume_point(root: Path, *, allow_pickle: bool = False) -> tuple[Checkpoint | None, list[tuple[Path, str]]]:
    """The newest checkpoint under ``root`` that verifies, and the newer ones skipped (path, why).

    In a process group rank 0 decides and every rank gets the same answer."""
    found: Path | None = None
    skipped: list[tuple[Path, str]] = []
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        ckpts = Path(root) / CKPT_DIR
        # Every step_* folder, complete or not: one without its manifest is skipped by name.
        cands = _by_step(p for p in ckpts.iterdir() if _STEP_DIR.match(p.name)) if ckpts.is_dir() else []
        for cand in reversed(cands):
            try:
                if cand.is_symlink():  # list_checkpoints and pruning never follow one either
                    raise CheckpointError(f"{cand}: is a symlink, not a checkpoint folder of this run")
                opened = open_checkpoint(cand, allow_pickle=allow_pickle)
                step = opened.manifest.step if opened.manifest is not None else None
                if step is not None and step != int(cand.name[5:]):  # renamed: it would resume elsewhere
                    raise CheckpointError(f"{cand}: holds step {step}, not the step its name says")
            except CheckpointError as exc:
                skipped.append((cand, str(exc)))
                continue
            found = cand
            break
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [(found, skipped)]
        dist.broadcast_object_list(box, src=0)  # our own objects, between our own ranks
        found, skipped = box[0]
    if found is None:
        return None, skipped
    return open_checkpoint(found, allow_pickle=allow_pickle, verify_files=rank0), skipped


def remove_partial_saves(root: Path) -> None:
    """Remove every ``.tmp-step_*`` in ``root``: each was left by a crash or a failed save, a
    checkpoint's worth of disk, never complete. Only under the run lock (no other writer)."""
    for stale in root.glob(".tmp-step_*") if root.is_dir() else ():
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)
        else:
            stale.unlink()


class Checkpointer:
    """Saves app state asynchronously and atomically; prunes to ``keep_last``."""

    def __init__(self, exp_dir: str | Path, *, keep_last: int = 0, async_save: bool = True, recipe_text: str | None = None):
        self.root = Path(exp_dir) / CKPT_DIR
        self.keep_last = keep_last
        self.async_save = async_save
        self.recipe_text = recipe_text
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.keep: set[Path] = set()  # checkpoints that failed verification: evidence, never pruned
        self._pending: tuple[Any, Path, Path] | None = None
        # A save that failed to finish here (poll, many processes), not yet raised: rank 0 alone
        # renames and prunes, so raising at once would leave its peers only a lost connection.
        self.failure: str | None = None
        # Async saves run collectives from a background thread: give them their own group.
        self._group = dist.new_group(backend="gloo") if dist.is_initialized() else None

    def save(self, step: int, state: dict[str, Any], extras: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        from .weights import save_safetensors_file

        self.finish()
        final = self.root / step_dir(step)
        tmp = self.root / f".tmp-{final.name}"
        tensors, objects = split_state(state)
        writer = ManifestWriter(tmp, objects, {"step": step, "world_size": self.world_size})
        # Each rank's own steps end in a barrier that also agrees on failure: a rank that
        # cannot write stops every rank there with its one line, where the others used to go
        # on into DCP's collectives and meet a closed connection (a gloo traceback).
        failed = None
        if self.rank == 0:
            try:
                remove_partial_saves(self.root)  # (the last save is done: finish() above)
                tmp.mkdir(parents=True)
                if self.recipe_text is not None:
                    write_text_atomic(tmp / "recipe.toml", self.recipe_text)
            except OSError as exc:
                failed = str(_write_failed(tmp, exc.strerror or str(exc)))
        barrier(failed)
        rank_file = tmp / f"rank_{self.rank}.safetensors"
        try:
            # synced, as DCP syncs its own files (sync_files), with the umask's permissions
            save_safetensors_file({k: v.contiguous().cpu() for k, v in extras.items()}, rank_file, metadata=meta)
        except OSError as exc:
            failed = str(_write_failed(tmp, f"{rank_file.name}: {exc.strerror or exc}"))
        barrier(failed)
        try:
            if self.async_save:
                fut = dcp.async_save(tensors, storage_writer=writer, process_group=self._group)
            else:
                dcp.save(tensors, storage_writer=writer, process_group=self._group)
                fut = None
        except CheckpointException as exc:
            raise _save_error(tmp, exc) from None
        except OSError as exc:
            raise _write_failed(tmp, exc.strerror or str(exc)) from None
        self._pending = (fut, tmp, final)
        if fut is None:
            self.wait()

    def poll(self) -> None:
        """Finish a pending save if it is done (cheap; call every step). With many processes a
        failure is kept in :attr:`failure` for :meth:`finish` to raise on every rank."""
        if self._pending is not None and (self._pending[0] is None or self._pending[0].done()):
            try:
                self.wait()
            except MinfmError as exc:
                if self.world_size == 1:
                    raise
                self.failure = self.failure or str(exc)

    def finish(self) -> None:
        """Collective (every rank calls it): finish the pending save; if it failed to finish
        on any rank, now or in an earlier :meth:`poll`, every rank raises the first one's line."""
        failed, self.failure = self.failure, None
        try:
            self.wait()
        except MinfmError as exc:
            if self.world_size == 1:
                raise
            failed = failed or str(exc)
        barrier(failed)

    def wait(self) -> None:
        if self._pending is None:
            return
        fut, tmp, final = self._pending
        self._pending = None
        try:
            if fut is not None:
                fut.result()
            if self.rank == 0:
                if final.exists():  # a re-save of this step (resumed behind it): keep the old one aside
                    n = 1
                    while final.with_name(f"{final.name}.superseded-{n}").exists():
                        n += 1
                    final.rename(final.with_name(f"{final.name}.superseded-{n}"))
                    self.keep.discard(final)  # the name now holds the new checkpoint
                # Durable before anything older goes: the folder's entries (every rank's files,
                # the manifest) and then its new name reach the disk, so a power cut after a
                # prune never leaves the newest checkpoint unverifiable and its predecessor gone.
                fsync_path(tmp)
                tmp.rename(final)  # the atomic step: from here on it is complete
                fsync_path(self.root)
                self._prune()
        except CheckpointException as exc:
            raise _save_error(tmp, exc) from None
        except OSError as exc:
            raise _write_failed(tmp, exc.strerror or str(exc)) from None

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        # Checkpoints that failed verification are kept and not counted: a corrupt newer one
        # must not push the one just written (or the last good one) out of the keep_last.
        good = [p for p in list_checkpoints(self.root) if p not in self.keep]
        for old in good[: -self.keep_last]:
            fd = _lock_dir(old, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if fd is None:  # a reader (sample, export, push, the demo) holds it: the next save prunes it
                continue
            try:
                shutil.rmtree(old, ignore_errors=True)
            finally:
                os.close(fd)


def _save_error(tmp: Path, exc: CheckpointException) -> MinfmError:
    """A failed save (a full disk, a read-only folder) as one line; nothing complete is touched.
    DCP's coordinator reports every rank's write failure as its own: the line names the rank
    that failed (a full disk on rank 1's node read "rank 0: ... No space left")."""
    failures = checkpoint_failures(exc)
    rank, first = failures[0] if failures else (None, exc)
    why = os_error_line(first) if isinstance(first, OSError) else first_line(first)
    many = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return _write_failed(tmp, f"on rank {rank}: {why}" if many and rank is not None else why)


def _write_failed(tmp: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{tmp}: cannot write checkpoint: {why} (the previous checkpoints are intact)")


def barrier(failed: str | None = None) -> None:
    """Wait for every rank, and agree on failure: each rank passes the one-line error it met
    since the last collective (None: none), and if any rank met one, every rank raises the
    first failed rank's as ``rank R: <error>`` (one process: its own, as it is).

    A failure on one rank alone otherwise reached the others as a closed connection in their
    next collective (a gloo traceback) instead of its reason."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, failed)  # our own strings, between our own ranks
        failed = next((f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None), None)
    if failed is not None:
        raise MinfmError(failed)


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk (a rename is durable only once
    the folder holding it is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recipe_for(src: Path) -> Path:
    """The recipe.toml that belongs to a checkpoint or run directory."""
    src = Path(src)
    # beside a checkpoint: its own, else its run's (run/checkpoints/step_N) or Hub folder's
    # (folder/checkpoint); a downloaded checkpoint never takes one from outside the download
    owner = run_folder(src) or src.parent
    downloaded = came_from_outside(src)
    for cand in (src / "recipe.toml", owner / "recipe.toml"):
        if cand.is_file() and (not downloaded or came_from_outside(cand.parent)):
            return cand
    raise MinfmError(f"{src}: no recipe.toml found beside this checkpoint or run")


def refuse_unexpected(ckpt: Checkpoint, source: str, wanted: set[str]) -> None:
    """A CheckpointError where ``ckpt``'s ``source`` part (``model``, ``ema``) holds weights
    that are not in ``wanted`` (the model's names). DCP reads only the keys asked for: weights
    the checkpoint holds and the model lacks (a block a recipe override removed) were dropped
    in silence, where an exported folder refuses them (weights.check_keys). The checkpoint's
    own tensor list says what it holds."""
    from .weights import first_names

    prefix = f"{source}."
    unexpected = {k[len(prefix):] for k in ckpt.tensor_names() if k.startswith(prefix)} - wanted
    if unexpected:
        raise CheckpointError(f"{ckpt.path} ({source} weights): weights do not fit the model: "
                              f"unexpected keys: {first_names(unexpected)}")


def load_weights(ckpt: Checkpoint | Path, model: torch.nn.Module, *, source: str = "model") -> None:
    """Load the ``model`` or ``ema`` weights of a checkpoint (opened, or a path to open and
    verify) into an (unsharded) module."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from .weights import check_finite

    if not isinstance(ckpt, Checkpoint):
        ckpt = open_checkpoint(ckpt)

    sd = get_model_state_dict(model)
    wanted = {n for n, p in model.named_parameters() if p.requires_grad} if source == "ema" else set(sd)
    refuse_unexpected(ckpt, source, wanted)
    if source == "ema":
        box = {"ema": {k: v for k, v in sd.items() if k in wanted}}
        ckpt.load(box)
        sd.update(box["ema"])
    else:
        box = {"model": sd}
        ckpt.load(box)
        sd = box["model"]
    check_finite(sd, f"{ckpt.path} ({source} weights)")
    set_model_state_dict(model, sd)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


def build_denoiser(recipe_path: Path) -> torch.nn.Module:
    """The denoiser of a checkpoint's recipe on CPU with uninitialised storage (weights come
    from the checkpoint). A recipe that was downloaded with it is read as untrusted data."""
    from .recipe import ONE_PROCESS, load_recipe

    resolved = load_recipe(recipe_path, list(ONE_PROCESS), untrusted_root=recipe_root(recipe_path), recorded=True)
    with torch.device("meta"):
        model = resolved["model.denoiser"].build(load_weights=False)
    return model.to_empty(device="cpu")


def _copy_regular(src: Path, dst: Path, root: Path) -> bool:
    """Copy ``src`` if it is a file; a symlink is followed only where it stays inside ``root``
    (the HF cache's snapshot->blob links do), never out of it."""
    if not src.is_file():
        return False
    if src.is_symlink() and not is_inside(src, root):
        raise MinfmError(f"{src}: refusing to export a symlink that leads outside {root}")
    shutil.copyfile(src, dst)
    return True


def _export_recipe(src: Path, dst: Path) -> None:
    """The run's recipe, but an absolute (or ``..``) ``run.exp_dir`` becomes
    ``experiments/<its name>``: published, it told everyone the trainer's folders
    (``/home/<user>/...``), and a recipe from outside may not choose such a folder anyway."""
    import tomli_w

    from .recipe.load import MAX_RECIPE_BYTES
    from .recipe.toml import tomllib
    from .textfiles import read_bounded

    if src.is_symlink() and not is_inside(src, src.parent):
        raise MinfmError(f"{src}: refusing to export a symlink that leads outside {src.parent}")
    text = read_bounded(src, str(src), MAX_RECIPE_BYTES).decode("utf-8", errors="replace")
    try:
        recipe = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError):
        recipe = None  # not ours to mend: the card's reader refuses it, naming the file
    run = recipe.get("run") if isinstance(recipe, dict) else None
    exp_dir = run.get("exp_dir") if isinstance(run, dict) else None
    if isinstance(exp_dir, str) and (os.path.isabs(exp_dir) or exp_dir.startswith("~") or ".." in Path(exp_dir).parts):
        run["exp_dir"] = f"experiments/{Path(exp_dir).name or 'run'}"
        text = tomli_w.dumps(recipe)
    write_text_atomic(dst, text)


def _copy_metrics(src: Path, dst: Path, root: Path, step: int) -> None:
    """``metrics.jsonl`` up to ``step``: a record of a later step is left out (a line that is
    not a record with a step, e.g. one cut short by a crash, stays as it was)."""
    if not src.is_file():
        return
    if src.is_symlink() and not is_inside(src, root):
        raise MinfmError(f"{src}: refusing to export a symlink that leads outside {root}")
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for line in fin:
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                record = None
            later = isinstance(record, dict) and type(record.get("step")) is int and record["step"] > step
            if not later:
                fout.write(line)


def export_for_hub(src: Path, out_dir: Path, *, include_training_state: bool = False, allow_pickle: bool = False) -> Path:
    """Write a Hub folder from a run or checkpoint directory.

    ``model.safetensors`` (and ``ema.safetensors`` when the run keeps an EMA) consolidated
    from the (possibly sharded) DCP checkpoint, ``recipe.toml``, and when the run has them
    ``metrics.jsonl`` up to the checkpoint's step and the newest sample grid of a step no
    later than it as ``samples.png``; with
    ``include_training_state`` the DCP checkpoint itself under ``checkpoint/``.
    """
    with held(Path(src)) as path:
        return _export_checkpoint(path, out_dir, include_training_state, allow_pickle)


def _export_checkpoint(path: Path, out_dir: Path, include_training_state: bool, allow_pickle: bool) -> Path:
    from .weights import save_safetensors_file

    ckpt = open_checkpoint(path, allow_pickle=allow_pickle)
    if include_training_state and ckpt.manifest is None:  # its .metadata and data files are pickles
        raise MinfmError(f"{path}: a legacy checkpoint's training state is pickled and is never exported; "
                         "export without the training state (its weights are converted), or resume the run "
                         "once to write a checkpoint in minFM's format")
    recipe = recipe_for(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_denoiser(recipe)
    load_weights(ckpt, model, source="model")
    # One metadata key only: safetensors writes its metadata map in no fixed order, and a
    # re-export must give identical bytes (the Hub push then uploads nothing).
    save_safetensors_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors",
                          metadata={"format": "pt"})
    if ckpt.has_part("ema"):
        load_weights(ckpt, model, source="ema")
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        ema = {k: v.contiguous() for k, v in model.state_dict().items() if k in trainable}
        save_safetensors_file(ema, out / "ema.safetensors", metadata={"format": "pt"})
    _export_recipe(recipe, out / "recipe.toml")
    run_dir = run_folder(path)
    step = ckpt.manifest.step if ckpt.manifest is not None and ckpt.manifest.step is not None else None
    if step is None and run_dir is not None:
        step = int(path.name[5:])
    if run_dir is not None and step is not None:
        # What the run had by this checkpoint's step: pushed while training went on, or an
        # older checkpoint, its card showed the later steps' metrics and gallery.
        _copy_metrics(run_dir / "metrics.jsonl", out / "metrics.jsonl", run_dir, step)
        for kind in ("ema", "raw"):
            grids = [g for g in _by_step(p.parent for p in (run_dir / "samples").glob(f"step_*/{kind}.png")
                                         if _STEP_DIR.match(p.parent.name)) if int(g.name[5:]) <= step]
            if grids:
                _copy_regular(grids[-1] / f"{kind}.png", out / "samples.png", run_dir)
                break
    if include_training_state:
        dest = out / HUB_STATE_DIR
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir()
        # Exactly the verified files (and the manifest): nothing else in the folder travels.
        for name in [*ckpt.manifest.files, MANIFEST]:
            _copy_regular(path / name, dest / name, path)
    return out
