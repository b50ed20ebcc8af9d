"""Images and clips of different lengths in one pack: one training step's loss is the mean of the
per-sample losses computed one sample at a time (no cross-sample attention, no padding)."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import tiny
from minfm_core.engine.pipeline import per_sample_loss, prepare_batch
from minfm_core.engine.train import Trainer

MIX = ("data={name = 'mix', sources = ["
       "{dataset = {name = 'shapes', sizes = [[16, 16], [16, 24]], size_multiple = 8}},"
       "{dataset = {name = 'moving_shapes', frames = 5, sizes = [[16, 16]], size_multiple = 8}},"
       "{dataset = {name = 'moving_shapes', frames = 3, sizes = [[16, 24]], size_multiple = 8}}]}")


def test_one_step_on_a_mixed_pack_equals_the_samples_one_at_a_time(tmp_path, runtime):
    trainer = Trainer(tiny(tmp_path / "run", MIX, "train.batch_size=6", "train.total_batch_size=6",
                           "train.text_dropout=0.0"), runtime)
    ds = trainer.dataset
    # two pictures of different sizes, clips of 5 and 3 frames: six samples, four shapes
    picks: dict[tuple, list[int]] = {}
    for i in range(200):  # the first two items of each (source, size)
        k, j = ds.locate(i)
        key = (k, tuple(ds.sources[k][j]["image"].shape)) if k == 0 else (k,)
        picks.setdefault(key, []).append(i)
    pictures = sorted(key for key in picks if key[0] == 0)
    assert len(pictures) == 2  # 16x16 and 16x24
    order = [picks[pictures[0]][0], picks[(1,)][0], picks[(2,)][0], picks[pictures[1]][0], picks[(1,)][1], picks[(2,)][1]]
    samples = [ds[i] for i in order]
    assert sorted({tuple(s["image"].shape[1:]) for s in samples}) == [(1, 16, 16), (1, 16, 24), (3, 16, 24), (5, 16, 16)]
    t = torch.tensor([0.15, 0.3, 0.45, 0.6, 0.75, 0.9])
    seeds = [11, 12, 13, 14, 15, 16]

    with torch.no_grad():
        pack = prepare_batch(trainer.pipe, samples, trainer.generator, 0.0, t=t, noise_seeds=seeds)
        # every token is one sample's: lengths add up with nothing in between
        assert pack.x_t.shape[0] == int(pack.lens.sum())
        assert pack.lens.tolist() == [trainer.pipe.patchifier.num_tokens(tuple(trainer.pipe.latent_shape(
            tuple(s["image"].shape[1:])))) for s in samples]
        packed = per_sample_loss(trainer.pipe, pack)
        alone = torch.cat([
            per_sample_loss(trainer.pipe, prepare_batch(trainer.pipe, [s], trainer.generator, 0.0,
                                                        t=t[i : i + 1], noise_seeds=[seeds[i]]))
            for i, s in enumerate(samples)
        ])
    diff = float((packed - alone).abs().max())
    assert diff < 1e-5, (packed, alone)

    # The optimizer step's loss is the mean of those per-sample losses (uniform weights, one micro-batch).
    trainer.batches = iter([samples])
    trainer.make_batch = lambda s: prepare_batch(trainer.pipe, s, trainer.generator, 0.0, t=t, noise_seeds=seeds)
    metrics = trainer.train_step()
    assert metrics["loss"] == pytest.approx(float(alone.mean()), rel=1e-5, abs=1e-7)
    assert metrics["skipped"] == 0.0
    trainer.close()
