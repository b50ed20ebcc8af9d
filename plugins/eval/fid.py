"""The ``fid`` image metric: FID of generated images against a reference set.

Registered through ``register_metrics``; the trainer's in-training FID (``train.fid_every``)
builds it by name and drives it (sampling, sharding over ranks, gathering), so the numbers
are those of ``minfm eval``: the same extractor, the same pool features, the same distance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from minfm_core.errors import MinfmError

from .evaluate import Extractor, check_finite, check_widths, extract_features, load_extractor
from .inputs import image_batches
from .metrics import feature_stats, frechet_distance


class FidMetric:
    """Pool features of an extractor (Inception unless ``extractor`` names a ``MODULE:ATTR`` factory)."""

    def __init__(self, ref: str | Path, *, extractor: str | None = None, weights: str | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.ref = Path(ref)
        count, _ = image_batches(self.ref, 1)  # a clear error for a bad reference; reads no pixels
        if count < 2:
            raise MinfmError(f"{self.ref}: FID needs at least 2 reference images, found {count}")
        if extractor:
            self.extractor: Extractor = load_extractor(extractor, "extractor")
        else:
            from .inception import InceptionFeatures

            self.extractor = InceptionFeatures(weights, device=device)

    def features(self, images: torch.Tensor) -> np.ndarray:
        """uint8 (N, 3, H, W) images -> (N, D) float32 pool features."""
        features = self.extractor(images)["pool"].detach().float().cpu().numpy().reshape(images.shape[0], -1)
        check_finite(features, "generated samples")
        return features

    def reference_features(self, *, batch_size: int, shard: tuple[int, int] = (0, 1)) -> np.ndarray:
        """Pool features of the reference batches ``i, i + k, ...`` for ``shard=(i, k)``."""
        return extract_features(self.ref, self.extractor, batch_size=batch_size, shard=shard)["pool"]

    def stats(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The summary a distance compares (mean and covariance); the reference's is kept, not its features."""
        return feature_stats(features)

    def distance(self, samples: tuple[np.ndarray, np.ndarray], reference: tuple[np.ndarray, np.ndarray]) -> float:
        check_widths("features", samples[0][None], reference[0][None])  # the means: one entry per feature
        return frechet_distance(*samples, *reference)
