"""Guidance: cfg at scale 1 is the conditional velocity; ep_cfg keeps each sample's conditional energy."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minfm_core.packing import split
from minfm_plugins.flow.config import CFGConfig, EPCFGConfig
from minfm_plugins.flow.guidance import CFG, EPCFG


def _pair(lens, d=6, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = int(lens.sum())
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)


def test_cfg_formula_and_scale_one_is_conditional():
    lens = torch.tensor([5, 9])
    vc, vu = _pair(lens)
    assert torch.equal(CFG(CFGConfig(scale=1.0))(vc, vu, lens), vc)
    assert CFG(CFGConfig(scale=1.0))(vc, None, lens) is vc  # the engine may skip the uncond pass
    torch.testing.assert_close(CFG(CFGConfig(scale=4.0))(vc, vu, lens), vu + 4.0 * (vc - vu))
    torch.testing.assert_close(CFG(CFGConfig(scale=0.0))(vc, vu, lens), vu)
    assert torch.equal(EPCFG(EPCFGConfig(scale=1.0))(vc, vu, lens), vc)


def test_needs_uncond():
    assert CFG().needs_uncond and CFG().scale == 5.0
    assert not CFG(CFGConfig(scale=1.0)).needs_uncond
    assert not EPCFG(EPCFGConfig(scale=1.0)).needs_uncond and EPCFG().needs_uncond


@settings(max_examples=40, deadline=None, derandomize=True)
@given(lens=st.lists(st.integers(1, 20), min_size=1, max_size=5), scale=st.floats(0.0, 12.0), seed=st.integers(0, 99))
def test_ep_cfg_preserves_each_samples_conditional_energy(lens, scale, seed):
    lt = torch.tensor(lens)
    vc, vu = _pair(lt, dtype=torch.float64, seed=seed)
    out = EPCFG(EPCFGConfig(scale=scale))(vc, vu, lt)
    guided = CFG(CFGConfig(scale=scale))(vc, vu, lt)
    for o, c, gd in zip(split(out, lt), split(vc, lt), split(guided, lt)):
        assert o.square().sum().item() == pytest.approx(c.square().sum().item(), rel=1e-12)
        # Only the length changes: the direction is CFG's.
        cos = (o * gd).sum() / (o.norm() * gd.norm())
        assert cos.item() == pytest.approx(1.0, abs=1e-12)


def test_ep_cfg_fp32_and_bf16():
    lens = torch.tensor([64, 3, 200])
    vc, vu = _pair(lens)
    out = EPCFG(EPCFGConfig(scale=7.5))(vc, vu, lens)
    for o, c in zip(split(out, lens), split(vc, lens)):
        assert o.square().sum().item() == pytest.approx(c.square().sum().item(), rel=1e-5)
    out16 = EPCFG(EPCFGConfig(scale=7.5))(vc.bfloat16(), vu.bfloat16(), lens)
    assert out16.dtype == torch.bfloat16
    for o, c in zip(split(out16.float(), lens), split(vc.bfloat16().float(), lens)):
        assert o.square().sum().item() == pytest.approx(c.square().sum().item(), rel=2e-2)


def test_ep_cfg_needs_lens():
    vc, vu = _pair(torch.tensor([4]))
    with pytest.raises(ValueError, match="lens"):
        EPCFG()(vc, vu, None)
