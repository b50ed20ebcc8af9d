"""Built-in plugin 'attention': backends for packed variable-length sequences.

Every backend is called as ``backend(q, k, v, cu_seqlens, max_seqlen)`` with
``q, k, v`` of shape ``(L, H, D)`` (all samples packed, no padding) and returns
``(L, H, D)``; tokens attend only within their own sample. CUDA kernels are imported
when first called, so the plugin loads and runs on a CPU-only machine.
"""

from minfm_core import hookimpl

from . import config as c

_MOD = "minfm_plugins.attention.backends"


@hookimpl
def register_attention_backends(register):
    register("sdpa", f"{_MOD}:Sdpa", c.SdpaConfig)
    register("flash_attn", f"{_MOD}:FlashAttn", c.FlashAttnConfig)
    register("flash_attn3", f"{_MOD}:FlashAttn3", c.FlashAttn3Config)
    register("torch_varlen", f"{_MOD}:TorchVarlen", c.TorchVarlenConfig)
    register("flex", f"{_MOD}:Flex", c.FlexConfig)
    register("auto", f"{_MOD}:Auto", c.AutoConfig)
