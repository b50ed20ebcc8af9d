"""What a patchifier and a probability path hand the engine, and the dtype an attention backend
returns, are checked where the engine takes them (minfm_core.boundary), as every other
component's output is. Before: a patchify returning a tuple died as an AttributeError
"blamed on minFM", float positions trained silently, a path noising to the wrong shape
failed in the denoiser (blamed on the denoiser's plugin), and an attention backend returning
float16 failed in the denoiser's next matmul.
"""

from __future__ import annotations

import re

import pytest
import torch

from engine_helpers import tiny
from minfm_core import config, field, hookimpl, testing
from minfm_core.engine.generate import generate
from minfm_core.engine.pipeline import build_pipeline, per_sample_loss, prepare_batch
from minfm_core.data_loader import BatchIterator
from minfm_core.errors import PluginError
from minfm_core.packing import Patched
from minfm_core.plugins import plugin
from minfm_core.registry import get_registry


@config
class FaultConfig:
    fault: str = field("none", doc="what the probe gets wrong")


def _builtin(kind: str, name: str):
    return get_registry().get(kind, name).load_factory()()


class ProbePatchifier:
    """The built-in patch3d, but its output breaks one rule."""

    def __init__(self, cfg):
        self.fault, self.inner = cfg.fault, _builtin("patchifier", "patch3d")

    def patchify(self, latents):
        p = self.inner.patchify(latents)
        return {
            "none": lambda: p,
            "tuple": lambda: (p.tokens, p.pos, p.lens, p.shapes),
            "float_pos": lambda: Patched(p.tokens, p.pos.float(), p.lens, p.shapes),
            "lens_sum": lambda: Patched(p.tokens, p.pos, p.lens + 1, p.shapes),
            "int_tokens": lambda: Patched(p.tokens.long(), p.pos, p.lens, p.shapes),
            "shapes": lambda: Patched(p.tokens, p.pos, p.lens, p.shapes[:-1]),
        }.get(self.fault, lambda: p)()

    def unpatchify(self, tokens, lens, shapes):
        out = self.inner.unpatchify(tokens, lens, shapes)
        return [x[:, :, 1:] for x in out] if self.fault == "unpatchify" else out


class ProbePath:
    """The rectified path, but one of its outputs is one row short."""

    def __init__(self, cfg):
        self.fault, self.inner = cfg.fault, _builtin("path", "rectified")

    def noise(self, x0, eps, t):
        x_t = self.inner.noise(x0, eps, t)
        return x_t[:-1] if self.fault == "noise" else x_t

    def target(self, x0, eps):
        v = self.inner.target(x0, eps)
        return v.long() if self.fault == "target" else v


def half_attention(q, k, v, cu_seqlens, max_seqlen):
    return testing.reference_attention(q, k, v, cu_seqlens, max_seqlen).half()


class Probe:
    @hookimpl
    def register_patchifiers(self, register):
        register("probe_patch", ProbePatchifier, FaultConfig)

    @hookimpl
    def register_paths(self, register):
        register("probe_path", ProbePath, FaultConfig)

    @hookimpl
    def register_attention_backends(self, register):
        register("half", lambda: half_attention, doc="returns float16 whatever q is")


@pytest.fixture
def probe():
    with plugin(Probe(), "probe"):
        yield


def _train_step(tmp_path, *sets):
    resolved = tiny(tmp_path, *sets)
    pipe = build_pipeline(resolved, torch.device("cpu"))
    samples = next(BatchIterator(resolved.build("data", split="train"), 4, seed=0))
    return per_sample_loss(pipe, prepare_batch(pipe, samples, torch.Generator().manual_seed(0), 0.0))


#: (slot, component, fault, the problem as a regular expression)
TRAIN_CASES = [
    ("model.patchifier", "patchifier 'probe_patch'", "tuple",
     r"patched = patchify\(latents\): expected a minfm_core\.packing\.Patched, got tuple$"),
    ("model.patchifier", "patchifier 'probe_patch'", "float_pos",
     r"patched = patchify\(latents\): expected pos as an integer tensor of shape \((\d+), 3\), got \(\1, 3\) "
     r"torch\.float32$"),
    ("model.patchifier", "patchifier 'probe_patch'", "lens_sum",
     r"patched = patchify\(latents\): expected lens >= 0 summing to the \d+ token rows, got \[\d+, "),
    ("model.patchifier", "patchifier 'probe_patch'", "int_tokens",
     r"patched = patchify\(latents\): expected tokens \(L, D\) as a floating-point tensor, got torch\.int64$"),
    ("model.patchifier", "patchifier 'probe_patch'", "shapes",
     r"patched = patchify\(latents\): expected 4 latent shapes, got list of 3$"),
    ("flow.path", "path 'probe_path'", "noise",
     r"x_t = path\.noise\(x0, eps, t\): expected shape \((\d+), (\d+)\) \(the input's\), got \(\d+, \2\)$"),
    ("flow.path", "path 'probe_path'", "target",
     r"v = path\.target\(x0, eps\): expected a floating-point tensor, got torch\.int64$"),
]


@pytest.mark.parametrize("slot, who, fault, problem", TRAIN_CASES, ids=[c[2] for c in TRAIN_CASES])
def test_training_refuses_what_a_patchifier_or_path_breaks_naming_it(probe, tmp_path, slot, who, fault, problem):
    name = who.split("'")[1]
    with pytest.raises(PluginError) as info:
        _train_step(tmp_path, f'{slot}={{name = "{name}", fault = "{fault}"}}')
    # the recipe key to change, the component in it and its plugin, then what it got wrong
    assert re.match(re.escape(f"{slot}: {who} of plugin 'probe': ") + problem, str(info.value)), str(info.value)


@pytest.mark.parametrize("sets", [['model.patchifier={name = "probe_patch"}'], ['flow.path={name = "probe_path"}']])
def test_components_that_keep_the_rules_train_to_the_same_loss(probe, tmp_path, sets):
    assert torch.equal(_train_step(tmp_path / "a", *sets), _train_step(tmp_path / "b"))


def test_sampling_refuses_a_patchifier_whose_unpatchify_breaks_the_shapes(probe, tmp_path):
    def draw(fault):
        pipe = build_pipeline(tiny(tmp_path, f'model.patchifier={{name = "probe_patch", fault = "{fault}"}}'),
                              torch.device("cpu"))
        return generate(pipe, ["a red circle"], sizes=[(1, 16, 24)], seeds=[0], steps=1)

    assert draw("none")[0].shape == (3, 1, 16, 24)
    with pytest.raises(PluginError) as info:
        draw("unpatchify")
    assert str(info.value) == ("model.patchifier: patchifier 'probe_patch' of plugin 'probe': latents = unpatchify("
                               "tokens, lens, shapes): expected latent 0 of shape (3, 1, 16, 24), got (3, 1, 15, 24)")
    with pytest.raises(PluginError, match=r"^model.patchifier: .*patchify\(latents\): expected a minfm_core"):
        draw("tuple")


def test_an_attention_backend_returning_another_dtype_is_refused(probe, tmp_path):
    with pytest.raises(PluginError) as info:
        _train_step(tmp_path, 'model.attention="half"')
    assert str(info.value).startswith("model.attention: attention 'half' of plugin 'probe': out = attention(q, k, v, "
                                      "cu_seqlens, max_seqlen): expected dtype torch.float32 (the input's), got "
                                      "torch.float16"), str(info.value)


def test_the_kit_applies_the_same_rules(probe):
    reg = get_registry()
    with pytest.raises(AssertionError, match=r"patchify\(latents\).*expected a minfm_core.packing.Patched, got tuple"):
        testing.check_patchifier(reg.get("patchifier", "probe_patch"), FaultConfig(fault="tuple"))
    with pytest.raises(AssertionError, match=r"patchify\(latents\).*expected pos as an integer tensor"):
        testing.check_patchifier(reg.get("patchifier", "probe_patch"), FaultConfig(fault="float_pos"))
    with pytest.raises(AssertionError, match=r"unpatchify\(tokens, lens, shapes\).*expected latent 0 of shape"):
        testing.check_patchifier(reg.get("patchifier", "probe_patch"), FaultConfig(fault="unpatchify"))
    with pytest.raises(AssertionError, match=r"path.noise\(x0, eps, t\).*expected shape \(5, 3\)"):
        testing.check_path(reg.get("path", "probe_path"), FaultConfig(fault="noise"))
    with pytest.raises(AssertionError, match=r"attention.*expected dtype torch.float32 \(the input's\), got torch.float16"):
        testing.check_attention(reg.get("attention", "half"))
    testing.check_patchifier(reg.get("patchifier", "probe_patch"), FaultConfig())  # the rules, kept
    testing.check_path(reg.get("path", "probe_path"), FaultConfig())


class ZeroBasedEuler:
    """Euler that numbers its callback from 0: the demo's progress bar never reached the end."""

    def __call__(self, velocity, noise, seq_lens, *, steps, warper=None, generators=None, callback=None):
        x = noise.clone()
        for k in range(steps):
            t = torch.full((len(seq_lens),), 1 - k / steps)
            x = x - velocity(x, t) / steps
            if callback is not None:
                callback(k, steps)
        return x


def test_the_kit_says_how_a_sampler_numbers_its_callback():
    with pytest.raises(AssertionError, match=r"callback\(k, steps\) after step k = 1, 2, \.\.\., steps .*got k = "
                                             r"\[0, 1, 2\] for steps=3"):
        testing.check_sampler(lambda: ZeroBasedEuler())
    for name in get_registry().names("sampler"):  # the built-ins keep it
        testing.check_sampler(get_registry().get("sampler", name))


def test_attention_may_answer_in_any_float_dtype_under_autocast():
    """Under autocast torch's own attention answers in autocast's dtype whatever q's is, and the
    next matmul casts what it gets: no dtype is refused there (on a GPU, training in bf16)."""
    from minfm_core import boundary

    q = torch.randn(5, 2, 8)
    assert boundary.same_dtype_problem(q.bfloat16(), q) == "expected dtype torch.float32 (the input's), got torch.bfloat16"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert boundary.same_dtype_problem(q.bfloat16(), q) is None
        assert boundary.same_dtype_problem(q.bfloat16().float(), q.bfloat16()) is None
