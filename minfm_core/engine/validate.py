"""Validation loss at fixed, stratified timesteps.

Sample ``g`` of the validation set always gets ``t = (g + 0.5) / N`` and noise seeded
by ``g``: the number is comparable across runs, world sizes and batch sizes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .pipeline import per_sample_loss, prepare_batch
from .runtime import indexed_seed


@torch.no_grad()
def validation_loss(pipe, dataset, *, num_samples: int, batch_size: int, seed: int, rank: int, world_size: int,
                    device: torch.device) -> float:
    """The mean loss over the first ``num_samples`` items of ``dataset`` (all ranks together)."""
    n = min(num_samples, len(dataset))
    mine = list(range(rank, n, world_size))
    total = torch.zeros(2, dtype=torch.float64, device=device)
    pipe.denoiser.eval()
    # Every rank runs the same number of batches (sharded modules gather collectively);
    # a rank short of items repeats one and does not count it.
    per_rank = -(-n // world_size)
    for start in range(0, per_rank, batch_size):
        idx = mine[start : start + batch_size]
        real = len(idx)
        idx = idx or [0]
        samples = [dataset[g] for g in idx]
        t = torch.tensor([(g + 0.5) / n for g in idx])
        seeds = [indexed_seed(seed, g) for g in idx]
        batch = prepare_batch(pipe, samples, torch.Generator(), text_dropout=0.0, t=t, noise_seeds=seeds,
                              indices=idx)
        losses = per_sample_loss(pipe, batch)[:real]
        total += torch.stack([losses.sum().double(), torch.tensor(float(real), dtype=torch.float64, device=device)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    pipe.denoiser.train()
    return float(total[0] / total[1].clamp(min=1))
