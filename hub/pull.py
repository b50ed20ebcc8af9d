"""Download a minFM repo from the Hub: ``minfm hub pull`` and the ``hf://`` source resolver.

Only safe formats are downloaded (safetensors, JSON/TOML/text, images); a repo that holds
a pickle-format file (``*.bin``, ``*.pt``, ...) is refused outright. The commit that was
actually downloaded is recorded in ``minfm_source.json`` next to the files (and is
readable with :func:`source_info`), so a run can say exactly which weights it used.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path

from minfm_core.errors import MinfmError, first_line
from minfm_core.jsonio import parse_json
from minfm_core.safepath import contained, fresh_dir, is_inside, require_folder_room, write_text_atomic

from .answers import (
    SHA_RE,
    check_name,
    check_names,
    checked_answers,
    checked_commit,
    download_budget,
    short_name,
)
from .cache import cache_transaction, record_ref
from .errors import hub_errors, scrub, translate
from .uri import HubRef, parse_ref

#: Files a pull downloads (fnmatch patterns, ``*`` crosses folders).
SAFE_PATTERNS = ("*.safetensors", "*.json", "*.jsonl", "*.toml", "*.md", "*.png", "*.jpg", "*.jpeg", "*.txt")
#: The training state (a torch.distributed.checkpoint folder): only on request, it can be large.
TRAINING_STATE_PATTERNS = ("checkpoint/*",)
#: A run folder's checkpoints, in a repo laid out as a run (not what a push writes): never
#: pulled, as they hold optimizer state too ("*.safetensors" alone took all of them).
RUN_STATE_PATTERNS = ("checkpoints/*",)
#: Formats that unpickle on load (arbitrary code execution): never pushed, never pulled.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SOURCE_INFO = "minfm_source.json"
#: Default bounds on one pull (override: --max-files/--max-bytes, MINFM_HUB_MAX_FILES/_BYTES).
DEFAULT_MAX_FILES = 10_000
DEFAULT_MAX_BYTES = 2**40  # 1 TiB
#: The most files a pull may be allowed (a repo of more is no model repo).
MAX_FILES_LIMIT = 10_000_000
#: The largest --max-bytes / MINFM_HUB_MAX_BYTES: 1 PiB (more is a typo, not a disk).
MAX_BYTES_LIMIT = 2**50
_SIZE_RE = re.compile(r"^\s*([0-9]{1,30}(?:\.[0-9]{1,30})?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)  # ASCII digits
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SNAPSHOT_RE = re.compile(r"(?:^|/)models--([^/]+)--([^/]+)/snapshots/([0-9a-f]{40})\Z")


def is_pickle(path: str) -> bool:
    return path.lower().endswith(PICKLE_SUFFIXES)


def refuse_pickles(paths: list[str], where: str) -> None:
    bad = sorted(p for p in paths if is_pickle(p))
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise MinfmError(
            f"{where}: refusing pickle-format files ({shown}); minFM only exchanges weights as safetensors"
        )


@dataclass(frozen=True)
class Pulled:
    """Where a pulled repo lies and exactly what it is."""

    path: Path
    repo_id: str
    revision: str | None  # as asked (None: the default branch)
    commit: str  # the commit sha the files come from
    files: tuple[str, ...] = ()  # what the pull brought (for --local-dir: what a later pull may remove)

    @property
    def uri(self) -> str:
        """An ``hf://`` URI pinned to the downloaded commit."""
        return f"hf://{self.repo_id}@{self.commit}"


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000 (also KB/MB/TB, KiB/MiB/GiB/TiB, or plain bytes)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise MinfmError(f"invalid size {text!r}: expected e.g. 5GB, 500MB or a number of bytes")
    return int(Decimal(m.group(1)) * _UNITS[(m.group(2) or "").upper()])  # exact: float made inf of 400 digits


@dataclass(frozen=True)
class Limits:
    """How much one pull may bring: a repo is hostile until checked, and a listing of a
    million files or a petabyte must end before the disk fills."""

    max_files: int = DEFAULT_MAX_FILES
    max_bytes: int = DEFAULT_MAX_BYTES

    @classmethod
    def resolve(cls, max_files: int | None = None, max_bytes: str | int | None = None) -> Limits:
        """Arguments win, then ``MINFM_HUB_MAX_FILES`` / ``MINFM_HUB_MAX_BYTES``, then the defaults."""
        files = max_files if max_files is not None else os.environ.get("MINFM_HUB_MAX_FILES") or DEFAULT_MAX_FILES
        size = max_bytes if max_bytes is not None else os.environ.get("MINFM_HUB_MAX_BYTES") or DEFAULT_MAX_BYTES
        count = int(files) if isinstance(files, int) or (files.strip().isascii() and files.strip().isdigit()) else 0
        if not 1 <= count <= MAX_FILES_LIMIT:  # below 1 every pull would be refused after listing it: a typo
            raise MinfmError(f"invalid file count {files!r} (MINFM_HUB_MAX_FILES / --max-files): "
                             f"expected an integer from 1 to {MAX_FILES_LIMIT}")
        try:
            nbytes = parse_size(size)
        except MinfmError as exc:
            raise MinfmError(f"{exc} (MINFM_HUB_MAX_BYTES / --max-bytes)") from None
        if not 1 <= nbytes <= MAX_BYTES_LIMIT:
            raise MinfmError(f"invalid size {str(size)[:40]!r} (MINFM_HUB_MAX_BYTES / --max-bytes): expected 1 byte "
                             f"to 1PiB ({MAX_BYTES_LIMIT} bytes)")
        return cls(count, nbytes)

    def check(self, n_files: int, n_bytes: int, what: str) -> None:
        if n_files > self.max_files:
            raise MinfmError(f"{what}: {n_files} files to download, more than the limit of {self.max_files} "
                             "(raise it with --max-files or MINFM_HUB_MAX_FILES)")
        if n_bytes > self.max_bytes:
            raise MinfmError(f"{what}: {n_bytes} bytes to download, more than the limit of {self.max_bytes} "
                             "(raise it with --max-bytes or MINFM_HUB_MAX_BYTES)")


def checked_download(wanted: list, limits: Limits, what: str) -> int:
    """Check the listed files ``wanted`` against ``limits``; the bytes their bodies may hold on
    the wire (:func:`~minfm_hub.answers.download_budget`): the listed total, or the limit when
    the server left a size out."""
    total = sum(_listed_size(s, what) for s in wanted)
    limits.check(len(wanted), total, what)
    return total if all(s.size is not None for s in wanted) else limits.max_bytes


def _listed_size(sibling, what: str) -> int:
    """A listed file's size in bytes, as the server claims it (None: not given, 0)."""
    size = sibling.size
    if size is None:
        return 0
    if type(size) is not int or size < 0:
        raise MinfmError(f"{what}: the Hub listed {sibling.rfilename!r} with size {str(size)[:40]!r}, "
                         "not a byte count; refusing the listing")
    return size


def pull(ref: str | HubRef, local_dir: str | Path | None = None, *, training_state: bool = False,
         max_files: int | None = None, max_bytes: str | int | None = None) -> Pulled:
    """Download ``ref`` (``org/name[@rev]`` or ``hf://...``) into the HF cache or ``local_dir``.

    With ``training_state`` the ``checkpoint/`` folder (full DCP training state) comes too.
    Before downloading, the repo's file list is checked: no pickle, no name that leaves the
    folder, at most ``max_files`` files and ``max_bytes`` bytes (see :class:`Limits`); then
    exactly that commit (its sha, not the branch, which may move meanwhile) is downloaded and
    the tree checked again. A failed pull leaves the target as it was.
    Raises MinfmError (one line) for a bad id, a missing repo/revision, a refused repo, or no network.
    """
    from huggingface_hub import HfApi, constants

    ref = parse_ref(ref) if isinstance(ref, str) else ref
    if isinstance(local_dir, str) and not local_dir:  # Path("") is ".": it would pull into the current folder
        raise MinfmError("--local-dir: expected a folder, got an empty path")
    if local_dir is not None:  # before any request (a file there was found after the listing);
        # a link is followed, as the pull itself does (a dangling one: its target is made)
        require_folder_room(os.path.realpath(os.path.expanduser(local_dir)), "--local-dir")
    limits = Limits.resolve(max_files, max_bytes)
    patterns = file_filters(training_state)
    what = f"Hub repo {ref}"
    commit, listed, files, budget = None, None, (), 0  # offline: nothing may be downloaded
    with hub_errors("pull", str(ref)), checked_answers():
        if not constants.HF_HUB_OFFLINE:
            info = HfApi().model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
            commit = checked_commit(info.sha, what)
            siblings = list(info.siblings or [])
            check_names([s.rfilename for s in siblings], what)  # the server may list any name
            refuse_pickles([s.rfilename for s in siblings], str(ref))
            wanted = _wanted(siblings, patterns)
            budget = checked_download(wanted, limits, what)
            listed, files = {s.rfilename for s in siblings}, tuple(sorted(s.rfilename for s in wanted))
        brought = files  # what this pull downloads, all of which must arrive
        with download_budget(budget, what):  # on the wire, as the listing said
            if local_dir is None:
                path, commit = _pull_to_cache(ref, patterns, commit, files, limits)
                pulled = Pulled(path, ref.repo_id, ref.revision, commit, files)
                _record(pulled, pulled.path)
            else:
                folder = Path(os.path.expanduser(local_dir))
                prev = source_info(folder) if folder.is_dir() else None
                prev_files = set(_recorded_files(prev))
                stale: set[str] = set()
                if commit is None:  # offline: the folder's own record of the same pull, if any, knows the commit
                    if prev and prev.get("repo_id") == ref.repo_id and prev.get("revision") == ref.revision:
                        commit, files = prev["commit"], tuple(sorted(prev_files))
                else:
                    # The previous pull's files the new commit lacks go (a dropped ema.safetensors must not
                    # be loaded with the new weights); those it still has stay on the record.
                    stale = prev_files - listed
                    files = tuple(sorted(set(files) | (prev_files & listed)))
                pulled = Pulled(folder, ref.repo_id, ref.revision, commit or "unknown", files)
                _pull_to_local_dir(pulled, patterns, limits, stale, brought)
    return pulled


def _recorded_files(info: dict | None) -> list[str]:
    """The files a previous pull recorded; names no repo could hold (``..``, absolute) are ignored."""
    files = (info or {}).get("files")
    out = []
    for name in files if isinstance(files, list) else []:
        with contextlib.suppress(MinfmError):
            check_name(name, "")
            out.append(name)
    return out


def file_filters(training_state: bool) -> dict[str, list[str]]:
    """``snapshot_download``'s ``allow_patterns`` / ``ignore_patterns`` for a pull.

    ``*`` crosses folders, so ``*.json`` alone would also take ``checkpoint/manifest.json``
    and ``checkpoint/rank_0.safetensors``: without the training state its folder is ignored
    whole (half of it reads as a broken checkpoint, and it can be large)."""
    if training_state:
        return {"allow_patterns": [*SAFE_PATTERNS, *TRAINING_STATE_PATTERNS], "ignore_patterns": list(RUN_STATE_PATTERNS)}
    return {"allow_patterns": list(SAFE_PATTERNS), "ignore_patterns": [*TRAINING_STATE_PATTERNS, *RUN_STATE_PATTERNS]}


def _wanted(siblings: list, patterns: dict[str, list[str]]) -> list:
    from huggingface_hub.utils import filter_repo_objects

    return list(filter_repo_objects(siblings, **patterns, key=lambda s: s.rfilename))


def _verify(folder: Path, limits: Limits, what: str, *, local_dir: bool = False, expect=None) -> None:
    """The downloaded tree, checked again: no symlink out, regular files only, within the limits,
    and every file of the checked listing ``expect`` (when known) arrived."""
    for name in expect or ():
        if not (folder / name).is_file():
            raise MinfmError(f"{what}: {short_name(name)} did not arrive")
    n_files = n_bytes = 0
    for dirpath, dirnames, filenames in os.walk(folder):  # symlinked folders are not entered
        rel_dir = Path(dirpath).relative_to(folder)
        if local_dir and rel_dir.parts[:1] == (".cache",):
            continue  # huggingface_hub's own bookkeeping for --local-dir
        for name in dirnames + filenames:
            entry = Path(dirpath) / name
            rel = (rel_dir / name).as_posix()
            if entry.is_symlink() and not is_inside(entry, folder):
                raise MinfmError(f"{what}: refusing {rel}: a symlink leads outside {folder}")
            if name in filenames:
                if not entry.is_file():
                    raise MinfmError(f"{what}: refusing {rel}: not a regular file")
                n_files += 1
                n_bytes += entry.stat().st_size
    limits.check(n_files, n_bytes, what)


def _pull_to_cache(ref: HubRef, patterns: dict[str, list[str]], commit: str | None, files: tuple[str, ...],
                   limits: Limits) -> tuple[Path, str]:
    """snapshot_download of the checked ``commit`` into the HF cache (offline: of the cached
    ``ref``): the snapshot folder and its commit."""
    what = f"Hub repo {ref}"
    with cache_transaction(ref.repo_id) as repo_cache:
        path = Path(_snapshot(what, ref.repo_id, revision=commit or ref.revision, **patterns))
        m = _SNAPSHOT_RE.search(path.as_posix())
        if m is None or (commit is not None and m.group(3) != commit):
            raise MinfmError(f"{what}: the download did not land in the snapshot of commit {commit or '(cached)'}")
        _verify(path, limits, what, expect=files)
        if commit is not None:
            record_ref(repo_cache, ref.revision, commit)
    return path, m.group(3)  # offline, the folder name is the commit the cache served


def _snapshot(what: str, repo_id: str, **kwargs) -> str:
    """``snapshot_download``, with the client's own refusals and local file errors as one line.

    Hub and network failures pass on to :func:`minfm_hub.errors.hub_errors`.
    """
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, **kwargs)
    except (ValueError, OSError) as exc:
        if translate(exc, "pull", repo_id) is not None:
            raise
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
        raise MinfmError(scrub(f"{what}: download failed ({why})")) from None


def _pull_to_local_dir(pulled: Pulled, patterns: dict[str, list[str]], limits: Limits, stale: set[str],
                       expect: tuple[str, ...]) -> None:
    """Download into a fresh folder beside the target, verify it, then move the files in.

    Nothing is written into the target before every check passed, and every move replaces
    a file (or a symlink that stays inside) instead of writing through it. ``stale`` are the
    previous pull's files to remove; ``expect`` the checked listing that must arrive.
    """
    # DIR comes from the user's command line: a symlink there is theirs to follow. The temp
    # folder goes beside the real target, so the final moves are renames on one file system.
    target = Path(os.path.realpath(pulled.path))
    what = f"Hub repo {HubRef(pulled.repo_id, pulled.revision)}"
    require_folder_room(target, "--local-dir")
    made = [p for p in (target.parent, *target.parent.parents) if not os.path.lexists(p)]  # deepest first
    try:
        with _os_errors(pulled.path):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = fresh_dir(target, f".{target.name}.pull-")
        try:
            _pull_into(pulled, tmp, target, patterns, limits, stale, expect, what)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        _remove_empty(made)  # a failed pull leaves no folder it made on the way either
        raise


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):  # (one another process filled meanwhile is kept)
            folder.rmdir()


def _pull_into(pulled: Pulled, tmp: Path, target: Path, patterns: dict[str, list[str]], limits: Limits,
               stale: set[str], expect: tuple[str, ...], what: str) -> None:
    """:func:`_pull_to_local_dir`'s download into ``tmp`` and its move into ``target``."""
    if target.is_dir():
        _seed(target, tmp)
    # the checked sha, not the branch: what arrives is the listing that was checked
    revision = pulled.commit if SHA_RE.match(pulled.commit) else pulled.revision
    _snapshot(what, pulled.repo_id, revision=revision, local_dir=tmp, **patterns)
    _verify(tmp, limits, what, local_dir=True, expect=expect)
    _record(pulled, tmp)
    if not os.path.lexists(target):
        with _os_errors(pulled.path):
            os.rename(tmp, target)  # one atomic step
        return
    _move_in(tmp, target, stale, pulled.path, what)


def _move_in(tmp: Path, target: Path, stale: set[str], shown: Path, what: str) -> None:
    """Move the files of ``tmp`` into the existing ``target`` and remove its ``stale`` files, all
    or nothing: each file replaced or removed is first moved aside into a folder beside the
    target, and put back (the new files taken out) if any move fails."""
    where = f"{what}: --local-dir {shown}"
    moves = []
    for src in sorted(tmp.rglob("*"), key=lambda p: (p.name == SOURCE_INFO, p)):  # the record last
        if src.is_dir() and not src.is_symlink():
            continue
        dst = contained(target, src.relative_to(tmp).as_posix(), what=where)
        if os.path.lexists(dst) and os.path.samestat(os.lstat(src), os.lstat(dst)):
            continue  # a hard link _seed made: unchanged
        moves.append((src, dst))
    gone = [contained(target, name, what=where) for name in sorted(stale)]
    olds = dict.fromkeys(p for p in [dst for _, dst in moves] + gone  # never a folder: that is the user's
                         if os.path.lexists(p) and not (p.is_dir() and not p.is_symlink()))
    with _os_errors(shown):
        aside = fresh_dir(target, f".{target.name}.old-")
    kept, placed, made, current = [], [], [], target
    try:
        for current in olds:
            keep = aside / current.relative_to(target)
            keep.parent.mkdir(parents=True, exist_ok=True)
            os.rename(current, keep)
            kept.append((keep, current))
        for src, current in moves:
            missing = [p for p in (current.parent, *current.parent.parents) if not os.path.lexists(p)]
            for folder in reversed(missing):
                os.mkdir(folder)
                made.append(folder)
            os.rename(src, current)
            placed.append(current)
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        try:  # undo, newest first
            for path in reversed(placed):
                os.unlink(path)
            for folder in reversed(made):
                os.rmdir(folder)
            for keep, old in reversed(kept):
                os.rename(keep, old)
        except OSError:
            raise MinfmError(f"{shown}: cannot update {current.relative_to(target)} ({why}), "
                             f"nor put the old files back: they are in {aside}") from None
        shutil.rmtree(aside, ignore_errors=True)
        raise MinfmError(f"{shown}: cannot update {current.relative_to(target)} ({why}); "
                         "the folder was left as it was") from None
    shutil.rmtree(aside, ignore_errors=True)
    for path in gone:  # folders the stale files leave empty (a dropped checkpoint/) go too
        with contextlib.suppress(OSError):
            for folder in path.relative_to(target).parents[:-1]:
                os.rmdir(target / folder)


@contextlib.contextmanager
def _os_errors(where: Path):
    """A file-system failure of our own writes (permissions, a full disk) as one line."""
    try:
        yield
    except OSError as exc:
        raise MinfmError(f"{where}: cannot write the pulled files ({exc.strerror or type(exc).__name__})") from None


def _seed(target: Path, tmp: Path) -> None:
    """Hard-link the target's files into ``tmp`` so unchanged files are not downloaded again.

    huggingface_hub replaces (never rewrites) a data file it downloads, so a link is safe;
    its small ``.cache`` metadata files are rewritten in place, so they are copied. Only
    regular files that really lie inside the target are taken.
    """
    for src in target.rglob("*"):
        if src.is_symlink() or not src.is_file() or not is_inside(src, target):
            continue
        dst = tmp / src.relative_to(target)
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.relative_to(target).parts[:1] == (".cache",):
                shutil.copy2(src, dst)
            else:
                os.link(src, dst)
        except OSError:
            return  # another file system, no hard links: download everything again


def _record(pulled: Pulled, folder: Path) -> None:
    """Write ``minfm_source.json`` atomically, replacing (never writing through) a symlink there:
    in the cache a repo's own ``minfm_source.json`` is a link to a shared blob."""
    info = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(pulled).items() if k != "path"}
    info["uri"] = pulled.uri
    try:
        write_text_atomic(folder / SOURCE_INFO, json.dumps(info, indent=2, sort_keys=True) + "\n")
    except OSError:
        pass  # a read-only shared cache: source_info() still reads the cache layout


def source_info(path: str | Path) -> dict | None:
    """What a pulled folder is: ``{"repo_id", "revision", "commit", "uri"}``, or None if not a pull."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    f = folder / SOURCE_INFO
    if f.is_file() and f.stat().st_size < 1 << 26:  # it lists the pulled files: 10,000 names fit easily
        try:  # a repo may ship its own (hostile) file under this name: only a well-formed record counts
            info = parse_json(f.read_bytes(), str(f))
            if isinstance(info, dict) and all(isinstance(info.get(k), str) for k in ("repo_id", "commit", "uri")):
                return info
        except (MinfmError, OSError):
            pass
    m = _SNAPSHOT_RE.search(folder.resolve().as_posix())
    if m:
        repo_id = f"{m.group(1)}/{m.group(2)}"
        return {"repo_id": repo_id, "revision": None, "commit": m.group(3), "uri": f"hf://{repo_id}@{m.group(3)}"}
    return None
