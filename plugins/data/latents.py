"""Cached VAE latents, the one reader every built-in dataset uses when ``use_cached_latents`` is set.

``minfm cache latents RECIPE`` writes ``latents_dir/<split>/index.json`` (``{"entries": [...]}``)
next to its safetensors shards; each entry is
``{"shard": "part-00000.safetensors", "key": "00000042", "prompt": ..., "label"?: ..., "split"?: ..., "size"?: ...}``.
A hand-made cache may also put one ``index.json`` straight in ``latents_dir`` (entries carry
``"split"``, default ``"train"``), give a bare list instead of ``{"entries": ...}``, leave out
``"prompt"`` where the dataset can name a label (imagenet), and add ``"flip_key"``, the latent of
the flipped image. Shards are resolved relative to the index file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from minfm_core.errors import MinfmError, first_line
from minfm_core.jsonio import read_json_file
from minfm_core.latents_record import split_index
from minfm_core.safepath import contained, missing_folder

from .captions import bounded_caption
from .images import Flips

#: A latents index is read whole: ~150 bytes an item, ImageNet's 1.28 M in ~200 MB.
MAX_INDEX_BYTES = 4 << 30


class CachedLatentsDataset(torch.utils.data.Dataset):
    """Items ``{"latent": (C, F, h, w) float32, "prompt": str, "label"?: int}``: what encoding gives.

    ``name`` prefixes every error; ``flips`` decides per (epoch, index) whether the item is flipped,
    as the image dataset would (``flip_key`` when the cache has it, else the latent is flipped);
    ``label_prompts[label]`` is the prompt of an entry without one.
    """

    def __init__(self, name: str, latents_dir: str | None, split: str, *, flips: Flips | None = None,
                 label_prompts: Sequence[str] | None = None) -> None:
        self.name = name
        index = _find_index(name, latents_dir, split)
        entries = [e for e in _read_entries(name, index) if e.get("split", "train") == split]
        if not entries:
            raise MinfmError(f"{name}: {index}: no entries for split {split!r} (minfm cache latents --split {split})")
        self.entries = []
        shards: dict[str, str] = {}
        for i, e in enumerate(entries):
            if "shard" not in e or "key" not in e:
                raise MinfmError(f"{name}: {index}: entry {i} needs 'shard' and 'key'")
            label, prompt = e.get("label"), e.get("prompt")
            # a label is a class number (not 2.7, true or -5: -5 picked class 995's prompt)
            if label is not None and (type(label) is not int or not 0 <= label < (
                    len(label_prompts) if label_prompts is not None else 2**31)):
                raise MinfmError(f"{name}: {index}: entry {i}: label {str(label)[:40]} is not a class number"
                                 + (f" in 0..{len(label_prompts) - 1}" if label_prompts is not None else ""))
            if prompt is None:
                if label is None or label_prompts is None:
                    raise MinfmError(f"{name}: {index}: entry {i} has no 'prompt'")
                prompt = label_prompts[label]
            if not isinstance(prompt, str):
                raise MinfmError(f"{name}: {index}: entry {i}: 'prompt' must be text, got {type(prompt).__name__}")
            bounded_caption(prompt, f"{name}: {index}: entry {i}: 'prompt'")
            shard = shards.get(e["shard"]) if isinstance(e["shard"], str) else None
            if shard is None:  # a few shards, a million entries: each name checked once
                shard = shards[e["shard"]] = str(contained(index.parent, e["shard"], what=f"{name}: {index}: entry {i}"))
            self.entries.append((shard, e["key"], e.get("flip_key"), prompt, label))
        self.flips = flips or Flips(0.0, 0)
        self._handles: dict[str, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        self.flips.epoch = int(epoch)

    def __getstate__(self) -> dict:
        # open shard handles cannot be pickled (spawned loader workers): each process reopens them
        return {**self.__dict__, "_handles": {}}

    def _tensor(self, shard: str, key: str) -> torch.Tensor:
        from safetensors import safe_open

        from minfm_core.weights import check_header

        if self._pid != os.getpid():  # a forked worker opens its own memory maps
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(shard)
        if handle is None:
            if not os.path.isfile(shard):
                raise MinfmError(f"{self.name}: latent shard {shard!r} not found")
            check_header(Path(shard))  # a dataset file is data: bounded header, one clear error
            try:  # offsets that do not cover the file, an unknown dtype: safetensors' own errors
                handle = self._handles[shard] = safe_open(shard, framework="pt")
            except Exception as exc:
                raise MinfmError(f"{self.name}: {shard!r} is not a readable safetensors file ({first_line(exc, 160)})") from None
        try:
            latent = handle.get_tensor(key)
        except Exception:  # safetensors raises its own error types for a missing key
            raise MinfmError(f"{self.name}: key {key!r} not found in {shard!r}") from None
        # what an encoder gives: (C, h, w) or (C, F, h, w) of finite numbers, none of it empty,
        # checked as training takes it (float32): a float64 1e300 is finite until converted, and
        # float8 has no isfinite at all
        if latent.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            latent = latent.float()
        if latent.dim() not in (3, 4) or not latent.numel() or latent.dtype != torch.float32 \
                or not bool(torch.isfinite(latent).all()):
            what = f"{latent.dtype} {tuple(latent.shape)}" if latent.numel() and latent.dim() in (3, 4) else tuple(latent.shape)
            raise MinfmError(f"{self.name}: {shard!r} key {key!r}: not a latent (C, [F,] h, w) of finite numbers: {what}")
        return latent

    def prompt(self, index: int) -> str:
        """The entry's prompt without reading its latent."""
        return self.entries[index][3]

    def __getitem__(self, index: int) -> dict:
        shard, key, flip_key, prompt, label = self.entries[index]
        flip = self.flips(index)
        latent = self._tensor(shard, flip_key if flip and flip_key else key).float()
        if flip and not flip_key:
            # Convolutional VAEs are close to flip-equivariant: flipping the latent stands in
            # for encoding the flipped image when the cache holds no flipped copy.
            latent = latent.flip(-1)
        if latent.dim() == 3:
            latent = latent.unsqueeze(1)  # (C, h, w) -> (C, 1, h, w)
        sample = {"latent": latent, "prompt": prompt}
        if label is not None:
            sample["label"] = int(label)
        return sample


def _find_index(name: str, latents_dir: str | None, split: str) -> Path:
    if not latents_dir:
        raise MinfmError(f"{name}: use_cached_latents = true needs 'latents_dir' (the --out of minfm cache latents)")
    base = Path(os.path.expanduser(latents_dir))
    if (index := split_index(base, split)) is not None:
        return index
    missing = problem if (problem := missing_folder(base)) else "the cache is missing or unfinished"
    raise MinfmError(
        f"{name}: use_cached_latents = true but there is no index.json in {str(base)!r} (or its {split}/ folder): "
        f"{missing}; write it with `minfm cache latents RECIPE --out {base} --split {split}`"
    )


def _read_entries(name: str, index: Path) -> list[dict]:
    data = read_json_file(index, f"{name}: {index}", MAX_INDEX_BYTES)
    entries = data.get("entries") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise MinfmError(f"{name}: {index}: expected a list of entries (or {{'entries': [...]}})")
    if not all(isinstance(e, dict) for e in entries):
        raise MinfmError(f"{name}: {index}: every entry must be an object with 'shard' and 'key'")
    return entries
