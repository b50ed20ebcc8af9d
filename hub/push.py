"""Upload a trained model as a Hub repo: ``minfm hub push``.

One push is one commit (a single ``create_commit``): the Hub applies it whole or not at
all, so an interrupted push leaves no partial commit. Files whose content already is on
the Hub are not sent, and a push that changes nothing makes no commit at all.

SRC is a *hub folder* (``model.safetensors`` or a sharded ``model.safetensors.index.json``,
optionally ``ema.safetensors``, ``recipe.toml``, ``samples.png``, ``metrics.jsonl`` and a
``checkpoint/`` DCP folder), or a run/checkpoint directory that the core exports into one
with ``minfm_core.checkpoint.export_for_hub(src, out_dir, include_training_state=...)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from minfm_core.errors import MinfmError
from minfm_core.safepath import contained, write_text_atomic

from . import card
from .errors import HubError, endpoint, hub_errors, scrub
from .pull import is_pickle, parse_size, refuse_pickles
from .secrets import scan_for_tokens, scan_text
from .answers import SHA_RE
from .uri import validate_repo_id, validate_revision

WEIGHT_STEMS = ("model", "ema")
EXTRA_FILES = ("recipe.toml", "samples.png", "metrics.jsonl")
TRAINING_STATE_DIR = "checkpoint"
DIFFUSERS_DIR = "transformer"  # diffusers' FluxTransformer2DModel folder (optional)
DEFAULT_MAX_SHARD_SIZE = "5GB"  # as transformers and huggingface_hub
#: A shard size's range: below 1 KB every tensor is a file of its own (0 staged a repo of one
#: file per tensor); above 50 GB the Hub refuses the file.
SHARD_SIZE_RANGE = (1_000, 50_000_000_000)



@dataclass
class PushResult:
    repo_id: str
    revision: str
    commit: str  # the head after the push (unchanged when nothing was pushed)
    uploaded: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.uploaded or self.deleted)


def _human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def is_hub_folder(path: Path) -> bool:
    from minfm_core.weights import has_weights

    return path.is_dir() and has_weights(path)


def _export(src: Path, out: Path, include_training_state: bool, allow_pickle: bool) -> Path:
    """Consolidate a run/checkpoint directory into a Hub folder through the core."""
    from minfm_core.checkpoint import export_for_hub

    return export_for_hub(src, out, include_training_state=include_training_state, allow_pickle=allow_pickle)


def _shard(path: Path, stem: str, max_bytes: int, out: Path) -> dict[str, Path]:
    """``stem-0000i-of-0000n.safetensors`` + index (transformers layout) for one big weights file."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from minfm_core.weights import load_safetensors_file, save_safetensors_file

    state = load_safetensors_file(path)
    split = split_torch_state_dict_into_shards(
        state, filename_pattern=stem + "{suffix}.safetensors", max_shard_size=max_bytes
    )
    if not split.is_sharded:
        return {f"{stem}.safetensors": path}
    files: dict[str, Path] = {}
    for name, tensors in split.filename_to_tensors.items():
        save_safetensors_file({t: state[t].contiguous() for t in tensors}, out / name, metadata={"format": "pt"})
        files[name] = out / name
    index = {"metadata": dict(split.metadata), "weight_map": dict(sorted(split.tensor_to_filename.items()))}
    write_text_atomic(out / f"{stem}.safetensors.index.json", json.dumps(index, indent=2, sort_keys=True) + "\n")
    files[f"{stem}.safetensors.index.json"] = out / f"{stem}.safetensors.index.json"
    return files


def _regular(folder: Path, rel: str) -> Path:
    """The file a push uploads for ``folder/rel``: regular files only.

    A symlink is followed only when it stays inside ``folder`` (a pulled HF cache snapshot
    is made of links into its repo's ``blobs/``, which counts as inside): its target's
    content is uploaded under the link's name. A link leading anywhere else is refused,
    so a push never uploads what lies outside the folder. The resolved path is returned,
    so the link cannot be swapped between this check and the upload.
    """
    path = contained(folder, rel, what=f"{folder}/{rel}")
    real = Path(os.path.realpath(path))
    if not real.is_file():
        raise MinfmError(f"{folder}/{rel}: refusing to push: not a regular file")
    return real


def parse_shard_size(size: str | int) -> int:
    """``--max-shard-size`` in bytes, within :data:`SHARD_SIZE_RANGE`."""
    try:
        n = parse_size(size)
    except MinfmError as exc:
        raise MinfmError(f"--max-shard-size: {exc}") from None
    lo, hi = SHARD_SIZE_RANGE
    if not lo <= n <= hi:
        raise MinfmError(f"--max-shard-size {size}: expected from 1KB to 50GB")
    return n


def collect(folder: Path, stage: Path, *, include_training_state: bool, max_shard_size: int) -> dict[str, Path]:
    """Repo path -> local file for everything a push of ``folder`` uploads (shards written to ``stage``)."""
    folder = Path(os.path.abspath(folder))  # an index's shards come back absolute: compare like with like
    from minfm_core.checkpoint_format import MANIFEST, read_manifest, verify
    from minfm_core.weights import index_shards

    refuse_pickles([p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and is_pickle(p.name)],
                   str(folder))
    files: dict[str, Path] = {}
    for stem in WEIGHT_STEMS:
        single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
        if os.path.lexists(single):
            single = _regular(folder, single.name)
            if single.stat().st_size > max_shard_size:
                files.update(_shard(single, stem, max_shard_size, stage))
            else:
                files[f"{stem}.safetensors"] = single
        elif os.path.lexists(index):  # already sharded: the index names the shards
            shards = index_shards(_regular(folder, index.name))
            missing = [s.name for s in shards if not os.path.lexists(s)]
            if missing:
                raise MinfmError(f"{index}: names shards that are missing: {', '.join(missing)}")
            files[index.name] = _regular(folder, index.name)
            for shard in shards:
                rel = shard.relative_to(folder).as_posix()
                files[rel] = _regular(folder, rel)
    for name in EXTRA_FILES:
        if os.path.lexists(folder / name):
            files[name] = _regular(folder, name)
    if include_training_state:
        ckpt = folder / TRAINING_STATE_DIR
        if not ckpt.is_dir() or not any(ckpt.rglob("*")):
            raise MinfmError(f"{folder}: --include-training-state needs the DCP training state in {ckpt}/")
        contained(folder, TRAINING_STATE_DIR, what=f"{ckpt}")  # the folder itself must not lead outside
        # Only a checkpoint in minFM's format travels, verified, and exactly the files its
        # manifest lists: a legacy one's .metadata and data files are pickles (never pushed).
        manifest = read_manifest(ckpt)
        verify(manifest)
        for name in [*manifest.files, MANIFEST]:
            rel = f"{TRAINING_STATE_DIR}/{name}"
            files[rel] = _regular(folder, rel)
    return files


def _digests(path: Path) -> tuple[str, str]:
    """(git blob sha1, sha256) of a file in one read: the Hub's oid for regular and LFS files."""
    size = path.stat().st_size
    sha1, sha256 = hashlib.sha1(b"blob %d\0" % size), hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha1.update(chunk)
            sha256.update(chunk)
    return sha1.hexdigest(), sha256.hexdigest()


def _diffusers_folder(folder: Path, out: Path) -> dict[str, Path]:
    """``transformer/`` in diffusers' layout (EMA weights when present), through the ``export``
    command that the denoiser's plugin registers: the hub never imports a model plugin."""
    from minfm_core.cli.main import main

    from minfm_core.weights import has_weights

    ema = has_weights(folder, "ema")
    # its "wrote <temporary folder>" is not this command's output (stdout holds the hf:// line)
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["export", "diffusers", str(folder), str(out), *(["--ema"] if ema else [])])
    if rc != 0:
        raise MinfmError(f"{folder}: the diffusers export failed (exit {rc}); is the denoiser a FLUX model?")
    return {f"{DIFFUSERS_DIR}/{p.relative_to(out).as_posix()}": p for p in sorted(out.rglob("*")) if p.is_file()}


#: A top-level weights file a push writes: ``model.safetensors``, its shards and index.
_WEIGHTS_RE = re.compile(rf"^(?:{'|'.join(WEIGHT_STEMS)})(?:-\d{{5}}-of-\d{{5}})?\.safetensors(?:\.index\.json)?\Z")


def _is_managed(path: str) -> bool:
    """Remote files a push writes. One it did not write this time is stale, and deleted in
    the same commit, so that the repo is one model: left behind, an older push's
    ``checkpoint/`` made ``train.init_from`` resume a step the weights are not from, and its
    ``transformer/`` or ``samples.png`` showed another model. Files a push never writes (a
    LoRA someone uploaded, their own notes) stay."""
    if "/" in path:
        return path.startswith((TRAINING_STATE_DIR + "/", DIFFUSERS_DIR + "/"))
    return path in EXTRA_FILES or _WEIGHTS_RE.match(path) is not None


def _sha(value: object, answer: str, target: str) -> str:
    """A commit sha from a server answer: it is printed and named as the parent of the commit,
    so anything else (missing, not hex) is refused as the server's fault, in one line."""
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", value):
        return value
    raise HubError(scrub(f"the Hub at {endpoint()} answered a {answer} without a valid commit sha "
                         f"for the request to push to {target}: not a valid answer"))


def push(
    src: str | Path,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    include_training_state: bool = False,
    allow_pickle_checkpoint: bool = False,
    diffusers: bool = False,
    message: str | None = None,
    license: str = "other",
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    token: str | None = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> PushResult:
    """Push ``src`` to ``repo_id`` (branch ``revision``, created if missing) as one commit.

    Before anything is sent, every file is scanned for the active Hub token and for
    token-shaped strings (:func:`minfm_hub.secrets.scan_for_tokens`): a run's recipe.toml
    holds ``${HF_TOKEN}`` expanded, and a push would publish it.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.hf_api import RepoFile

    validate_repo_id(repo_id)
    branch = validate_revision(revision) if revision else "main"
    if SHA_RE.match(branch):  # create_branch made a branch named like the commit a pull then pinned
        raise MinfmError(f"--revision {branch}: a push goes to a branch, and this is a commit sha; name a branch")
    # What the user typed is published too: the commit message and the names on the Hub,
    # the license in the card's metadata. Checked before any work or request.
    scan_text({"the commit message (--message)": message, "the license (--license)": license,
               "the repo id": repo_id, "the revision (--revision)": revision}, token)
    card.validate_license(license)  # after the token scan: a token in it is named as one
    src = Path(os.path.expanduser(src))
    if not src.exists():
        raise MinfmError(f"{src}: no such file or directory")
    max_bytes = parse_shard_size(max_shard_size)
    target = f"{repo_id}@{branch}"

    with tempfile.TemporaryDirectory(prefix="minfm-push-") as tmp:
        tmp = Path(tmp)
        folder = src if is_hub_folder(src) else _export(src, tmp / "export", include_training_state,
                                                                allow_pickle_checkpoint)
        stage = tmp / "stage"
        stage.mkdir()
        files = collect(folder, stage, include_training_state=include_training_state, max_shard_size=max_bytes)
        if diffusers:
            files.update(_diffusers_folder(folder, stage / DIFFUSERS_DIR))
        (stage / "README.md").write_text(card.render(repo_id, files, folder, license=license))
        files["README.md"] = stage / "README.md"
        scan_for_tokens(files, token)  # refuses before the first request

        api = HfApi(token=token)
        with hub_errors("push to", target):
            api.create_repo(repo_id, private=private, exist_ok=True)
            if branch in {t.name for t in api.list_repo_refs(repo_id).tags}:
                # a branch of the tag's name beside it: which of the two a pull gets is the server's choice
                raise MinfmError(f"--revision {branch}: {repo_id} has a tag of that name; push to a branch")
            if branch != "main":
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            head = _sha(api.model_info(repo_id, revision=branch).sha, "repo info", target)
            remote = {
                e.path: e for e in api.list_repo_tree(repo_id, revision=head, recursive=True) if isinstance(e, RepoFile)
            }
        uploads = []
        for path, local in sorted(files.items()):
            sha1, sha256 = _digests(local)
            entry = remote.get(path)
            lfs = getattr(entry, "lfs", None)
            remote_hash = (lfs.sha256 if lfs else entry.blob_id) if entry else None
            if remote_hash not in (sha1, sha256):
                uploads.append(path)
        deletes = sorted(p for p in remote if p not in files and _is_managed(p))
        if not uploads and not deletes:
            log(f"nothing to push: {target} is up to date (commit {head[:12]})")
            return PushResult(repo_id, branch, head)

        for path in uploads:
            log(f"  + {path} ({_human_size(files[path].stat().st_size)})")
        for path in deletes:
            log(f"  - {path}")
        ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(files[p])) for p in uploads]
        ops += [CommitOperationDelete(path_in_repo=p) for p in deletes]
        summary = message or f"Push minFM model ({len(uploads)} file(s) changed)"
        with hub_errors("push to", target):
            # parent_commit: if someone else committed since we compared, the Hub refuses (412)
            # instead of silently mixing the two states.
            info = api.create_commit(repo_id, ops, commit_message=summary, revision=branch, parent_commit=head)
            oid = _sha(info.oid, "commit", target)
        log(f"pushed {len(uploads)} file(s) to {target}: commit {oid[:12]}")
        return PushResult(repo_id, branch, oid, uploads, deletes)
