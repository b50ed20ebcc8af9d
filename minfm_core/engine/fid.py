"""In-training FID: EMA samples of the val split's prompts against reference images.

    [train]
    fid_every = 20000
    fid_num_samples = 5000
    fid_ref = "reference_images.npz"

Sample ``g`` (of ``N = fid_num_samples``) takes the prompt of val item :func:`val_item`
``(g, N, V)`` (``g * V // N`` of the ``V`` val items: spread over the whole split, which is
in class order, not its first ``N``) and seed ``sample.seed + g``, with the recipe's sampler,
guidance and ``sample.size``. Those are
the seeds ``minfm sample --prompt-file P --n 1 --npz`` gives the same prompts, so the
returned number is the FID ``minfm eval`` (the eval plugin) reports for a
checkpoint of that step: samples are batched as it batches them, at any world size (a batch
is drawn together). Ranks draw and featurise whole batches (and, once, a share of the
reference images); rank 0 gathers the features and computes the FID.

The metric itself (network, features, distance) comes from a plugin, asked for by name
through ``register_metrics`` (:mod:`minfm_core.metrics`); this module only samples, shards
and gathers. It takes its inputs explicitly and returns the value: the Trainer logs it.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..errors import MinfmError
from ..metrics import build_metric
from ..protocols import Metric
from .generate import generate, to_pil
from .sample import plan_batches, rank_share


def val_item(g: int, n: int, size: int) -> int:
    """The val item whose prompt sample ``g`` of ``n`` takes, of a split of ``size`` items:
    evenly spread. The first ``n`` items of a val split in class order are its first classes
    only (5,000 of 50,000 items at 50 per class: 100 of 1,000 classes)."""
    return g * size // n if n <= size else g % size


class TrainingFid:
    """Built when the trainer starts, so a bad reference or extractor fails before step 1.

    ``train``: the recipe's ``[train]`` section (``fid_*``); ``sample``: its ``[sample]``
    section; ``dataset``: the val split, whose prompts are drawn; ``rt``: the runtime.
    """

    def __init__(self, train, sample, dataset, rt):
        self.sample, self.rt = sample, rt
        ref = Path(train.fid_ref)
        if not ref.exists():
            raise MinfmError(f"train.fid_ref: {ref}: no such file or folder")
        try:
            self.metric: Metric = build_metric(train.fid_metric, str(ref), extractor=train.fid_extractor,
                                               weights=train.fid_inception, device=rt.device)
        except MinfmError as exc:  # the plugin's message names the file or setting; the path says whose
            raise MinfmError(f"train.fid: {exc}") from None
        # The batches of `minfm sample --n 1` (fixed whatever the world size: a batch is drawn
        # together), dealt to ranks as it deals them. Prompts of this rank's samples only (and
        # of sample 0, the filler of a rank short of batches), through the declared
        # `Dataset.prompt(i)` (no picture decoded for thousands of prompts).
        self.batches = [[g for g, _ in b] for b in plan_batches(train.fid_num_samples, 1, sample.batch_size)]
        self.mine, self.rounds = rank_share(list(range(len(self.batches))), rt.rank, rt.world_size)
        n, size = train.fid_num_samples, len(dataset)
        self.prompts = {g: dataset.prompt(val_item(g, n, size))
                        for g in [0, *(g for b in self.mine for g in self.batches[b])]}
        # The reference is read and featurised now, each rank a share: read first at the first
        # FID step, a damaged file stopped the run there, hours in (features are needed then
        # anyway, so this moves the cost, it adds none).
        ref = _gather(self.metric.reference_features(batch_size=max(sample.batch_size, 16),
                                                     shard=(rt.rank, rt.world_size)))
        self.ref_stats = self.metric.stats(np.concatenate([r for r in ref if r.shape[0]])) if rt.is_main else None

    def features(self, images: list[torch.Tensor]) -> np.ndarray:
        # Through PIL like `minfm sample`: the same uint8 pixels as the files it writes.
        u8 = torch.stack([torch.from_numpy(np.array(to_pil(im))) for im in images]).permute(0, 3, 1, 2)
        return self.metric.features(u8)

    @torch.no_grad()
    def __call__(self, pipe, ema=None) -> float | None:
        """FID of ``pipe``'s denoiser (with ``ema``'s weights swapped in) on rank 0; None on the others."""
        rt, s = self.rt, self.sample
        index, feats = [], []
        model = pipe.denoiser
        ctx = ema.swapped_in(model) if ema is not None else nullcontext()
        model.eval()
        with ctx:
            # Every rank makes the same number of sampler calls (sharded modules gather
            # collectively); a rank short of batches draws sample 0 and ignores it.
            for r in range(self.rounds):
                idx = self.batches[self.mine[r]] if r < len(self.mine) else []
                draw = idx or [0]
                images = generate(pipe, [self.prompts[g] for g in draw], sizes=[tuple(s.size)] * len(draw),
                                  seeds=[s.seed + g for g in draw], steps=s.steps, neg_prompt=s.neg_prompt,
                                  distilled_guidance=s.distilled_guidance)
                if idx:
                    index += idx
                    feats.append(self.features(images))
        model.train()
        parts = _gather((index, np.concatenate(feats) if feats else None))
        if not rt.is_main:
            return None
        order = np.argsort(np.concatenate([np.asarray(i, dtype=np.int64) for i, _ in parts]))
        pool = np.concatenate([f for _, f in parts if f is not None])[order]
        return self.metric.distance(self.metric.stats(pool), self.ref_stats)


def _gather(obj) -> list:
    """Every rank's ``obj`` (our own processes' arrays), in rank order."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, obj)
        return parts
    return [obj]
