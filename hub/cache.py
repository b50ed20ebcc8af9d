"""minFM's downloads into the Hugging Face cache: one at a time per repo, and a failed one
takes back what it added (the snapshot folder of a commit is shared between pulls)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from minfm_core.errors import MinfmError
from minfm_core.safepath import contained, write_text_atomic

from .answers import SHA_RE


def repo_cache_dir(repo_id: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))


def record_ref(repo_cache: Path, revision: str | None, commit: str) -> None:
    """``refs/<revision>`` -> ``commit``, as the client writes when asked for a branch or tag:
    a later offline lookup of the same reference finds the snapshot. minFM passes the sha, so
    the client writes no ref, and this is written only once the download succeeded."""
    revision = revision or "main"
    if SHA_RE.match(revision):
        return
    with contextlib.suppress(OSError, MinfmError):  # a read-only shared cache: offline lookups use what is there
        ref = contained(repo_cache / "refs", revision, what="refs")
        ref.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(ref, commit)


@contextlib.contextmanager
def cache_transaction(repo_id: str):
    """Download into ``repo_id``'s cache folder (yielded) alone, and take back what a failure added.

    minFM downloads of one repo are serialized by a lock file: the snapshot folder of a commit
    is shared, so a failed pull's clean-up would otherwise remove files a concurrent pull just
    brought into it (and that pull would report a folder that is gone)."""
    repo_cache = repo_cache_dir(repo_id)
    with _repo_lock(repo_cache, repo_id):
        before = _entries(repo_cache)
        try:
            yield repo_cache
        except BaseException:
            _remove_new(repo_cache, before)
            raise


@contextlib.contextmanager
def _repo_lock(repo_cache: Path, repo_id: str):
    import fcntl

    lock = repo_cache.parent / ".locks" / f"{repo_cache.name}.minfm.lock"  # beside the client's own locks
    fd = None
    with contextlib.suppress(OSError):  # a read-only cache: nothing is written into it either
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another minFM download of {repo_id} to finish", file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)  # the kernel drops it when its holder dies
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing drops the lock


def _entries(root: Path) -> set[str] | None:
    """Every path under ``root`` (links not followed), relative; None when ``root`` is absent."""
    if not root.is_dir():
        return None
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        out.update(os.path.normpath(os.path.join(rel, n)) for n in dirnames + filenames)
    return out


def _remove_new(repo_cache: Path, before: set[str] | None) -> None:
    """Remove what appeared in the repo's cache folder since ``before``: snapshot links, the
    tree cache, ``.no_exist`` marks, and the new blobs those links point to or that are
    unfinished (another tool may be filling the same cache: its blobs are left alone).
    Links are removed, never followed; folders only once empty."""
    new = sorted((_entries(repo_cache) or set()) - (before or set()), reverse=True)  # children first
    linked = {os.path.basename(os.readlink(repo_cache / rel)) for rel in new if os.path.islink(repo_cache / rel)}
    for rel in new:
        path = repo_cache / rel
        if rel.startswith("blobs" + os.sep) and path.name not in linked and not path.name.endswith(".incomplete"):
            continue
        with contextlib.suppress(OSError):
            path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
    if before is None:
        with contextlib.suppress(OSError):
            repo_cache.rmdir()
