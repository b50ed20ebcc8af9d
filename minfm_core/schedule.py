"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_lr`` (the seed's trainer)."""

from __future__ import annotations

import math

from .errors import MinfmError


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based: the number of steps already taken).

    - warm-up, ``step < warmup_steps``: ``lr * (step + 1) / warmup_steps`` (the first step is
      not wasted at lr 0; step ``warmup_steps - 1`` reaches ``lr``);
    - then cosine from ``lr`` at ``warmup_steps`` to ``min_lr`` at ``max_steps``;
    - ``min_lr`` from ``max_steps`` on (training past the plan keeps the floor).
    """
    if step < 0 or warmup_steps < 0 or max_steps < 0:
        raise MinfmError(f"lr schedule: step {step}, warmup_steps {warmup_steps}, max_steps {max_steps} must be >= 0")
    if min_lr > lr:
        raise MinfmError(f"lr schedule: min_lr {min_lr} is above the peak lr {lr}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr if max_steps > warmup_steps else lr
    progress = (step - warmup_steps) / (max_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
