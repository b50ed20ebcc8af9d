"""Configs of the attention backends (no torch import here: plugin loading stays fast)."""

from __future__ import annotations

from minfm_core.config import config, field


@config
class SdpaConfig:
    """PyTorch scaled_dot_product_attention, one padded call per bucket of similar lengths (reference; CPU and GPU)."""


@config
class FlashAttnConfig:
    """flash-attn 2 varlen kernel (CUDA, fp16/bf16; pip install flash-attn)."""


@config
class FlashAttn3Config:
    """flash-attn 3 varlen kernel for Hopper GPUs (module flash_attn_interface)."""


@config
class TorchVarlenConfig:
    """PyTorch's own varlen flash kernel, torch.nn.attention.varlen (CUDA, fp16/bf16)."""


@config
class FlexConfig:
    """PyTorch flex_attention with a block-diagonal document mask."""

    compile: bool = field(True, doc="torch.compile the flex kernel (uncompiled flex is a slow reference)")


@config
class AutoConfig:
    """The fastest available backend for the tensors' device and dtype (sdpa on CPU)."""
