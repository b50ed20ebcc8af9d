"""FSDP2: ``fully_shard`` over a (replicate x shard) device mesh, with mixed precision.

Works the same on CPU (gloo) and GPU (NCCL). Blocks are sharded in groups of
``blocks_per_shard_group`` (each group one all-gather), then the root. Activation
checkpointing wraps every ``ac_freq``-th block's forward in place, so parameter names
(and therefore checkpoints) do not depend on it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from minfm_core.errors import MinfmError
from minfm_core.weights import DTYPES



def build_mesh(world_size: int, shard_size: int, device: torch.device):
    shard = world_size if shard_size in (-1, 0) else shard_size
    if world_size % shard:
        raise MinfmError(f"parallel.shard_size: world size {world_size} is not divisible by shard_size {shard}")
    kind = "cuda" if device.type == "cuda" else "cpu"
    if shard == world_size:
        return init_device_mesh(kind, (world_size,), mesh_dim_names=("shard",))
    # HSDP: replicate across groups of `shard` ranks, shard within each group.
    return init_device_mesh(kind, (world_size // shard, shard), mesh_dim_names=("replicate", "shard"))


def _checkpointed(block: nn.Module) -> None:
    inner = block.forward

    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    block.forward = forward


class Fsdp2:
    def __init__(self, cfg):
        self.cfg = cfg

    def policy(self, trainable: bool = True) -> MixedPrecisionPolicy:
        """The recipe's mixed precision for the model trained; none for a frozen encoder, sharded
        for memory only: it computes in its own dtype (its recipe's ``dtype``), as it does
        unsharded in a world of one (the ``vocab`` tables ran in bf16 on 2 processes only)."""
        if not trainable:
            return MixedPrecisionPolicy()
        return MixedPrecisionPolicy(param_dtype=DTYPES[self.cfg.param_dtype], reduce_dtype=DTYPES[self.cfg.reduce_dtype])

    def parallelize(self, model: nn.Module, *, world_size: int = 1, device=None, trainable: bool = True) -> nn.Module:
        cfg = self.cfg
        mesh = build_mesh(world_size, cfg.shard_size, torch.device(device or "cpu"))
        blocks = list(getattr(model, "blocks", []))
        if trainable and cfg.ac_freq > 0:
            for i, block in enumerate(blocks):
                if i % cfg.ac_freq == 0:
                    _checkpointed(block)
        # Frozen encoders are sharded for memory only: always reshard after forward.
        policy = {"default": None, "always": True, "never": False}[cfg.reshard_after_forward]
        size = max(1, cfg.blocks_per_shard_group)
        groups = [blocks[i : i + size] for i in range(0, len(blocks), size)]
        for k, group in enumerate(groups):
            # The last group is needed again first in backward: keep it gathered by default.
            reshard = policy if policy is not None else (k < len(groups) - 1 or not trainable)
            fully_shard(group if len(group) > 1 else group[0], mesh=mesh, mp_policy=self.policy(trainable),
                        reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, mp_policy=self.policy(trainable),
                    reshard_after_forward=True if not trainable else bool(policy))
        return model
