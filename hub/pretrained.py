"""Pretrained weights from any Hub repo: the ``hf`` source asked for one file or folder.

The core resolves a pretrained reference ``org/name[@rev][/path]`` (T5, CLIP, a VAE, FLUX
weights) through the source registry as ``resolve("hf://org/name[@rev]", subpath=path)``;
this module is what the hub plugin does then. Unlike :func:`minfm_hub.pull.pull` (a whole
minFM repo), only the named file comes, or a folder's direct configs, safetensors weights
and tokenizer files -- never a pickle -- and always through the Hugging Face cache, so a
``hf download`` the user ran before is found and nothing is fetched twice.

The cache is read first. Only a reference that is not cached is downloaded, and not at
all when the Hub is offline (``HF_HUB_OFFLINE=1``): that is one line naming the reference
and how to fetch it. A download is bounded like a pull (:class:`minfm_hub.pull.Limits`).
"""

from __future__ import annotations

import glob
from pathlib import Path, PurePosixPath
from typing import Any

from minfm_core.errors import MinfmError, NotCachedError
from minfm_core.jsonio import parse_json
from minfm_core.pretrained import offline

from .answers import check_names, checked_answers, checked_commit, download_budget
from .cache import cache_transaction, record_ref
from .errors import HubError, hub_errors
from .pull import Limits, checked_download, refuse_pickles
from .uri import HubRef

#: Files of a folder reference that are worth fetching: configs, safetensors weights
#: (and their shard index), tokenizer files. Never pickled weights (.bin, .pt, .ckpt).
FOLDER_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt")

#: Files that mark a cached folder: a model's config or a tokenizer's files. The cache is
#: looked up by file (snapshots may hold only part of a repo, and newer huggingface_hub
#: refuses a local snapshot_download of a partly fetched repo).
FOLDER_MARKERS = ("config.json", "tokenizer_config.json", "tokenizer.json", "spiece.model", "vocab.json")


def _name(ref: HubRef, subpath: str) -> str:
    # How the user wrote it in the recipe (org/name[@rev][/path]), not the hf:// form.
    return f"{ref}/{subpath}" if subpath else str(ref)


def fetch_hint(ref: HubRef) -> str:
    # "with the Hub reachable": `minfm cache models` run offline says this too, and must not
    # send its user round in a circle.
    return (f"fetch it first, with the Hub reachable, by `minfm cache models RECIPE`, "
            f"`minfm hub pull {ref.repo_id}` or `hf download {ref.repo_id}`")


def _cached_file(ref: HubRef, path: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found: Any = try_to_load_from_cache(ref.repo_id, path, revision=ref.revision)
    return Path(found) if isinstance(found, str) else None


def _from_cache(ref: HubRef, subpath: str) -> Path | None:
    """The cached file ``subpath``, else the cached folder ``subpath`` (found by a marker file)."""
    if subpath:
        found = _cached_file(ref, subpath)
        if found is not None:
            return found
    for marker in FOLDER_MARKERS:
        found = _cached_file(ref, str(PurePosixPath(subpath, marker)) if subpath else marker)
        if found is not None:
            return found.parent if _shards_present(found.parent) else None
    return None


def _shards_present(folder: Path) -> bool:
    """Whether every shard a ``*.safetensors.index.json`` of ``folder`` names is there: a download
    killed half-way leaves the config (the marker) with only some shards, which the cache-first
    lookup must not take for the model (it is downloaded again, only the missing files travel)."""
    for index in folder.glob("*.safetensors.index.json"):
        try:
            data = parse_json(index.read_bytes(), str(index))
        except (MinfmError, OSError):
            continue  # unreadable: the weights loader says what is wrong with it
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        for name in weight_map.values() if isinstance(weight_map, dict) else ():
            plain = isinstance(name, str) and not name.startswith("/") and ".." not in PurePosixPath(name).parts
            if plain and not (folder / name).is_file():  # a name leaving the folder is the loader's to refuse
                return False
    return True


def _folder_files(siblings: list, subpath: str) -> list:
    # Direct children only: a repo root must not pull every subfolder's weights.
    prefix = f"{subpath}/" if subpath else ""
    return [s for s in siblings
            if s.rfilename.startswith(prefix) and "/" not in s.rfilename[len(prefix):]
            and any(PurePosixPath(s.rfilename).match(p) for p in FOLDER_PATTERNS)]


def _download(ref: HubRef, subpath: str, limits: Limits) -> Path:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    what = _name(ref, subpath)
    info = HfApi().model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
    commit = checked_commit(info.sha, f"Hub repo {ref}")
    siblings = list(info.siblings or [])
    check_names([s.rfilename for s in siblings], f"Hub repo {ref}")  # the server may list any name
    named = [s for s in siblings if s.rfilename == subpath]
    wanted = named or _folder_files(siblings, subpath)
    if not wanted:
        raise MinfmError(f"{what}: the Hub repo {ref.repo_id} has no files under {subpath or '/'!r}")
    budget = checked_download(wanted, limits, what)
    # The checked sha (not the branch, which may move meanwhile) is downloaded; the branch or
    # tag is recorded afterwards, so later offline lookups of the same reference find the files.
    # A failed download is taken back out of the cache, so no half of a folder is found later.
    with cache_transaction(ref.repo_id) as repo_cache, download_budget(budget, what):
        if named:
            path = Path(hf_hub_download(ref.repo_id, subpath, revision=commit))
        else:  # names escaped: a "*" or "[" in one must not match other files as a pattern
            root = Path(snapshot_download(ref.repo_id, revision=commit,
                                          allow_patterns=[glob.escape(s.rfilename) for s in wanted]))
            path = root / subpath if subpath else root
        record_ref(repo_cache, ref.revision, commit)
    return path


def resolve_pretrained_file(ref: HubRef, subpath: str, limits: Limits | None = None) -> Path:
    """The local path of file or folder ``subpath`` ("" = the root) of ``ref``: cached, else downloaded."""
    what = _name(ref, subpath)
    refuse_pickles([subpath], what)  # a file asked for by name is never a pickle, cached or not
    found = _from_cache(ref, subpath)
    if found is not None:
        return found
    if offline():
        raise NotCachedError(f"{what}: not a local path and not in the Hugging Face cache, and the Hub is offline "
                         f"(HF_HUB_OFFLINE=1); {fetch_hint(ref)}")
    try:
        with hub_errors("download", str(ref)), checked_answers():
            return _download(ref, subpath, limits or Limits.resolve())
    except HubError as exc:  # says what failed for the repo; the reference says what it was for
        raise HubError(f"{what}: {exc}") from None
