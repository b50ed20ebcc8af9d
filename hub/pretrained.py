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

from pathlib import Path, PurePosixPath
from typing import Any

from minfm_core.errors import MinfmError
from minfm_core.pretrained import offline

from .errors import HubError, hub_errors
from .pull import Limits, check_names
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
    return (f"fetch it first with `minfm cache models RECIPE`, `minfm hub pull {ref.repo_id}` "
            f"or `hf download {ref.repo_id}`")


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
            return found.parent
    return None


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
    siblings = list(info.siblings or [])
    check_names([s.rfilename for s in siblings], f"Hub repo {ref}")  # the server may list any name
    # The asked revision (not the listed sha) is passed on, so that the cache records the
    # branch or tag and later offline lookups of the same reference find the files.
    revision = ref.revision
    named = [s for s in siblings if s.rfilename == subpath]
    wanted = named or _folder_files(siblings, subpath)
    if not wanted:
        raise MinfmError(f"{what}: the Hub repo {ref.repo_id} has no files under {subpath or '/'!r}")
    limits.check(len(wanted), sum(max(int(s.size or 0), 0) for s in wanted), what)
    if named:
        return Path(hf_hub_download(ref.repo_id, subpath, revision=revision))
    root = Path(snapshot_download(ref.repo_id, revision=revision, allow_patterns=[s.rfilename for s in wanted]))
    return root / subpath if subpath else root


def resolve_pretrained_file(ref: HubRef, subpath: str, limits: Limits | None = None) -> Path:
    """The local path of file or folder ``subpath`` ("" = the root) of ``ref``: cached, else downloaded."""
    found = _from_cache(ref, subpath)
    if found is not None:
        return found
    what = _name(ref, subpath)
    if offline():
        raise MinfmError(f"{what}: not a local path and not in the Hugging Face cache, and the Hub is offline "
                         f"(HF_HUB_OFFLINE=1); {fetch_hint(ref)}")
    try:
        with hub_errors("download", str(ref)):
            return _download(ref, subpath, limits or Limits.resolve())
    except HubError as exc:  # says what failed for the repo; the reference says what it was for
        raise HubError(f"{what}: {exc}") from None
