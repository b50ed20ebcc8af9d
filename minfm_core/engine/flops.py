"""Peak dense bf16 matmul rates, for the MFU estimate printed while training on GPUs."""

from __future__ import annotations

import torch

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, in FLOP/s.
_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}


def peak_flops(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device)
    for key, peak in _PEAKS.items():
        if key in name:
            return peak
    return None
