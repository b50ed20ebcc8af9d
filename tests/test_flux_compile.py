"""``model.denoiser.compile = true``: compiled blocks equal eager ones, lengths do not recompile.

Compile on CPU is slow (seconds per graph), so every test here uses the dimensions of
tests/recipes/tiny.toml's denoiser: dynamo's cache is per code object, not per model, so
the graphs compiled by the first test serve all the others in the process (a resumed
training run included). Inductor's on-disk cache may be cold: nothing here relies on it.
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import losses, tiny
from flux_helpers import make_batch
from minfm_plugins.attention.backends import Sdpa
from minfm_plugins.flux.config import FluxConfig
from minfm_plugins.flux.model import build_flux
from torch._dynamo.utils import counters

from minfm_core.engine.runtime import init_runtime, shutdown_runtime
from minfm_core.engine.train import Trainer, train

# tests/recipes/tiny.toml's denoiser (the resume test trains exactly this model).
TINY = {"flavor": "flux-debug", "d_model": 32, "d_head": 16, "rope_axes": (2, 6, 8), "n_ds_blocks": 1,
        "n_ss_blocks": 1, "d_txt": 16, "d_vec": 16, "d_img": 12}
# Mixed packs: different image grids and prompt lengths (a 0-word prompt included), and a
# uniform one (the eager model groups it as (n, l, d); the compiled one stays flat).
PACKS = [
    ([(8, 8), (8, 12), (12, 8), (8, 8)], [4, 9, 1, 3]),
    ([(12, 8), (8, 8), (8, 12)], [2, 0, 7]),
    ([(8, 8)] * 3, [5, 5, 5]),
]


def _model(compile_: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_flux(FluxConfig(**TINY, compile=compile_), attention=Sdpa())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random everywhere (init_weights zeroes the modulation and output)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Within 1e-5 of the eager value's scale (fp32 rounding of O(1)..O(100) numbers)."""
    return (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


def _run(model, batch):
    inputs = {k: (v.clone().requires_grad_(True) if k in ("img", "txt") else v) for k, v in batch.items()}
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return out.detach(), grads, inputs["img"].grad, inputs["txt"].grad


def test_compiled_equals_eager_on_mixed_packs_without_recompiling():
    eager, compiled = _model(False), _model(True)
    cfg = eager.cfg
    counters.clear()
    for k, (shapes, txt_lens) in enumerate(PACKS):
        batch = make_batch(cfg, shapes, txt_lens, seed=k)
        out_e, grads_e, gi_e, gt_e = _run(eager, batch)
        out_c, grads_c, gi_c, gt_c = _run(compiled, batch)
        assert out_c.shape == out_e.shape
        assert _close(out_c, out_e)
        assert _close(gi_c, gi_e) and _close(gt_c, gt_e)
        assert grads_c.keys() == grads_e.keys()
        for name in grads_e:
            assert _close(grads_c[name], grads_e[name]), name
    # Two halves per block kind, compiled once each: new pack lengths and sample counts reuse them.
    assert counters["stats"]["unique_graphs"] <= 4

    with torch.no_grad():  # sampling / validation: graphs without autograd, equal as well
        batch = make_batch(cfg, *PACKS[0], seed=5)
        assert _close(compiled(**batch), eager(**batch))


def test_compile_flag_marks_every_block_and_keeps_the_state_dict():
    eager, compiled = _model(False), _model(True)
    assert [b.compiled for b in compiled.blocks] == [True, True]
    assert [b.compiled for b in eager.blocks] == [False, False]
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    assert FluxConfig(flavor="flux-debug").compile is False


def test_resume_is_exact_with_compile_on(tmp_path):
    """6 steps + resume to 10 equals 10 uninterrupted steps, bitwise, with compiled blocks."""
    common = ["train.max_steps=10", "train.ckpt_every=6", "train.lr=3e-3", "train.warmup_steps=1",
              "model.denoiser.compile=true"]
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    train(tiny(full_dir, *common))
    rt = init_runtime("cpu")
    try:
        interrupted = Trainer(tiny(split_dir, *common), rt)
        assert all(b.compiled for b in interrupted.model.blocks)
        interrupted.fit(until=6)
        interrupted.close()
    finally:
        shutdown_runtime()
    train(tiny(split_dir, *common))
    full, split = losses(full_dir), losses(split_dir)
    assert len(full) == len(split) == 10
    assert split == full


@pytest.mark.slow
def test_fsdp2_two_processes_match_one_with_compile_on(tmp_path):
    """tests/test_distributed_train.py's check, with compiled blocks inside the FSDP2 units."""
    from test_distributed_train import run

    on = ["--set", "model.denoiser.compile=true", "--set", "train.max_steps=4", "--set", "parallel.ac_freq=1"]
    run(tmp_path / "one", *on)
    run(tmp_path / "two", *on, nproc=2)
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(l1) == len(l2) == 4
    assert l1 == pytest.approx(l2, rel=1e-5)


def test_a_missing_cpp_compiler_is_a_clear_error():
    # Inductor compiles CPU kernels with a C++ compiler; without one, the first compiled
    # block says what is missing and how to go on, instead of inductor's build traceback.
    import torch._inductor.config as inductor_config
    from minfm_plugins.flux import compiled

    from minfm_core.errors import MinfmError

    compiled._check_cpu_compiler.cache_clear()
    try:
        with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)}), pytest.raises(MinfmError) as err:
            compiled._check_cpu_compiler()
    finally:
        compiled._check_cpu_compiler.cache_clear()
    assert "needs a C++ compiler" in str(err.value) and "compile = false" in str(err.value)
    compiled._check_cpu_compiler()  # the real g++ is found again


def test_the_compile_is_announced_once(capsys):
    """A compiling run says so before its silent first minute, once per process."""
    from minfm_plugins.flux import compiled

    model = _model(True)
    batch = make_batch(model.cfg, *PACKS[0], seed=0)
    compiled._announce.cache_clear()
    model(**batch)
    model(**batch)
    out = capsys.readouterr().out
    assert out.count("minfm: compiling the FLUX blocks (model.denoiser.compile = true)") == 1


def test_compiled_bf16_is_as_close_to_fp32_as_eager_bf16():
    # FSDP2's param_dtype = "bf16" (the GPU recipes) runs the blocks in bf16. The compiled
    # halves keep RoPE and the q/k norms in fp32 and cast back, as the eager blocks do: in
    # bf16 they must not drift further from the fp32 model than the eager blocks do.
    ref, eager, compiled = _model(False), _model(False).bfloat16(), _model(True).bfloat16()
    batch = make_batch(ref.cfg, *PACKS[0], seed=3)
    out_r, grads_r, gi_r, _ = _run(ref, batch)

    def error(model) -> float:
        out, grads, gi, _ = _run(model, batch)
        assert out.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in grads.values())
        pairs = [(out, out_r), (gi, gi_r), *((grads[n], grads_r[n]) for n in grads_r)]
        return max((a.float() - b).abs().max().item() / max(b.abs().max().item(), 1e-6) for a, b in pairs)

    err_eager, err_compiled = error(eager), error(compiled)
    assert 1e-4 < err_eager < 0.1  # bf16 rounding shows, and stays rounding
    assert err_compiled <= 2 * err_eager, (err_compiled, err_eager)


def test_the_compiled_form_of_a_linear_keeps_autocasts_dtype():
    """y + fp32 bias made the compiled blocks' q/k/v fp32 under bf16 autocast where eager's are
    bf16 (an explicit flash_attn backend would then refuse them)."""
    from minfm_plugins.flux.layers import linear

    lin = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, eager = linear(lin, x), lin(x)
    assert ours.dtype == eager.dtype == torch.bfloat16
    ours.float().sum().backward()
    assert lin.bias.grad.dtype == torch.float32 and torch.allclose(lin.bias.grad, torch.full((4,), 3.0))


def test_a_compiler_that_cannot_build_is_a_clear_error(monkeypatch):
    """A compiler that is found but cannot build (no Python headers) ended in inductor's
    122-line traceback and "this is a bug in minFM"."""
    from minfm_plugins.flux import compiled

    from minfm_core.errors import MinfmError

    class CppCompileError(RuntimeError):  # inductor's, by name
        pass

    def broken(fn, **kwargs):
        def call(*args):
            try:
                raise CppCompileError("Python.h: No such file or directory")
            except CppCompileError as exc:
                raise RuntimeError("InductorError: backend compiler failed") from exc
        return call

    monkeypatch.setattr(torch, "compile", broken)
    compiled._compiled.cache_clear()
    try:
        with pytest.raises(MinfmError, match=r"could not build its C\+\+ kernels \(Python.h: No such file.*compile = false"):
            compiled._compiled(lambda x: x)(1)
    finally:
        compiled._compiled.cache_clear()
    # and the process may hold many graphs per half-block (train, validate, sample) before dynamo refuses
    assert torch._dynamo.config.recompile_limit >= compiled.RECOMPILE_LIMIT
