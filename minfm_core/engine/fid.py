"""In-training FID: EMA samples of the val split's prompts against reference images.

    [train]
    fid_every = 20000
    fid_num_samples = 5000
    fid_ref = "VIRTUAL_imagenet256_labeled.npz"

Sample ``g`` (of ``fid_num_samples``) takes the prompt of val item ``g`` and seed
``sample.seed + g``, with the recipe's sampler, guidance and ``sample.size``. Those are
the seeds ``minfm sample --prompt-file P --n 1 --npz`` gives the same prompts, so the
logged number is the one ``minfm eval imagenet samples.npz --ref REF`` reports for a
checkpoint of that step: samples are batched as it batches them, at any world size (a
batch is drawn together). Ranks draw and featurise whole batches (and, once, a share of the
reference images); rank 0 gathers the features and computes the FID.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..errors import MinfmError
from ..eval.evaluate import Extractor, extract_features, load_extractor
from ..eval.inputs import image_batches
from ..eval.metrics import feature_stats, frechet_distance
from .generate import generate, to_pil
from .sample import plan_batches, rank_share


class TrainingFid:
    """Built when the trainer starts, so a bad reference or extractor fails before step 1."""

    def __init__(self, trainer):
        cfg = trainer.cfg
        self.ref = Path(cfg.fid_ref)
        if not self.ref.exists():
            raise MinfmError(f"train.fid_ref: {self.ref}: no such file or folder")
        count, _ = image_batches(self.ref, 1)  # readable images of one layout, or a clear error
        if count < 2:
            raise MinfmError(f"train.fid_ref: {self.ref}: FID needs at least 2 reference images, found {count}")
        if cfg.fid_extractor:
            self.extractor: Extractor = load_extractor(cfg.fid_extractor, "train.fid_extractor")
        else:
            from ..eval.inception import InceptionFeatures

            self.extractor = InceptionFeatures(cfg.fid_inception, device=trainer.rt.device)
        # The batches of `minfm sample --n 1` (fixed whatever the world size: a batch is drawn
        # together), dealt to ranks as it deals them. Prompts of this rank's samples only (and
        # of sample 0, the filler of a rank short of batches); `prompt(i)` when the dataset can
        # give one without the picture.
        dataset, rt = trainer.val_dataset(), trainer.rt
        self.batches = [[g for g, _ in b] for b in plan_batches(cfg.fid_num_samples, 1, trainer.recipe.sample.batch_size)]
        self.mine, self.rounds = rank_share(list(range(len(self.batches))), rt.rank, rt.world_size)
        read = getattr(dataset, "prompt", None) or (lambda i: dataset[i]["prompt"])
        self.prompts = {g: read(g % len(dataset)) for g in [0, *(g for b in self.mine for g in self.batches[b])]}
        self.ref_ready = False
        self.ref_stats: tuple[np.ndarray, np.ndarray] | None = None  # rank 0

    def features(self, images: list[torch.Tensor]) -> np.ndarray:
        # Through PIL like `minfm sample`: the same uint8 pixels as the files it writes.
        u8 = torch.stack([torch.from_numpy(np.array(to_pil(im))) for im in images]).permute(0, 3, 1, 2)
        return self.extractor(u8)["pool"].detach().float().cpu().numpy().reshape(len(images), -1)

    @torch.no_grad()
    def __call__(self, trainer) -> float | None:
        """FID at this step (rank 0; None on the other ranks)."""
        rt, s = trainer.rt, trainer.recipe.sample
        index, feats = [], []
        ctx = trainer.ema.swapped_in(trainer.model) if trainer.ema is not None else nullcontext()
        trainer.model.eval()
        with ctx:
            # Every rank makes the same number of sampler calls (sharded modules gather
            # collectively); a rank short of batches draws sample 0 and ignores it.
            for r in range(self.rounds):
                idx = self.batches[self.mine[r]] if r < len(self.mine) else []
                draw = idx or [0]
                images = generate(trainer.pipe, [self.prompts[g] for g in draw], sizes=[tuple(s.size)] * len(draw),
                                  seeds=[s.seed + g for g in draw], steps=s.steps, neg_prompt=s.neg_prompt,
                                  distilled_guidance=s.distilled_guidance)
                if idx:
                    index += idx
                    feats.append(self.features(images))
        trainer.model.train()
        parts = _gather((index, np.concatenate(feats) if feats else None))
        if not self.ref_ready:  # every rank, once: each featurises a share of the reference
            ref = _gather(extract_features(self.ref, self.extractor, batch_size=max(s.batch_size, 16),
                                           shard=(rt.rank, rt.world_size))["pool"])
            if rt.is_main:
                self.ref_stats = feature_stats(np.concatenate([r for r in ref if r.shape[0]]))
            self.ref_ready = True
        if not rt.is_main:
            return None
        order = np.argsort(np.concatenate([np.asarray(i, dtype=np.int64) for i, _ in parts]))
        pool = np.concatenate([f for _, f in parts if f is not None])[order]
        return frechet_distance(*feature_stats(pool), *self.ref_stats)


def _gather(obj) -> list:
    """Every rank's ``obj`` (our own processes' arrays), in rank order."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, obj)
        return parts
    return [obj]
