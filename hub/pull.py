"""Download a minFM repo from the Hub: ``minfm hub pull`` and the ``hf://`` source resolver.

Only safe formats are downloaded (safetensors, JSON/TOML/text, images); a repo that holds
a pickle-format file (``*.bin``, ``*.pt``, ...) is refused outright. The commit that was
actually downloaded is recorded in ``minfm_source.json`` next to the files (and is
readable with :func:`source_info`), so a run can say exactly which weights it used.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from minfm_core.errors import MinfmError

from .errors import hub_errors
from .uri import HubRef, parse_hf_uri, parse_ref

#: Files a pull downloads (fnmatch patterns, ``*`` crosses folders).
SAFE_PATTERNS = ("*.safetensors", "*.json", "*.jsonl", "*.toml", "*.md", "*.png", "*.jpg", "*.jpeg", "*.txt")
#: The training state (a torch.distributed.checkpoint folder): only on request, it can be large.
TRAINING_STATE_PATTERNS = ("checkpoint/*",)
#: Formats that unpickle on load (arbitrary code execution): never pushed, never pulled.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SOURCE_INFO = "minfm_source.json"
_SNAPSHOT_RE = re.compile(r"(?:^|/)models--([^/]+)--([^/]+)/snapshots/([0-9a-f]{40})$")


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

    @property
    def uri(self) -> str:
        """An ``hf://`` URI pinned to the downloaded commit."""
        return f"hf://{self.repo_id}@{self.commit}"


def pull(ref: str | HubRef, local_dir: str | Path | None = None, *, training_state: bool = False) -> Pulled:
    """Download ``ref`` (``org/name[@rev]`` or ``hf://...``) into the HF cache or ``local_dir``.

    With ``training_state`` the ``checkpoint/`` folder (full DCP training state) comes too.
    Raises MinfmError (one line) for a bad id, a missing repo/revision, a pickle file, or no network.
    """
    from huggingface_hub import HfApi, constants, snapshot_download

    ref = parse_ref(ref) if isinstance(ref, str) else ref
    patterns = list(SAFE_PATTERNS) + (list(TRAINING_STATE_PATTERNS) if training_state else [])
    commit = None
    with hub_errors("pull", str(ref)):
        if not constants.HF_HUB_OFFLINE:
            info = HfApi().model_info(ref.repo_id, revision=ref.revision)
            refuse_pickles([s.rfilename for s in info.siblings or []], str(ref))
            commit = info.sha
        # The asked revision (not the sha) is passed on so the cache records the branch/tag
        # and a later offline `hf://org/name` finds it.
        path = Path(snapshot_download(
            ref.repo_id, revision=ref.revision, local_dir=local_dir, allow_patterns=patterns,
        ))
    m = _SNAPSHOT_RE.search(path.as_posix())
    if m:  # cache layout: the folder name is the commit actually downloaded
        commit = m.group(3)
    pulled = Pulled(path, ref.repo_id, ref.revision, commit or "unknown")
    _record(pulled)
    return pulled


def _record(pulled: Pulled) -> None:
    info = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(pulled).items() if k != "path"}
    info["uri"] = pulled.uri
    try:
        (pulled.path / SOURCE_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    except OSError:
        pass  # a read-only shared cache: source_info() still reads the cache layout


def source_info(path: str | Path) -> dict | None:
    """What a pulled folder is: ``{"repo_id", "revision", "commit", "uri"}``, or None if not a pull."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    f = folder / SOURCE_INFO
    if f.exists():
        return json.loads(f.read_text())
    m = _SNAPSHOT_RE.search(folder.resolve().as_posix())
    if m:
        repo_id = f"{m.group(1)}/{m.group(2)}"
        return {"repo_id": repo_id, "revision": None, "commit": m.group(3), "uri": f"hf://{repo_id}@{m.group(3)}"}
    return None


def resolve_hf_uri(uri: str, *, training_state: bool = False) -> Path:
    """The ``hf`` source resolver: ``hf://org/name[@rev]`` -> local folder (see :func:`pull`)."""
    return pull(parse_hf_uri(uri), training_state=training_state).path
