"""Validation loss at fixed, stratified timesteps.

Sample ``g`` of the validation set always gets ``t = (g + 0.5) / N`` and noise seeded
by ``g``: the number is comparable across runs, world sizes and batch sizes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .pipeline import per_sample_loss, prepare_batch


@torch.no_grad()
def validation_loss(trainer) -> float:
    cfg, rt = trainer.cfg, trainer.rt
    dataset = trainer.val_dataset()
    n = min(cfg.val_num_samples, len(dataset))
    mine = list(range(rt.rank, n, rt.world_size))
    total = torch.zeros(2, dtype=torch.float64, device=rt.device)
    trainer.model.eval()
    # Every rank runs the same number of batches (sharded modules gather collectively);
    # a rank short of items repeats one and does not count it.
    per_rank = -(-n // rt.world_size)
    for start in range(0, per_rank, cfg.batch_size):
        idx = mine[start : start + cfg.batch_size]
        real = len(idx)
        idx = idx or [0]
        samples = [dataset[g] for g in idx]
        t = torch.tensor([(g + 0.5) / n for g in idx])
        seeds = [trainer.recipe.run.seed * 1_000_003 + g for g in idx]
        batch = prepare_batch(trainer.pipe, samples, torch.Generator(), text_dropout=0.0, t=t, noise_seeds=seeds)
        losses = per_sample_loss(trainer.pipe, batch)[:real]
        total += torch.stack([losses.sum().double(), torch.tensor(float(real), dtype=torch.float64, device=rt.device)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    trainer.model.train()
    return float(total[0] / total[1].clamp(min=1))
