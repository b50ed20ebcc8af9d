"""The `none` parallelizer: a single process keeps the whole model."""

from __future__ import annotations

import torch


class NoParallel:
    def __init__(self, cfg=None):
        self.cfg = cfg

    def parallelize(self, model: torch.nn.Module, *, world_size: int = 1, device=None, trainable: bool = True) -> torch.nn.Module:
        return model
