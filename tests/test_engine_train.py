"""The trainer: accumulation, bad-gradient skipping, learning, exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from engine_helpers import losses, read_metrics, tiny
from minfm_core.engine.runtime import init_runtime, shutdown_runtime
from minfm_core.engine.train import Trainer, accumulation_steps, train
from minfm_core.errors import RecipeError


def test_accumulation_steps():
    assert accumulation_steps(32, 4, 2) == 4
    assert accumulation_steps(-1, 4, 2) == 1
    with pytest.raises(RecipeError, match="train.total_batch_size: 30 is not a positive multiple"):
        accumulation_steps(30, 4, 2)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_accumulation_equals_one_big_batch(tmp_path, runtime):
    """k micro-batches of b samples give the same update as one batch of k*b samples."""
    small = Trainer(tiny(tmp_path / "a", "train.batch_size=2", "train.total_batch_size=8", "train.text_dropout=0.0"), runtime)
    big = Trainer(tiny(tmp_path / "b", "train.batch_size=8", "train.total_batch_size=8", "train.text_dropout=0.0"), runtime)
    assert small.accum == 4 and big.accum == 1
    # Same samples in the same order, same noise: feed both from one fixed list.
    samples = [small.dataset[i] for i in range(8)]
    small.batches = iter([samples[0:2], samples[2:4], samples[4:6], samples[6:8]])
    big.batches = iter([samples])
    # Fix t and noise per sample (not per micro-batch draw) so both see identical inputs.
    from minfm_core.engine.pipeline import prepare_batch

    def fixed(trainer):
        def make(s):
            idx = [next(i for i, y in enumerate(samples) if y is x) for x in s]
            t = torch.tensor([(i + 0.5) / 8 for i in idx])
            return prepare_batch(trainer.pipe, s, trainer.generator, 0.0, t=t, noise_seeds=idx)
        return make

    small.make_batch, big.make_batch = fixed(small), fixed(big)
    m1, m2 = small.train_step(), big.train_step()
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5)
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4)
    p1, p2 = _params(small.model), _params(big.model)
    for n in p1:
        torch.testing.assert_close(p1[n], p2[n], rtol=1e-5, atol=1e-6)
    small.close()
    big.close()


def test_nan_loss_skips_step(tmp_path, runtime):
    trainer = Trainer(tiny(tmp_path), runtime)
    trainer.train_step()
    before, ema_before = _params(trainer.model), {k: v.clone() for k, v in trainer.ema.shadow.items()}
    real = trainer.loss_fn
    trainer.loss_fn = lambda batch: real(batch) * float("nan")
    metrics = trainer.train_step()
    assert metrics["skipped"] == 1.0 and math.isnan(metrics["loss"])
    after = _params(trainer.model)
    for n in before:
        assert torch.equal(before[n], after[n])
    for n in ema_before:
        assert torch.equal(ema_before[n], trainer.ema.shadow[n])
    assert all(p.grad is None for p in trainer.model.parameters())
    trainer.loss_fn = real
    assert trainer.train_step()["skipped"] == 0.0
    trainer.close()


def test_grad_spike_skips(tmp_path, runtime):
    trainer = Trainer(tiny(tmp_path, "train.grad_spike_start_step=0", "train.grad_spike_threshold=1.5"), runtime)
    trainer.train_step()
    real = trainer.loss_fn
    trainer.loss_fn = lambda batch: real(batch) * 1000.0
    assert trainer.train_step()["skipped"] == 1.0
    trainer.close()


def test_the_seeds_absolute_spike_rule(tmp_path, runtime):
    """The seed skips a step whose grad norm is above the threshold itself, running mean or
    not (flux_tiny_imagenet's rule); 0.5 is a valid absolute threshold, not a multiple."""
    trainer = Trainer(tiny(tmp_path, "train.grad_spike_start_step=1", 'train.grad_spike_rule="absolute"',
                           "train.grad_spike_threshold=0.5"), runtime)
    first = trainer.train_step()  # before the start step: never a spike
    assert first["skipped"] == 0.0 and first["grad_norm"] > 0.5
    real = trainer.loss_fn
    trainer.loss_fn = lambda batch: real(batch) * 1e-3  # a norm far below the running mean ...
    assert trainer.train_step()["skipped"] == 0.0
    trainer.loss_fn = lambda batch: real(batch) * 1.0  # ... and one above 0.5, near the mean
    step = trainer.train_step()
    assert step["skipped"] == 1.0 and step["grad_norm"] < 2 * trainer.norm_mean
    trainer.close()


def test_loss_decreases_and_resume_is_exact(tmp_path):
    """An uninterrupted 12-step run vs 6 steps + resume to 12: identical losses and weights.
    The interrupted run loads its data in 2 worker processes: the same batches."""
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    common = ["train.max_steps=12", "train.ckpt_every=6", "train.lr=3e-3", "train.warmup_steps=1"]
    workers = [*common, "train.dataloader_num_workers=2"]
    train(tiny(full_dir, *common))
    rt = init_runtime("cpu")
    try:
        interrupted = Trainer(tiny(split_dir, *workers), rt)
        interrupted.fit(until=6)  # saves at step 6 (ckpt_every), then stops as if killed
        interrupted.close()
    finally:
        shutdown_runtime()
    train(tiny(split_dir, *workers))  # resumes from step 6
    full, split = losses(full_dir), losses(split_dir)
    assert len(full) == 12 and len(split) == 12
    assert split == full
    assert sum(full[-3:]) / 3 < 0.8 * sum(full[:3]) / 3  # it learns

    from minfm_core import checkpoint as ck
    from minfm_core.recipe.schema import CHECKPOINT_PARTS

    a, b = ck.list_checkpoints(full_dir)[-1], ck.list_checkpoints(split_dir)[-1]
    assert a.name == b.name == "step_00000012"
    a, b = ck.open_checkpoint(a), ck.open_checkpoint(b)
    ta, _ = a.rank_extras(0)
    tb, _ = b.rank_extras(0)
    assert torch.equal(ta["generator"], tb["generator"])
    rt = init_runtime("cpu")
    try:
        ma = Trainer(tiny(tmp_path / "x", *common), rt)
        ma._load(a, {p: p for p in CHECKPOINT_PARTS}, exact=False)
        pa, ea = _params(ma.model), dict(ma.ema.shadow)
        ma._load(b, {p: p for p in CHECKPOINT_PARTS}, exact=False)
        pb, eb = _params(ma.model), dict(ma.ema.shadow)
        for n in pa:
            assert torch.equal(pa[n], pb[n]), n
            assert torch.equal(ea[n], eb[n]), n
        ma.close()
    finally:
        shutdown_runtime()
    assert [m["step"] for m in read_metrics(split_dir) if "loss" in m] == list(range(1, 13))


def test_fused_adamw_equals_reference():
    from types import SimpleNamespace

    from minfm_core.engine.train import make_adamw

    cfg = SimpleNamespace(lr=1e-2, adam_betas=(0.9, 0.95), weight_decay=0.1)
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(33, 7)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    fused = make_adamw(a, cfg)
    assert fused.defaults.get("fused")
    plain = torch.optim.AdamW(b, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay, foreach=False)
    for _ in range(5):
        g = [torch.randn_like(p) for p in a]
        for p, q, gg in zip(a, b, g):
            p.grad, q.grad = gg.clone(), gg.clone()
        fused.step()
        plain.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_a_val_split_that_cannot_be_read_fails_before_step_1(tmp_path, runtime):
    """Validation every 1000 steps on a folder with nothing held out used to fail at step 1000."""
    import json

    from PIL import Image

    from minfm_core.errors import MinfmError

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"picture {i}")
    data = f'data={{name = "image_folder", root = {json.dumps(str(folder))}, val_fraction = 0.0, size_multiple = 8}}'
    with pytest.raises(MinfmError) as err:
        Trainer(tiny(tmp_path / "run", data, "train.val_every=1000"), runtime)
    assert str(err.value) == (
        f"train.val_every = 1000 validates on the data's 'val' split: data: image_folder: no captioned images for split "
        f"'val' under {str(folder)!r} (train.val_every = 0 trains without validation)")
    assert not (tmp_path / "run" / "checkpoints").exists()
    trainer = Trainer(tiny(tmp_path / "run2", data, "train.val_every=0"), runtime)  # without validation: fine
    trainer.close()


def test_the_largest_seed_trains_validates_and_samples(tmp_path):
    """Every seed a recipe accepts works: derived seeds (validation noise, gallery images) used
    to overflow torch's generator for seeds past ~1.8e13 (seed * 1_000_003 + index)."""
    from minfm_core.validators import MAX_SEED

    seeds = [f"{key}={MAX_SEED}" for key in ("run.seed", "sample.seed", "data.seed", "model.text_encoder.seed")]
    out = tmp_path / "run"
    train(tiny(out, *seeds, "train.max_steps=3", "train.val_every=3", "train.sample_every=3", "train.ckpt_every=0"))
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics if "val_loss" in m] == [3]
    assert all(math.isfinite(m["val_loss"]) for m in metrics if "val_loss" in m)
    assert len(list((out / "samples").rglob("*.png"))) == 2  # one gallery image per prompt


def test_a_failure_while_closing_does_not_hide_the_error_that_stopped_the_run(tmp_path, monkeypatch):
    """A full disk failed the checkpoint (the real error), then the jsonl logger's loss plot
    failed too while closing: the user read only "No space left on device", with no file."""
    from minfm_core.errors import MinfmError
    from minfm_plugins.loggers.jsonl import JsonlLogger

    closed = []

    def fail_fit(self, until=None):
        raise MinfmError("checkpoint: cannot write (the previous checkpoints are intact)")

    def fail_close(self):
        closed.append(self)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Trainer, "fit", fail_fit)
    monkeypatch.setattr(JsonlLogger, "close", fail_close)
    with pytest.raises(MinfmError, match="cannot write"):
        train(tiny(tmp_path / "run"))
    assert closed  # still closed (every logger, even after one failed)


def test_a_resume_takes_the_optimizer_settings_from_the_recipe(tmp_path, capsys):
    """The moments come from the checkpoint; weight_decay / adam_betas from the recipe (a change
    made for the resume was silently dropped while recipe.toml recorded it), and it is said."""
    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=2", "train.ckpt_every=2"))
    rt = init_runtime("cpu")
    try:
        capsys.readouterr()
        Trainer(tiny(run, "train.max_steps=4"), rt).close()
        assert "optimizer settings" not in capsys.readouterr().out  # the same recipe: nothing to say
        changed = Trainer(tiny(run, "train.max_steps=4", "train.weight_decay=0.5", "train.adam_betas=[0.5, 0.6]"), rt)
        assert all(g["weight_decay"] == 0.5 and tuple(g["betas"]) == (0.5, 0.6) for g in changed.optimizer.param_groups)
        assert changed.optimizer.state  # the moments did come from the checkpoint
        changed.close()
    finally:
        shutdown_runtime()
    said = [ln for ln in capsys.readouterr().out.splitlines() if "optimizer settings from the recipe" in ln]
    assert len(said) == 1 and "weight_decay 0.0 -> 0.5" in said[0] and "betas" in said[0], said


def test_an_ema_turned_on_for_a_resume_starts_from_the_loaded_model(tmp_path, capsys):
    """It failed with "has no 'ema' to load (train.init_load_plan)", a setting the user never wrote."""
    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=2", "train.ckpt_every=2", "train.ema_decay=0"))
    rt = init_runtime("cpu")
    try:
        trainer = Trainer(tiny(run, "train.max_steps=4", "train.ema_decay=0.9"), rt)
        params = _params(trainer.model)
        assert trainer.step == 2 and all(torch.equal(trainer.ema.shadow[n], params[n]) for n in trainer.ema.names)
        trainer.close()
    finally:
        shutdown_runtime()
    assert "the checkpoint holds no EMA" in capsys.readouterr().out


def test_a_bug_in_a_plugins_logger_names_the_plugin(tmp_path):
    """A logger's log raising keeps its traceback (a bug), noted with whose logger it was."""
    from minfm_core import hookimpl, protocols
    from minfm_core.plugins import plugin

    class Broken(protocols.Logger):
        def __init__(self, *, run_dir, rank=0, recipe=None):
            pass

        def log(self, step, metrics):
            raise ZeroDivisionError("oops")

        def log_images(self, step, name, images, captions):
            pass

        def close(self):
            pass

    class P:
        @hookimpl
        def register_loggers(self, register):
            register("broken", Broken, doc="A logger with a bug.")

    with plugin(P(), "probe_plugin"):
        with pytest.raises(ZeroDivisionError) as info:
            train(tiny(tmp_path / "run", "train.max_steps=1", 'logging.loggers+=[{name = "broken"}]'))
    assert info.value.__notes__ == ["(raised by log of logger 'broken' of plugin 'probe_plugin')"]


def test_a_vae_sampling_its_posterior_resumes_exactly(tmp_path):
    """The posterior noise came from torch's global generator, which no checkpoint holds: a
    resumed run encoded its images with other noise, and its losses parted from the
    uninterrupted run's at the first step after the resume. Now it is drawn per sample."""
    vae = ("model.vae={name = 'wan', pretrained = '', base_dim = 8, z_dim = 4, dim_mult = [1, 1, 1, 1], "
           "num_res_blocks = 1, temperal_downsample = [false, true, true], sample_posterior = true}")
    common = [vae, "model.denoiser.d_img=16", "data.sizes=[[16, 16], [16, 32]]", "data.size_multiple=16",
              "train.ckpt_every=2"]
    full, split = tmp_path / "full", tmp_path / "split"
    train(tiny(full, *common, "train.max_steps=4"))
    train(tiny(split, *common, "train.max_steps=2"))
    train(tiny(split, *common, "train.max_steps=4"))  # resumes from step 2
    assert len(losses(full)) == 4
    assert losses(split) == losses(full)


def test_a_plan_loading_the_scheduler_without_the_step_goes_on_with_its_lr(tmp_path):
    """`scheduler:scheduler` was loaded and dropped: the lr warmed up again from step 0, the
    same as a plan without it (the seed's ckpt_scheduler:mem_scheduler goes on)."""
    from minfm_core.schedule import lr_at

    src, run = tmp_path / "src", tmp_path / "run"
    train(tiny(src, "train.max_steps=4", "train.ckpt_every=4", "train.warmup_steps=2", "train.lr=1e-3"))
    plan = [f"train.init_from={json.dumps(str(src))}", 'train.init_load_plan="model:model,scheduler:scheduler"',
            "train.warmup_steps=2", "train.lr=1e-3", "train.min_lr=1e-5", "train.ckpt_every=3"]
    rt = init_runtime("cpu")
    try:
        first = Trainer(tiny(run, "train.max_steps=6", *plan), rt)
        assert (first.step, first.lr_offset) == (0, 4)
        first.fit(until=3)  # saves at step 3, then stops as if killed
        first.close()
    finally:
        shutdown_runtime()
    train(tiny(run, "train.max_steps=6", *plan))  # resumes from its own step 3: the offset is kept
    lrs = [m["lr"] for m in read_metrics(run) if "lr" in m]
    want = [lr_at(k + 4, lr=1e-3, min_lr=1e-5, warmup_steps=2, max_steps=6) for k in range(6)]
    assert lrs == pytest.approx(want) and want[0] < 1e-3  # past the warm-up, into the decay


def test_sample_at_start_draws_its_gallery_without_sample_every(tmp_path):
    """`sample_at_start = true` with `sample_every = 0` drew nothing (exit 0, no samples/),
    while the start-up checks had read its prompts as galleries being on."""
    out = tmp_path / "run"
    train(tiny(out, "train.max_steps=1", "train.sample_every=0", "train.sample_at_start=true", "train.ckpt_every=0"))
    drawn = sorted(p.relative_to(out / "samples").parts[0] for p in (out / "samples").rglob("*.png"))
    assert drawn and set(drawn) == {"step_00000000"}  # one gallery, at step 0
