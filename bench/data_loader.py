"""Training batches per second from JPEGs: the training process alone vs data workers.

    python bench/data_loader.py [--images 256] [--batch 32] [--workers 2] [--batches 6]

Writes ``--images`` ImageNet-like JPEGs (500 x 375, quality 90, captioned) to a temporary
``image_folder``, which resizes each to 256 x 256 pixels (``max_pixels = 65536``), and draws
micro-batches through ``minfm_core.data_loader.BatchIterator`` as training does
(``train.dataloader_num_workers``): 0 workers, then ``--workers``, alternating, twice each;
best of the two. Prints images/s and the ratio. Nothing else runs here: in a training
process the workers decode while the step computes, which is the point of them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from cattrs import structure
from PIL import Image

from minfm_core.data_loader import BatchIterator
from minfm_core.registry import get_registry


def write_images(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        # Blocks of flat colour with noise: JPEG sizes (~60 KB) like photographs', not like pure noise.
        base = rng.integers(0, 256, (47, 63, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)[:375, :500]
        noisy = np.clip(base.astype(np.int16) + rng.integers(-12, 13, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(root / f"{i:05d}.jpg", quality=90)
        (root / f"{i:05d}.txt").write_text("a picture")


def images_per_s(dataset, batch: int, workers: int, batches: int) -> float:
    it = BatchIterator(dataset, batch, num_workers=workers, seed=0)
    try:
        next(it)  # workers started, their first batches under way
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        return batch * batches / (time.perf_counter() - start)
    finally:
        it.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=6)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_images(Path(tmp), args.images)
        comp = get_registry().get("dataset", "image_folder")
        cfg = structure({"root": tmp, "max_pixels": 256 * 256, "val_fraction": 0.0}, comp.config)
        dataset = comp.build(cfg, split="train")
        best = {0: 0.0, args.workers: 0.0}
        for _ in range(2):
            for w in best:
                best[w] = max(best[w], images_per_s(dataset, args.batch, w, args.batches))
    base, with_workers = best[0], best[args.workers]
    print(f"0 workers: {base:7.1f} images/s")
    print(f"{args.workers} workers: {with_workers:7.1f} images/s  ({with_workers / base:.2f}x)")


if __name__ == "__main__":
    main()
