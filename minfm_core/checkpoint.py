"""Checkpoints: torch.distributed.checkpoint (DCP) directories, atomic and asynchronous.

Layout of a run directory::

    <exp_dir>/recipe.toml
    <exp_dir>/checkpoints/step_00001000/   # complete: .metadata + DCP shards + per-rank extras
    <exp_dir>/checkpoints/.tmp-step_00002000/   # being written; never taken as complete

A save is written under ``.tmp-<name>`` and renamed by rank 0 only once DCP has
written its metadata (which happens after every rank's data is on disk), so a crash
or SIGKILL at any moment leaves every ``step_*`` directory complete. Per-rank state
(the trainer's RNG, the data position) goes to ``rank_<r>.safetensors`` beside the
DCP files. DCP's own ``.metadata`` is a pickle: it is read with an unpickler restricted to
DCP's metadata types (``SafeReader``), so a checkpoint from elsewhere cannot run code.

The same format serves one process and many: DCP reshards on load, so a run saved
with 2 processes resumes with 1 or 4.
"""

from __future__ import annotations

import functools
import json
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from .errors import MinfmError, RecipeError
from .suggest import did_you_mean

CKPT_DIR = "checkpoints"
HUB_STATE_DIR = "checkpoint"  # the DCP training state inside an exported (Hub) folder
_STEP_DIR = re.compile(r"^step_(\d{8})$")
PARTS = ("model", "ema", "optimizer", "scheduler", "step")


def step_dir(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return bool(_STEP_DIR.match(path.name)) and (path / ".metadata").is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root`` (a run dir or its checkpoints/ dir), oldest first."""
    root = Path(root)
    ckpts = root / CKPT_DIR if (root / CKPT_DIR).is_dir() else root
    if not ckpts.is_dir():
        return []
    return sorted(p for p in ckpts.iterdir() if p.is_dir() and is_complete(p))


def find_checkpoint(src: Path) -> Path:
    """A complete checkpoint directory for a checkpoint dir or a run dir (its latest)."""
    src = Path(src)
    if (src / ".metadata").is_file():
        return src
    if (src / HUB_STATE_DIR / ".metadata").is_file():  # a Hub folder pushed with its training state
        return src / HUB_STATE_DIR
    found = list_checkpoints(src)
    if not found:
        raise MinfmError(f"{src}: no complete checkpoint found (expected {CKPT_DIR}/step_NNNNNNNN/ with a .metadata file)")
    return found[-1]


def parse_load_plan(text: str) -> dict[str, str]:
    """``"ema:model,optimizer:optimizer"`` -> {target: source}; errors name ``train.init_load_plan``."""
    plan: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        src, sep, dst = item.partition(":")
        if not sep:
            raise RecipeError(f"train.init_load_plan: {item!r} is not source:target (e.g. ema:model)")
        for part in (src, dst):
            if part not in PARTS:
                raise RecipeError(
                    f"train.init_load_plan: unknown part {part!r}{did_you_mean(part, PARTS)}; parts: {', '.join(PARTS)}"
                )
        weights = {"model", "ema"}
        if (src in weights) != (dst in weights) or (src not in weights and src != dst):
            raise RecipeError(f"train.init_load_plan: cannot load {src!r} into {dst!r}")
        if dst in plan:
            raise RecipeError(f"train.init_load_plan: {dst!r} is loaded twice")
        plan[dst] = src
    return plan


class Checkpointer:
    """Saves app state asynchronously and atomically; prunes to ``keep_last``."""

    def __init__(self, exp_dir: str | Path, *, keep_last: int = 0, async_save: bool = True, recipe_text: str | None = None):
        self.root = Path(exp_dir) / CKPT_DIR
        self.keep_last = keep_last
        self.async_save = async_save
        self.recipe_text = recipe_text
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self._pending: tuple[Any, Path, Path] | None = None
        # Async saves run collectives from a background thread: give them their own group.
        self._group = dist.new_group(backend="gloo") if dist.is_initialized() else None

    def save(self, step: int, state: dict[str, Any], extras: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        self.wait()
        final = self.root / step_dir(step)
        tmp = self.root / f".tmp-{final.name}"
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a crash: never complete
            tmp.mkdir(parents=True)
            if self.recipe_text is not None:
                (tmp / "recipe.toml").write_text(self.recipe_text)
        barrier()
        save_file({k: v.contiguous().cpu() for k, v in extras.items()}, tmp / f"rank_{self.rank}.safetensors", metadata=meta)
        if self.async_save:
            fut = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._group)
        else:
            dcp.save(state, checkpoint_id=str(tmp), process_group=self._group)
            fut = None
        self._pending = (fut, tmp, final)
        if fut is None:
            self.wait()

    def poll(self) -> None:
        """Finish a pending save if it is done (cheap; call every step)."""
        if self._pending is not None and (self._pending[0] is None or self._pending[0].done()):
            self.wait()

    def wait(self) -> None:
        if self._pending is None:
            return
        fut, tmp, final = self._pending
        self._pending = None
        if fut is not None:
            fut.result()
        if self.rank == 0:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)  # the atomic step: from here on it is complete
            self._prune()

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for old in list_checkpoints(self.root)[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def barrier() -> None:
    """``dist.barrier()`` when there are other ranks to wait for."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# DCP writes its .metadata with pickle; a checkpoint may come from a Hub repo, so it is read
# with an unpickler that builds only DCP's own metadata types (tensor data itself is read
# by DCP with torch.load(weights_only=True)).
_META_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        ok = (
            module == "torch.distributed.checkpoint.metadata"
            or (module, name) in _META_ALLOWED
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not ok:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")
        return super().find_class(module, name)


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata unpickling is restricted to DCP's metadata types."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        stat = path.stat()
        metadata = _read_metadata(str(path), stat.st_mtime_ns, stat.st_size)
        metadata.storage_meta.load_id = self.load_id
        return metadata


@functools.lru_cache(maxsize=4)
def _read_metadata(path: str, mtime_ns: int, size: int) -> Metadata:
    """The unpickled ``.metadata``, once per file version: a resume reads it for every part
    (and DCP once more per load), and a sharded run's metadata lists every chunk."""
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        raise MinfmError(f"{Path(path).parent}: refusing to load this checkpoint: {exc}") from None
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


def load_state(ckpt: Path, state: dict[str, Any]) -> None:
    """Load DCP ``ckpt`` into ``state`` in place (keys absent from ``state`` are not read)."""
    reader = SafeReader(str(ckpt))
    reader.read_metadata()  # refuse a bad checkpoint here, with our message, not inside DCP's workers
    no_dist = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():
        if no_dist:  # hub export, notebooks: one process by design; DCP warns about it even when told
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=no_dist)


def load_rank_extras(ckpt: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    path = Path(ckpt) / f"rank_{rank}.safetensors"
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return load_file(str(path)), meta


def checkpoint_world_size(ckpt: Path) -> int:
    return len(list(Path(ckpt).glob("rank_*.safetensors")))


def recipe_for(src: Path) -> Path:
    """The recipe.toml that belongs to a checkpoint or run directory."""
    src = Path(src)
    for cand in (src / "recipe.toml", src.parent.parent / "recipe.toml", src.parent / "recipe.toml"):
        if cand.is_file():
            return cand
    raise MinfmError(f"{src}: no recipe.toml found beside this checkpoint or run")


def load_weights(ckpt: Path, model: torch.nn.Module, *, source: str = "model") -> None:
    """Load the ``model`` or ``ema`` weights of a DCP checkpoint into an (unsharded) module."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    sd = get_model_state_dict(model)
    if source == "ema":
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        wanted = {k: v for k, v in sd.items() if k in names}
        box = {"ema": wanted}
        load_state(ckpt, box)
        sd.update(box["ema"])
    else:
        box = {"model": sd}
        load_state(ckpt, box)
        sd = box["model"]
    set_model_state_dict(model, sd)


def has_part(ckpt: Path, part: str) -> bool:
    meta = SafeReader(str(ckpt)).read_metadata()
    return any(k.startswith(part + ".") or k == part for k in meta.state_dict_metadata)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)



def build_denoiser(recipe_path: Path) -> torch.nn.Module:
    """The recipe's denoiser on CPU with uninitialised storage (weights come from a checkpoint)."""
    from .recipe import load_recipe

    resolved = load_recipe(recipe_path, ["parallel.name=none", "balancer.name=none"])
    with torch.device("meta"):
        model = resolved["model.denoiser"].build(load_weights=False)
    return model.to_empty(device="cpu")


def export_for_hub(src: Path, out_dir: Path, *, include_training_state: bool = False) -> Path:
    """Write a Hub folder from a run or checkpoint directory.

    ``model.safetensors`` (and ``ema.safetensors`` when the run keeps an EMA) consolidated
    from the (possibly sharded) DCP checkpoint, ``recipe.toml``, and when the run has them
    ``metrics.jsonl`` and the newest sample grid as ``samples.png``; with
    ``include_training_state`` the DCP checkpoint itself under ``checkpoint/``.
    """
    ckpt = find_checkpoint(Path(src))
    recipe = recipe_for(ckpt)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_denoiser(recipe)
    load_weights(ckpt, model, source="model")
    # One metadata key only: safetensors writes its metadata map in no fixed order, and a
    # re-export must give identical bytes (the Hub push then uploads nothing).
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    if has_part(ckpt, "ema"):
        load_weights(ckpt, model, source="ema")
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        ema = {k: v.contiguous() for k, v in model.state_dict().items() if k in trainable}
        save_file(ema, str(out / "ema.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(recipe, out / "recipe.toml")
    run_dir = ckpt.parent.parent
    if (run_dir / "metrics.jsonl").is_file():
        shutil.copyfile(run_dir / "metrics.jsonl", out / "metrics.jsonl")
    grids = sorted((run_dir / "samples").glob("step_*/ema.png")) or sorted((run_dir / "samples").glob("step_*/raw.png"))
    if grids:
        shutil.copyfile(grids[-1], out / "samples.png")
    if include_training_state:
        dest = out / HUB_STATE_DIR
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(ckpt, dest)
    return out
