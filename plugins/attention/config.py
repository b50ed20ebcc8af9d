"""Configs of the attention backends (no torch import here: plugin loading stays fast).

``needs_cuda`` (read by ``minfm check`` and a job's start-up checks): the jobs (``train``,
``sample``) a backend cannot run on the CPU, so that a CPU run is refused before any work.
"""

from __future__ import annotations

from minfm_core.config import config, field


@config
class SdpaConfig:
    """PyTorch scaled_dot_product_attention, one padded call per bucket of similar lengths (reference; CPU and GPU)."""


@config
class FlashAttnConfig:
    """flash-attn 2 varlen kernel (CUDA, fp16/bf16; pip install flash-attn)."""

    @property
    def needs_cuda(self) -> tuple[str, ...]:
        return ("train", "sample")  # a CUDA kernel


@config
class FlashAttn3Config:
    """flash-attn 3 varlen kernel for Hopper GPUs (module flash_attn_interface)."""

    @property
    def needs_cuda(self) -> tuple[str, ...]:
        return ("train", "sample")  # a CUDA kernel


@config
class TorchVarlenConfig:
    """PyTorch's own varlen flash kernel, torch.nn.attention.varlen (CUDA, fp16/bf16)."""

    @property
    def needs_cuda(self) -> tuple[str, ...]:
        return ("train", "sample")  # a CUDA kernel


@config
class FlexConfig:
    """PyTorch flex_attention with a block-diagonal document mask."""

    compile: bool = field(True, doc="torch.compile the flex kernel (uncompiled flex is a slow reference)")

    @property
    def needs_cuda(self) -> tuple[str, ...]:
        return ("train",)  # flex_attention has no backward on the CPU; its forward runs there


@config
class AutoConfig:
    """The fastest available backend for the tensors' device and dtype (sdpa on CPU)."""
