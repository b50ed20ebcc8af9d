"""Exponential moving average of the trainable parameters.

The EMA tensors are clones of the parameters, so under FSDP2 they are DTensors with
the same sharding: no rank ever holds a gathered copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = {n: params[n].detach().clone().float() for n in self.names}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        _reshard(model)
        params = dict(model.named_parameters())
        shadow = [self.shadow[n] for n in self.names]
        current = [params[n].detach().float() for n in self.names]
        torch._foreach_lerp_(shadow, current, 1.0 - self.decay)

    @torch.no_grad()
    def reset(self, model: torch.nn.Module) -> None:
        """Start over from ``model``'s parameters (after they were loaded from elsewhere)."""
        _reshard(model)
        params = dict(model.named_parameters())
        for n in self.names:
            self.shadow[n].copy_(params[n].detach())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load EMA values: DTensors (a checkpoint's shards) or full tensors (an exported
        ``ema.safetensors``), which a sharded EMA takes its own shard of: copy_ refused to mix
        a full tensor into a DTensor (init_from an exported folder under FSDP2)."""
        for n in self.names:
            value, shadow = state[n], self.shadow[n]
            if hasattr(shadow, "device_mesh") and not hasattr(value, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                # every rank read the same file: each keeps its shard, nothing is sent
                value = distribute_tensor(value.to(shadow.device, shadow.dtype), shadow.device_mesh,
                                          shadow.placements, src_data_rank=None)
            shadow.copy_(value)

    @contextlib.contextmanager
    def swapped_in(self, model: torch.nn.Module) -> Iterator[None]:
        """Temporarily run ``model`` with the EMA weights (for in-training samples)."""
        _reshard(model)
        params = dict(model.named_parameters())
        backup = {n: params[n].detach().clone() for n in self.names}
        with torch.no_grad():
            for n in self.names:
                params[n].copy_(self.shadow[n])
        try:
            yield
        finally:
            _reshard(model)
            with torch.no_grad():
                for n in self.names:
                    params[n].copy_(backup[n])


def _reshard(model: torch.nn.Module) -> None:
    """Under FSDP2 a forward without backward can leave parameters gathered (plain tensors);
    reshard so that named_parameters() gives the DTensor shards the EMA mirrors."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
