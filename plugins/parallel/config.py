"""Configs of the parallelizers."""

from __future__ import annotations

from typing import Literal

from minfm_core.config import Dtype, config, field
from minfm_core.launch_env import MAX_WORLD_SIZE
from minfm_core.validators import MAX_DEPTH, Range


@config
class NoParallelConfig:
    """One process: the model stays whole on its device."""


@config
class Fsdp2Config:
    """FSDP2 (fully_shard) over a replicate x shard mesh, with mixed precision."""

    shard_size: int = field(
        -1, doc="ranks per shard group (-1: all ranks; < world size gives HSDP)", validator=Range(1, MAX_WORLD_SIZE, also=(-1,))
    )
    param_dtype: Dtype = field("bf16", doc="dtype of gathered parameters in compute")
    reduce_dtype: Literal["fp32", "bf16"] = field("fp32", doc="dtype of gradient reduction")
    blocks_per_shard_group: int = field(1, doc="transformer blocks per fully_shard call", validator=Range(1, MAX_DEPTH))
    reshard_after_forward: Literal["default", "always", "never"] = field(
        "default", doc="free gathered parameters after forward (default: all but the last group)"
    )
    ac_freq: int = field(0, doc="activation checkpointing every N blocks (0: off)", validator=Range(0, MAX_DEPTH))
