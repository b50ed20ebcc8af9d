"""The ADM suite's sample-quality metrics, computed from Inception features (numpy/torch, no network).

Inception Score from the unbiased logits, FID from the pool features, sFID from the
spatial features, and improved precision/recall (Kynkaanniemi et al. 2019) with k = 3
nearest neighbours, the definitions of guided-diffusion's ``evaluations/evaluator.py``.
"""

from __future__ import annotations

import numpy as np
import torch


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, float64) of an (N, D) feature matrix."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need an (N >= 2, D) feature matrix, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians.

    tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2): the inner matrix is symmetric PSD,
    so symmetric eigendecompositions suffice (no complex sqrtm, no singular-matrix retries).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    r1 = _psd_sqrt(s1)
    inner = np.linalg.eigvalsh(_sym(r1 @ s2 @ r1))
    tr_covmean = float(np.sqrt(np.clip(inner, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def _sym(a: np.ndarray) -> np.ndarray:
    return (a + a.T) / 2


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """exp E_x KL(p(y|x) || p(y)), averaged over consecutive splits of ``split_size`` (ADM: 5000)."""
    x = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    p, log_p = x.softmax(dim=1), x.log_softmax(dim=1)
    scores = []
    for i in range(0, x.shape[0], split_size):
        part, log_part = p[i : i + split_size], log_p[i : i + split_size]
        log_marginal = part.mean(dim=0, keepdim=True).log()
        kl = (part * (log_part - log_marginal)).sum(dim=1)
        scores.append(float(kl.mean().exp()))
    return float(np.mean(scores))


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]).clamp_min(0)


def manifold_radii(x: torch.Tensor, k: int = 3, batch: int = 2048) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest other point."""
    out = []
    for i in range(0, x.shape[0], batch):
        d = _sq_dists(x[i : i + batch], x)
        # The point itself is its own nearest neighbour (distance 0): take the (k+1)-th smallest.
        out.append(d.kthvalue(k + 1, dim=1).values)  # (callers hold k + 1 points or more)
    return torch.cat(out)


def _coverage(points: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor, batch: int) -> float:
    """Fraction of ``points`` inside the union of balls (manifold_i, radius_i)."""
    inside = []
    for i in range(0, points.shape[0], batch):
        d = _sq_dists(points[i : i + batch], manifold)
        inside.append((d <= radii[None]).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, batch: int = 2048,
                     device: str | torch.device = "cpu") -> tuple[float, float]:
    """Improved precision (fake inside the real manifold) and recall (real inside the fake manifold)."""
    # float32 like the ADM suite: rows of 2048 x 50k distances stay ~0.4 GB. But |a|^2 - 2ab + |b|^2
    # in float32 cancels catastrophically for features far from the origin (an offset of 1e4
    # turns every distance into rounding noise), so both sets are first moved to the reference's
    # mean, in float64: distances do not change under a common translation.
    center = np.asarray(real).mean(axis=0, dtype=np.float64)
    r = torch.as_tensor(_centered(real, center), device=device)
    f = torch.as_tensor(_centered(fake, center), device=device)
    r_radii, f_radii = manifold_radii(r, k, batch), manifold_radii(f, k, batch)
    return _coverage(f, r, r_radii, batch), _coverage(r, f, f_radii, batch)


def _centered(x: np.ndarray, center: np.ndarray, rows: int = 4096) -> np.ndarray:
    """float32 ``x - center``, subtracted in float64 a block of rows at a time (no float64 copy of ``x``)."""
    x = np.asarray(x)
    out = np.empty(x.shape, np.float32)
    for i in range(0, x.shape[0], rows):
        out[i : i + rows] = x[i : i + rows].astype(np.float64) - center
    return out
