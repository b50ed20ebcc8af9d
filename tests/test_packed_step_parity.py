"""One packed training step of minFM's own Trainer against a naive, per-sample reference of the
loss the docs define. fp32, CPU, a tiny FLUX; a few seconds.

The documented loss of one optimizer step (docs/components.md "Path", "Time samplers", "Time
warpers", "Time weighters"; docs/video.md "Packing images with clips": the step's loss is the
mean of the per-sample losses, each equal to the sample's loss computed on its own;
docs/distributed.md: the global batch is ``train.total_batch_size``, filled by accumulating
micro-batches):

    t_i   = warp(t_raw_i, n_i),  mu(n) = base_shift + (max_shift - base_shift)(n - base_len)/(max_len - base_len),
                                 warp(t, n) = t / (t + e^-mu(n) (1 - t))
    x_t   = (1 - t_i) x0_i + t_i eps_i,  target v_i = eps_i - x0_i
    L_i   = mean over the sample's n_i image tokens and d_img features of (model(x_t)_i - v_i)^2
    loss  = (1 / total_batch_size) * sum_i w(t_i) L_i       (w: the time weighter's formula)

The reference below runs every sample alone (no packing: its own text, its own image tokens,
``lens`` of one), with the same weights, on the same x0 / eps / raw t as the trainer, and
backpropagates that formula. It is compared with what ``Trainer.train_step()`` (unmodified)
logs as ``loss`` / ``grad_norm`` and with the gradients it hands to AdamW.

Seams (no minFM code is changed; each only records and delegates):
  * ``trainer.pipe.path``         proxy recording ``noise(x0, eps, t_tok)`` (the exact x0 and eps),
  * ``trainer.pipe.time_sampler`` proxy recording each raw draw (the trainer calls it once per sample),
  * ``trainer.make_batch``        wrapper recording each micro-batch's samples and TrainInputs,
  * a forward pre-hook on ``trainer.model`` recording what the denoiser is fed,
  * ``trainer.optimizer.step``    wrapper copying every ``.grad`` before the real update
    (``train_step`` zeroes the gradients right after stepping).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from engine_helpers import tiny
from minfm_core.engine.runtime import init_runtime, shutdown_runtime
from minfm_core.engine.train import Trainer

# Mixed image sizes (16 to 96 image tokens, three aspect ratios) and mixed prompt lengths (short
# "a red circle" and long "a large red circle on a white background" captions); no text dropout
# so that the reference can encode each prompt alone; no clipping so the gradients are the raw ones.
BASE = (
    "data.caption='mixed'",
    "data.sizes=[[8, 8], [16, 16], [16, 24], [24, 16], [8, 32]]",
    "train.text_dropout=0.0",
    "train.grad_clip_norm=inf",
    "train.ema_decay=0",
)
LOGIT_NORMAL_W = "flow.time_weighter={name = 'logit_normal', mu = 0.3, sigma = 1.2}"

LOSS_RTOL = 1e-5  # fp32 rounding of a sum of 8 terms; a real divergence is O(1e-2) or more
GRAD_RTOL = 1e-4  # per parameter tensor, relative to that tensor's largest reference gradient
GLOBAL_GRAD_RTOL = 2e-5  # all parameters together, relative to the largest reference gradient


@pytest.fixture
def cpu_world():
    """A CPU world of one (gloo), shut down after the test; the determinism flag restored."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    rt = init_runtime("cpu")
    yield rt
    shutdown_runtime()
    torch.use_deterministic_algorithms(deterministic)


def _trainer(tmp: Path, rt, *overrides: str) -> Trainer:
    trainer = Trainer(tiny(tmp, *BASE, *overrides), rt)
    # A fresh FLUX has zero modulation and a zero final layer (it predicts 0, and most
    # parameters get no gradient): give every parameter a random value instead.
    # (as tests/flux_helpers.random_flux; the per-head norm scales near 1)
    g, d_head = torch.Generator().manual_seed(1234), trainer.model.cfg.d_head
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.dim() == 1 and p.shape[0] == d_head else 0.0))
    return trainer


class _Proxy:
    """Delegates everything to ``inner``; ``calls`` records (name, args, result) of ``methods``."""

    def __init__(self, inner, calls: list, methods: tuple[str, ...]):
        self._inner, self._calls, self._methods = inner, calls, methods

    def __call__(self, *args, **kwargs):
        out = self._inner(*args, **kwargs)
        self._calls.append(("__call__", args, kwargs, out))
        return out

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name not in self._methods:
            return attr

        def recorded(*args, **kwargs):
            out = attr(*args, **kwargs)
            self._calls.append((name, args, kwargs, out))
            return out

        return recorded


class Recorder:
    """Installs the seams on one trainer (see the module docstring)."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.path_calls: list = []
        self.sampler_calls: list = []
        self.micro: list = []  # (samples, TrainInputs) per micro-batch
        self.fed: list = []  # the denoiser's arguments per call
        self.grads: dict[str, torch.Tensor] | None = None
        pipe = trainer.pipe
        pipe.path = _Proxy(pipe.path, self.path_calls, ("noise",))
        pipe.time_sampler = _Proxy(pipe.time_sampler, self.sampler_calls, ())
        make_batch = trainer.make_batch

        def recording_make_batch(samples):
            batch = make_batch(samples)
            self.micro.append((list(samples), batch))
            return batch

        trainer.make_batch = recording_make_batch
        names = {p: n for n, p in trainer.model.named_parameters()}

        def pre_hook(module, args, kwargs):
            self.fed.append(([a.detach().clone() for a in args],
                             {k: None if v is None else v.detach().clone() for k, v in kwargs.items()}))

        self.hook = trainer.model.register_forward_pre_hook(pre_hook, with_kwargs=True)
        step = trainer.optimizer.step

        def recording_step(*args, **kwargs):
            self.grads = {names[p]: p.grad.detach().clone() for p in trainer.params}
            return step(*args, **kwargs)

        trainer.optimizer.step = recording_step

    def draws(self) -> list[float]:
        """The raw (unwarped) times, one per sample in the order the trainer drew them."""
        return [float(v) for (_, _, _, out) in self.sampler_calls for v in out.reshape(-1)]

    def eps(self) -> list[torch.Tensor]:
        """The noise of each micro-batch's pack, as handed to the path."""
        return [args[1].detach().clone() for (name, args, _, _) in self.path_calls if name == "noise"]

    def x0(self) -> list[torch.Tensor]:
        return [args[0].detach().clone() for (name, args, _, _) in self.path_calls if name == "noise"]


# ---- the documented loss, one sample at a time -------------------------------------------------


def _patchify_one(latent: torch.Tensor, patch: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """docs/components.md "Patchifier": features ordered (c, pf, ph, pw), tokens in raster (f, h, w)."""
    c, f, h, w = latent.shape
    pf, ph, pw = patch
    x = latent.reshape(c, f // pf, pf, h // ph, ph, w // pw, pw).permute(1, 3, 5, 0, 2, 4, 6)
    tokens = x.reshape((f // pf) * (h // ph) * (w // pw), c * pf * ph * pw)
    grid = torch.meshgrid(torch.arange(f // pf), torch.arange(h // ph), torch.arange(w // pw), indexing="ij")
    return tokens, torch.stack(grid, -1).reshape(-1, 3)


def _warp(t: float, n: int, cfg) -> float:
    """docs/components.md "Time warpers", resolution_shift (float64)."""
    mu = cfg.base_shift + (cfg.max_shift - cfg.base_shift) * (n - cfg.base_len) / (cfg.max_len - cfg.base_len)
    return t / (t + math.exp(-mu) * (1 - t))


def _weight(t: float, name: str, cfg) -> float:
    """docs/components.md "Time weighters" (float64)."""
    if name == "uniform":
        return 1.0
    assert name == "logit_normal", name
    logit = math.log(t / (1 - t))
    return math.exp(-((logit - cfg.mu) ** 2) / (2 * cfg.sigma**2)) / (cfg.sigma * math.sqrt(2 * math.pi) * t * (1 - t))


def reference_step(trainer: Trainer, model: torch.nn.Module, samples: list[dict], raw_t: list[float],
                   eps: list[torch.Tensor]) -> dict:
    """The documented loss of one optimizer step over ``samples`` (all micro-batches), each sample
    run alone through ``model``; backpropagated into ``model``'s ``.grad``."""
    resolved, pipe = trainer.resolved, trainer.pipe
    patch = tuple(resolved.config("model.patchifier").patch_size)
    warper, weighter = resolved.get("flow.time_warper"), resolved.get("flow.time_weighter")
    assert warper.component.name == "resolution_shift"
    total = trainer.cfg.total_batch_size
    assert total == len(samples)
    model.zero_grad(set_to_none=True)
    out = {"loss": 0.0, "per_sample": [], "t": [], "x0": [], "txt": []}
    for s, t_raw, e in zip(samples, raw_t, eps, strict=True):
        text = pipe.encode_text([s["prompt"]])  # this prompt alone
        (latent,) = pipe.encode_images([s], [torch.Generator()])  # identity VAE: nothing drawn
        x0, pos = _patchify_one(latent, patch)
        n = x0.shape[0]
        assert e.shape == x0.shape
        t64 = _warp(t_raw, n, warper.config)
        w = _weight(t64, weighter.component.name, weighter.config)
        t = torch.tensor([t64], dtype=torch.float32)
        x_t = (1 - t) * x0 + t * e
        target = e - x0
        v = model(x_t, pos, torch.tensor([n]), text.txt, text.txt_lens, t, vec=text.vec)
        sample_loss = (v - target).pow(2).mean()
        (w * sample_loss / total).backward()
        out["loss"] += w * sample_loss.item() / total
        out["per_sample"].append(sample_loss.item())
        out["t"].append(t64)
        out["x0"].append(x0)
        out["txt"].append(text)
    out["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    out["grad_norm"] = float(torch.sqrt(sum((g.double() ** 2).sum() for g in out["grads"].values())))
    return out


def _grad_diffs(got: dict, want: dict) -> tuple[float, float, str]:
    """(worst per-tensor relative difference, global relative difference, worst tensor's name)."""
    assert got.keys() == want.keys()
    scale = max(float(g.abs().max()) for g in want.values())
    worst, name, glob = 0.0, "", 0.0
    for k in want:
        diff = float((got[k] - want[k]).abs().max())
        rel = diff / max(float(want[k].abs().max()), 1e-12)
        glob = max(glob, diff / scale)
        if rel > worst:
            worst, name = rel, k
    return worst, glob, name


def _one_step(trainer: Trainer):
    """``train_step()`` with the seams in, and the reference on the samples it drew."""
    model = copy.deepcopy(trainer.model)  # the weights before the step, no hooks
    rec = Recorder(trainer)
    metrics = trainer.train_step()
    rec.hook.remove()
    samples = [s for (batch, _) in rec.micro for s in batch]
    eps = [e for pack_eps, (_, tb) in zip(rec.eps(), rec.micro) for e in torch.split(pack_eps, tb.lens.tolist())]
    ref = reference_step(trainer, model, samples, rec.draws(), eps)
    return metrics, rec, ref


@pytest.mark.parametrize("weighter", ["uniform", "logit_normal"])
def test_packed_step_equals_per_sample_reference(tmp_path, cpu_world, weighter):
    over = (LOGIT_NORMAL_W,) if weighter == "logit_normal" else ()
    trainer = _trainer(tmp_path / "run", cpu_world, *over)  # batch 4, total 8: two micro-batches
    try:
        assert trainer.accum == 2
        metrics, rec, ref = _one_step(trainer)
        samples = [s for (batch, _) in rec.micro for s in batch]
        # the pack is worth testing: several image sizes and prompt lengths in each micro-batch
        lens = [int(x.shape[0]) for x in ref["x0"]]
        txt_lens = [int(x.txt_lens) for x in ref["txt"]]
        assert len(samples) == 8 and len(set(lens)) >= 3 and len(set(txt_lens)) >= 2, (lens, txt_lens)
        for _, tb in rec.micro:
            assert len(set(tb.lens.tolist())) >= 2

        # docs/plugins.md: the trainer calls the time sampler once per sample (n = 1)
        assert [tuple(out.shape) for (_, _, _, out) in rec.sampler_calls] == [(1,)] * 8

        # The inputs, stage by stage (a divergence names its first stage).
        k, patch = 0, tuple(trainer.resolved.config("model.patchifier").patch_size)
        for m, ((batch, tb), x0_pack, (args, kwargs)) in enumerate(zip(rec.micro, rec.x0(), rec.fed, strict=True)):
            img, img_pos, img_lens, txt, fed_txt_lens, t = args
            mine = slice(k, k + len(batch))
            # x0: the documented patchifier, sample by sample, packed in order (exact)
            assert torch.equal(x0_pack, torch.cat(ref["x0"][mine])), f"micro-batch {m}: x0"
            assert torch.equal(img_lens, torch.tensor(lens[mine]))
            assert torch.equal(img_pos, torch.cat([_patchify_one(pl, patch)[1] for pl in
                                                   trainer.pipe.encode_images(batch, [torch.Generator()] * len(batch))]))
            # text: each prompt encoded alone, packed in order (exact)
            assert torch.equal(txt, torch.cat([x.txt for x in ref["txt"][mine]]))
            assert torch.equal(fed_txt_lens, torch.cat([x.txt_lens for x in ref["txt"][mine]]))
            assert torch.equal(kwargs["vec"], torch.cat([x.vec for x in ref["txt"][mine]]))
            # t: the sample's raw draw warped by its own token count (float rounding)
            torch.testing.assert_close(t.double(), torch.tensor(ref["t"][mine], dtype=torch.float64),
                                       rtol=1e-6, atol=1e-7)
            # x_t and the target: the rectified path
            e = rec.eps()[m]
            t_tok = torch.repeat_interleave(t, img_lens).unsqueeze(-1)
            torch.testing.assert_close(img, (1 - t_tok) * x0_pack + t_tok * e, rtol=1e-6, atol=1e-6)
            assert torch.equal(tb.target, e - x0_pack)
            k += len(batch)

        # The loss and every parameter's gradient.
        assert metrics["skipped"] == 0.0
        rel_loss = abs(metrics["loss"] - ref["loss"]) / abs(ref["loss"])
        assert rel_loss < LOSS_RTOL, (metrics["loss"], ref["loss"])
        assert rec.grads is not None and all(float(g.abs().max()) > 0 for g in ref["grads"].values())
        worst, glob, name = _grad_diffs(rec.grads, ref["grads"])
        assert worst < GRAD_RTOL, f"{name}: gradient differs by {worst:.3g} of its scale"
        assert glob < GLOBAL_GRAD_RTOL, glob
        assert metrics["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
        print(f"\n[{weighter}] loss {metrics['loss']:.9g} ref {ref['loss']:.9g} rel {rel_loss:.2e}; "
              f"grads: worst tensor {worst:.2e} ({name}), global {glob:.2e}; "
              f"grad_norm {metrics['grad_norm']:.7g} ref {ref['grad_norm']:.7g}; lens {lens} txt {txt_lens}")
    finally:
        trainer.close()


def _fed_step(trainer: Trainer, micro_batches: list[list[dict]], state: dict):
    """One ``train_step`` on the given micro-batches from the weights ``state``: (loss, grads)."""
    trainer.model.load_state_dict(state)
    trainer.batches = iter(micro_batches)
    rec = Recorder(trainer)
    metrics = trainer.train_step()
    rec.hook.remove()
    assert metrics["skipped"] == 0.0
    return metrics["loss"], rec.grads


def test_accumulation_and_order_do_not_change_the_step(tmp_path, cpu_world):
    """docs/distributed.md: the global batch is total_batch_size, accumulated over micro-batches,
    and a sample's noise and time come from its (seed, epoch, index) key: two micro-batches of 4
    give the step of one batch of 8, and neither the order within a pack nor the split matters."""
    acc = _trainer(tmp_path / "acc", cpu_world, LOGIT_NORMAL_W)  # batch 4 x 2
    one = _trainer(tmp_path / "one", cpu_world, LOGIT_NORMAL_W, "train.batch_size=8")  # batch 8 x 1
    originals = (acc.batches, one.batches)
    try:
        assert (acc.accum, one.accum) == (2, 1)
        state = copy.deepcopy(acc.model.state_dict())
        ds = acc.dataset
        # keyed as the trainer's loader keys them; the last is item 3 again in another epoch (other noise and t)
        items = [{**ds[i], "epoch": e, "index": i} for e, i in [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (0, 6), (1, 3)]]
        assert len({tuple(s["image"].shape) for s in items}) >= 3

        base_loss, base_grads = _fed_step(one, [items], state)
        perm = [5, 2, 7, 0, 3, 6, 1, 4]
        runs = {
            "accumulated 4 + 4": (acc, [items[:4], items[4:]]),
            "accumulated, other split": (acc, [[items[p] for p in perm[:4]], [items[p] for p in perm[4:]]]),
            "one batch, permuted": (one, [[items[p] for p in perm]]),
        }
        for what, (trainer, micro) in runs.items():
            loss, grads = _fed_step(trainer, micro, state)
            assert abs(loss - base_loss) / abs(base_loss) < LOSS_RTOL, (what, loss, base_loss)
            worst, glob, name = _grad_diffs(grads, base_grads)
            assert worst < GRAD_RTOL and glob < GLOBAL_GRAD_RTOL, (what, name, worst, glob)
            print(f"\n{what}: loss {loss:.9g} vs {base_loss:.9g}; grads worst {worst:.2e} ({name}), global {glob:.2e}")
    finally:
        for trainer, orig in zip((acc, one), originals):
            orig.close()
            trainer.close()
