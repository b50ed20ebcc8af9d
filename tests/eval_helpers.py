"""Evaluation test helpers: a small random-weight feature extractor (no Inception weights) and image sets."""

from __future__ import annotations

import numpy as np
import torch


class TinyExtractor:
    """Random conv features with the Inception extractor's output keys."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.conv1 = torch.randn(8, 3, 3, 3, generator=g) / 5
        self.conv2 = torch.randn(12, 8, 3, 3, generator=g) / 8
        self.fc = torch.randn(10, 12, generator=g)

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        x = images.float() / 127.5 - 1
        h = torch.relu(torch.nn.functional.conv2d(x, self.conv1, stride=2, padding=1))
        spatial = torch.nn.functional.adaptive_avg_pool2d(h[:, :3], 4).flatten(1)
        pool = torch.relu(torch.nn.functional.conv2d(h, self.conv2, padding=1)).mean((2, 3))
        return {"pool": pool, "spatial": spatial, "logits": pool @ self.fc.T}


def make_extractor() -> TinyExtractor:  # for --extractor / train.fid_extractor eval_helpers:make_extractor
    return TinyExtractor()


def images(n: int, seed: int, size: int = 16, shift: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.integers(0, 200, (n, size, size, 3)) + shift, 0, 255).astype(np.uint8)


def save_npz(path, arr) -> str:
    np.savez(path, arr_0=arr)
    return str(path)


class ReferenceOnlyExtractor(TinyExtractor):
    """Featurises the reference (its first call), then refuses: a failure at an FID step."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.calls > 1:
            from minfm_core.errors import MinfmError

            raise MinfmError("the extractor refuses the samples")
        return super().__call__(images)


def make_reference_only_extractor() -> ReferenceOnlyExtractor:
    return ReferenceOnlyExtractor()
