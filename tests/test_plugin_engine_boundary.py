"""What a plugin's components hand the engine is checked where the engine takes it.

A dataset yielding uint8 images in 0..255 or NaN pixels, a time sampler returning t outside
[0, 1], a weighter returning a float or negative weights: each trained silently on garbage;
a tuple from a denoiser, an int prompt or a numpy image crashed with a traceback naming the
wrong component ("identity VAE: image 0" for a dataset's (3, H, W) image, 0 being the batch
position). Now each is one line naming the component, its plugin and, for data, the item's
dataset index (minfm_core.boundary, shared with the conformance kit).
"""

from __future__ import annotations

import pytest
import torch

from minfm_core import config, field, hookimpl, protocols
from minfm_core.data_loader import BatchIterator
from minfm_core.engine.pipeline import build_pipeline, per_sample_loss, prepare_batch
from minfm_core.errors import PluginError
from minfm_core.plugins import plugin

#: The item of the probe dataset that breaks the rules (the others keep them).
BAD_INDEX = 5


@config
class ModeConfig:
    """How the probe component misbehaves."""

    mode: str = field("ok", doc="the misbehaviour")


class ProbeDataset(protocols.Dataset):
    def __init__(self, cfg, *, split="train"):
        self.mode = cfg.mode

    def __len__(self):
        return 8

    def __getitem__(self, i):
        img, prompt = torch.rand(3, 1, 16, 16) * 2 - 1, "a thing"
        if i != BAD_INDEX or self.mode == "ok":
            return {"image": img, "prompt": prompt}
        return {
            "uint8": lambda: {"image": (img + 1).mul(127.5).to(torch.uint8), "prompt": prompt},
            "x100": lambda: {"image": img * 100, "prompt": prompt},
            "nan": lambda: {"image": img.index_fill(1, torch.tensor([0]), float("nan")), "prompt": prompt},
            "numpy": lambda: {"image": img.numpy(), "prompt": prompt},
            "no_frames": lambda: {"image": img[:, 0], "prompt": prompt},
            "no_prompt": lambda: {"image": img},
            "int_prompt": lambda: {"image": img, "prompt": 7},
            "tuple": lambda: (img, prompt),
        }[self.mode]()


class ProbeTimeSampler:
    def __init__(self, cfg):
        self.mode = cfg.mode

    def __call__(self, n, *, generator=None, device=None):
        t = torch.rand(n, generator=generator)
        return {"ok": lambda: t, "outside": lambda: t + 2, "nan": lambda: t * float("nan"),
                "list": lambda: t.tolist(), "column": lambda: t[:, None],
                "int": lambda: torch.ones(n, dtype=torch.long)}[self.mode]()


class ProbeWeighter:
    def __init__(self, cfg):
        self.mode = cfg.mode

    def __call__(self, t):
        return {"ok": lambda: torch.ones_like(t), "float": lambda: 1.0, "negative": lambda: -torch.ones_like(t),
                "column": lambda: torch.ones(len(t), 3)}[self.mode]()


class ProbeDenoiser(torch.nn.Module, protocols.Denoiser):
    def __init__(self, cfg):
        super().__init__()
        self.mode = cfg.mode
        self.scale = torch.nn.Parameter(torch.ones(()))

    def init_weights(self):
        pass

    def forward(self, img, img_pos, img_lens, txt, txt_lens, t, vec=None, guidance=None):
        v = img * self.scale
        return {"ok": lambda: v, "tuple": lambda: (v,), "short": lambda: v[:-1], "input": lambda: img}[self.mode]()


class ProbeSampler:
    """One Euler step from t = 1, then returns what its mode says."""

    def __init__(self, cfg):
        self.mode = cfg.mode

    def __call__(self, velocity, noise, seq_lens, *, steps, warper=None, generators=None, callback=None):
        x0 = noise - velocity(noise, torch.ones(len(seq_lens)))
        return {"ok": lambda: x0, "list": lambda: [x0], "short": lambda: x0[:-1], "int": lambda: x0.long()}[self.mode]()


class ProbeGuidance:
    needs_uncond = True

    def __init__(self, cfg):
        self.mode = cfg.mode

    def __call__(self, v_cond, v_uncond, lens):
        v = v_uncond + 2.0 * (v_cond - v_uncond)
        return {"ok": lambda: v, "list": lambda: [v], "short": lambda: v[:-1], "int": lambda: v.long()}[self.mode]()


class Probe:
    @hookimpl
    def register_samplers(self, register):
        register("probe_smp", ProbeSampler, ModeConfig)

    @hookimpl
    def register_guidances(self, register):
        register("probe_cfg", ProbeGuidance, ModeConfig)

    @hookimpl
    def register_datasets(self, register):
        register("probe_ds", ProbeDataset, ModeConfig)

    @hookimpl
    def register_time_samplers(self, register):
        register("probe_ts", ProbeTimeSampler, ModeConfig)

    @hookimpl
    def register_time_weighters(self, register):
        register("probe_tw", ProbeWeighter, ModeConfig)

    @hookimpl
    def register_denoisers(self, register):
        register("probe_den", lambda cfg, *, load_weights=True, attention=None, balancer=None: ProbeDenoiser(cfg),
                 ModeConfig)


def _step(tmp_path, slot: str, name: str, mode: str) -> None:
    """One training micro-batch, as the trainer makes it: items from the loader (keyed by their
    dataset index), prepare_batch, the loss; ``slot`` holds probe component ``name`` in ``mode``."""
    from engine_helpers import tiny

    data = [] if slot == "data" else ['data={name = "probe_ds"}']  # eight good items
    resolved = tiny(tmp_path, f'{slot}={{name = "{name}", mode = "{mode}"}}', *data)
    pipe = build_pipeline(resolved, torch.device("cpu"))
    samples = next(BatchIterator(resolved.build("data", split="train"), 8, seed=0))
    loss = per_sample_loss(pipe, prepare_batch(pipe, samples, torch.Generator().manual_seed(0), 0.0))
    assert loss.shape == (8,)


CASES = [
    ("data", "probe_ds", "uint8", f"item {BAD_INDEX}: 'image': expected floating-point values in [-1, 1], got torch.uint8"),
    ("data", "probe_ds", "x100", f"item {BAD_INDEX}: 'image': expected values in [-1, 1], got ["),
    ("data", "probe_ds", "nan", f"item {BAD_INDEX}: 'image': expected finite values, got NaN"),
    ("data", "probe_ds", "numpy", f"item {BAD_INDEX}: 'image': expected a torch tensor (3, F, H, W), got numpy.ndarray"),
    ("data", "probe_ds", "no_frames",
     f"item {BAD_INDEX}: 'image': expected shape (3, F, H, W) (RGB, frames, height, width), got (3, 16, 16)"),
    ("data", "probe_ds", "no_prompt", f"item {BAD_INDEX}: expected a 'prompt' string, got no 'prompt'"),
    ("data", "probe_ds", "int_prompt", f"item {BAD_INDEX}: 'prompt': expected a string, got int"),
    ("flow.time_sampler", "probe_ts", "outside", "t = sampler(1): expected values in [0, 1], got [2"),
    ("flow.time_sampler", "probe_ts", "nan", "t = sampler(1): expected finite values, got NaN"),
    ("flow.time_sampler", "probe_ts", "list", "t = sampler(1): expected a tensor of shape (1,), got list"),
    ("flow.time_sampler", "probe_ts", "column", "t = sampler(1): expected shape (1,), got (1, 1)"),
    ("flow.time_sampler", "probe_ts", "int", "t = sampler(1): expected a floating-point tensor, got torch.int64"),
    ("flow.time_weighter", "probe_tw", "float", "w = weighter(t): expected a tensor of shape (8,), got float"),
    ("flow.time_weighter", "probe_tw", "negative", "w = weighter(t): expected values >= 0, got [-1, -1]"),
    ("flow.time_weighter", "probe_tw", "column", "w = weighter(t): expected shape (8,), got (8, 3)"),
    ("model.denoiser", "probe_den", "tuple", "v = model(img, ...): expected a tensor of shape ("),
    ("model.denoiser", "probe_den", "short", "v = model(img, ...): expected shape ("),
    ("model.denoiser", "probe_den", "input", "v = model(img, ...): expected a fresh tensor, got its input"),
]


@pytest.mark.parametrize("slot, name, mode, problem", CASES, ids=[f"{c[1]}-{c[2]}" for c in CASES])
def test_what_a_component_returns_is_refused_naming_it(tmp_path, slot, name, mode, problem):
    kind = {"data": "dataset", "flow.time_sampler": "time_sampler", "flow.time_weighter": "time_weighter",
            "model.denoiser": "denoiser"}[slot]
    with plugin(Probe(), "probe"):
        with pytest.raises(PluginError) as info:
            _step(tmp_path, slot, name, mode)
    # the recipe key to change first, then whose code to blame
    assert str(info.value).startswith(f"{slot}: {kind} {name!r} of plugin 'probe': {problem}"), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("slot, name", [("data", "probe_ds"), ("flow.time_sampler", "probe_ts"),
                                        ("flow.time_weighter", "probe_tw"), ("model.denoiser", "probe_den")])
def test_components_that_keep_the_rules_train(tmp_path, slot, name):
    with plugin(Probe(), "probe"):
        _step(tmp_path, slot, name, "ok")


def test_values_on_a_device_are_read_once_and_on_the_cpu_always(tmp_path):
    """Reading a GPU tensor's values waits for the device: the engine does it on the first batch
    only (shape and dtype, free, on every one). A meta tensor stands in for a GPU's here."""
    from engine_helpers import tiny

    pipe = build_pipeline(tiny(tmp_path), torch.device("cpu"))
    on_device = torch.empty(3, device="meta")
    assert pipe.read_values(on_device, "flow.time_weighter")
    assert not pipe.read_values(on_device, "flow.time_weighter")
    assert pipe.read_values(on_device, "flow.time_warper")  # each kind once
    assert all(pipe.read_values(torch.ones(3), "flow.time_weighter") for _ in range(2))


def test_validation_items_are_named_by_their_index_when_given(tmp_path):
    """Validation reads dataset[g] itself (no loader key): prepare_batch(indices=...) names
    item g, not its place in the batch."""
    from engine_helpers import tiny

    with plugin(Probe(), "probe"):
        resolved = tiny(tmp_path, 'data={name = "probe_ds", mode = "uint8"}')
        pipe = build_pipeline(resolved, torch.device("cpu"))
        ds = resolved.build("data", split="val")
        idx = [4, BAD_INDEX]
        samples, t = [ds[g] for g in idx], torch.tensor([0.2, 0.7])
        for given, named in ((idx, f"item {BAD_INDEX}:"), (None, "item 1 of a batch:")):
            with pytest.raises(PluginError, match=f"^data: dataset 'probe_ds' of plugin 'probe': {named}"):
                prepare_batch(pipe, samples, torch.Generator(), 0.0, t=t, noise_seeds=idx, indices=given)


SAMPLING_CASES = [(slot, name, mode, problem) for slot, name, what in (
    ("sample.sampler", "probe_smp", "x0 = sampler(velocity, x, lens, ...)"),
    ("sample.guidance", "probe_cfg", "v = guidance(v_cond, v_uncond, lens)"),
) for mode, problem in (("list", f"{what}: expected a tensor of shape (16, 12) (the input's), got list"),
                        ("short", f"{what}: expected shape (16, 12) (the input's), got (15, 12)"),
                        ("int", f"{what}: expected a floating-point tensor, got torch.int64"))]


@pytest.mark.parametrize("slot, name, mode, problem", SAMPLING_CASES, ids=[f"{c[1]}-{c[2]}" for c in SAMPLING_CASES])
def test_what_a_sampler_or_guidance_returns_is_refused_naming_it(tmp_path, slot, name, mode, problem):
    """A sampler returning a list failed in unpatchify with an AttributeError blamed on minFM."""
    from engine_helpers import tiny
    from minfm_core.engine.generate import generate

    with plugin(Probe(), "probe"):
        for m in ("ok", mode):
            pipe = build_pipeline(tiny(tmp_path, f'{slot}={{name = "{name}", mode = "{m}"}}'), torch.device("cpu"))
            run = lambda: generate(pipe, ["a red circle"], sizes=[(1, 8, 8)], seeds=[0], steps=1)  # noqa: E731
            if m == "ok":
                assert run()[0].shape == (3, 1, 8, 8)
                continue
            with pytest.raises(PluginError) as info:
                run()
    kind = slot.split(".")[1]
    assert str(info.value) == f"{slot}: {kind} {name!r} of plugin 'probe': {problem}"


def test_a_dataset_item_that_is_not_a_dict_is_named_by_the_loader_as_the_trainer_builds_it(tmp_path):
    """The loader said only "data: item 5: ...", where every other item error names the dataset."""
    from engine_helpers import tiny

    with plugin(Probe(), "probe"):
        resolved = tiny(tmp_path, 'data={name = "probe_ds", mode = "tuple"}')
        pipe = build_pipeline(resolved, torch.device("cpu"))
        batches = BatchIterator(resolved.build("data", split="train"), 8, seed=0, who=pipe.who("data"))
        with pytest.raises(PluginError) as info:
            next(batches)
    assert str(info.value) == (f"data: dataset 'probe_ds' of plugin 'probe': item {BAD_INDEX}: expected a dict with "
                               "'image' (or 'latent') and 'prompt', got tuple")
