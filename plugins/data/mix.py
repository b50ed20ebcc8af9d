"""``mix``: several datasets as one, each contributing its weight's share of the samples.

Index ``i`` of the mix belongs to period ``i // period``; within a period the sources take their
quota of slots (the weights, rounded to whole slots by largest remainder) spread out by smooth
weighted round robin, so any ``period`` consecutive indices hold the weights exactly and the
loader's shuffle draws batches with the weights' proportions on average. Source ``k``'s ``j``-th
slot overall reads its item ``j mod len(source)``: an item index and a source are a pure
function of ``i``, the same in every process, worker and resumed run. The sources may yield
images (F = 1) and clips (F > 1) alike; the trainer packs them together without padding.
"""

from __future__ import annotations

import math

import torch

from minfm_core import protocols
from minfm_core.errors import MinfmError

from .configs import MixConfig, mix_epoch_problem, quotas
from .images import Flips, rng_for


def pattern(quota: list[int]) -> list[int]:
    """Source of each slot of a period: smooth weighted round robin (no source bunches up)."""
    total = sum(quota)
    current = [0] * len(quota)
    out = []
    for _ in range(total):
        current = [c + q for c, q in zip(current, quota)]
        k = max(range(len(quota)), key=lambda j: current[j])
        current[k] -= total
        out.append(k)
    return out


class MixDataset(torch.utils.data.Dataset, protocols.Dataset):
    def __init__(self, cfg: MixConfig, split: str = "train") -> None:
        from minfm_core.registry import get_registry

        self.cfg = cfg
        # the config keeps each source's table as the recipe wrote it: resolved as any nested
        # component table is (docs/plugins.md, "Nested component tables")
        self.sources = [get_registry().resolve_table("dataset", src.dataset, f"data.sources[{k}].dataset").build(split=split)
                        for k, src in enumerate(cfg.sources)]
        for k, ds in enumerate(self.sources):
            if len(ds) == 0:
                raise MinfmError(f"data.sources[{k}]: the dataset has no {split} samples")
        self.quota = quotas([s.weight for s in cfg.sources], cfg.period)
        # The config refused this already where it knew the sources' sizes (drawn data); a folder's
        # size is known once it is read.
        problem = mix_epoch_problem(cfg.num_samples, cfg.period, self.quota, [len(ds) for ds in self.sources], split)
        if problem:
            raise MinfmError(f"data.{problem}")
        self.slots = pattern(self.quota)
        # rank[r]: how many earlier slots of the period belong to slot r's source.
        seen = [0] * len(self.quota)
        self.rank = []
        for k in self.slots:
            self.rank.append(seen[k])
            seen[k] += 1
        periods = max(math.ceil(len(ds) / q) for ds, q in zip(self.sources, self.quota))
        self._len = cfg.num_samples or periods * cfg.period

    def __len__(self) -> int:
        return self._len

    def locate(self, index: int) -> tuple[int, int]:
        """(source, item index in that source) of mix index ``index``."""
        if not 0 <= index < self._len:
            raise IndexError(f"mix: index {index} out of range for {self._len} samples")
        q, r = divmod(int(index), self.cfg.period)
        k = self.slots[r]
        return k, (q * self.quota[k] + self.rank[r]) % len(self.sources[k])

    # the sources are registry builds: each has protocols.Dataset's optional members too
    def set_epoch(self, epoch: int) -> None:
        for ds in self.sources:
            ds.set_epoch(epoch)

    def prompt(self, index: int) -> str:
        k, j = self.locate(index)
        return self.sources[k].prompt(j)

    def __getitem__(self, index: int) -> dict:
        k, j = self.locate(index)
        return self.sources[k][j]


class SourceFlips(Flips):
    """The flips of a cached mix: mix index ``i`` flips with its source's ``p_flip`` and ``seed``,
    drawn from (seed, epoch, i). The cache holds every item unflipped (``minfm cache latents``
    zeroes every ``p_flip``, the sources' too), so a source that flips still flips, anew each
    epoch; one that does not never does. (Not the same draws as the source's own flips on the
    fly: those key on the source's item index, which needs the source's length.)"""

    def __init__(self, cfg: MixConfig, split: str) -> None:
        from minfm_core.registry import get_registry

        super().__init__(0.0, 0, split)
        self.train = split == "train"
        self.slots = pattern(quotas([s.weight for s in cfg.sources], cfg.period))
        configs = [get_registry().resolve_table("dataset", src.dataset, f"data.sources[{k}].dataset").config
                   for k, src in enumerate(cfg.sources)]
        self.sources = [(c.p_flip, getattr(c, "seed", 0)) if isinstance(c, protocols.FlipConfig) else (0.0, 0)
                        for c in configs]

    def __call__(self, index: int) -> bool:
        p, seed = self.sources[self.slots[index % len(self.slots)]]
        return self.train and p > 0 and rng_for(seed, self.epoch, index).random() < p


def build(cfg: MixConfig, *, split: str = "train") -> torch.utils.data.Dataset:
    if cfg.use_cached_latents:
        # `minfm cache latents` encodes the mix index by index: the cache is the mix, images and clips alike.
        from .latents import CachedLatentsDataset

        return CachedLatentsDataset("mix", cfg.latents_dir, split, flips=SourceFlips(cfg, split))
    return MixDataset(cfg, split)


def dataset_config(slot, name: str):
    """The config of dataset ``name`` in a recipe's resolved ``data`` slot: the slot's own when
    it is that dataset, else the first ``mix`` source of that name (benches score one source)."""
    if slot is None:
        raise MinfmError("the recipe has no [data] table")
    if slot.component.name == name:
        return slot.config
    if slot.component.name == "mix":
        from minfm_core.registry import get_registry

        for k, src in enumerate(slot.config.sources):
            if src.dataset.get("name") == name:
                return get_registry().resolve_table("dataset", src.dataset, f"data.sources[{k}].dataset").config
    raise MinfmError(f"data: {slot.component.name!r} holds no {name} data")


__all__ = ["MixDataset", "build", "dataset_config", "pattern", "quotas"]
