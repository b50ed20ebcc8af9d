"""Property tests: packing helpers and the patch3d patchifier are exact inverses on random size mixes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minfm_core import packing
from minfm_core.errors import MinfmError
from minfm_plugins.flow.config import Patch3DConfig
from minfm_plugins.flow.patchify import Patch3D

PROPS = settings(max_examples=60, deadline=None, derandomize=True)

lens_lists = st.lists(st.integers(0, 7), min_size=1, max_size=6)


def _lens(xs):
    return torch.tensor(xs, dtype=torch.long)


@PROPS
@given(a=lens_lists, data=st.data())
def test_interleave_then_deinterleave_is_identity(a, data):
    b = data.draw(st.lists(st.integers(0, 7), min_size=len(a), max_size=len(a)))
    a_lens, b_lens = _lens(a), _lens(b)
    ta = torch.randn(sum(a), 3)
    tb = torch.randn(sum(b), 3)
    packed, datum_lens, a_idx, b_idx = packing.interleave(ta, a_lens, tb, b_lens)
    # Per sample: a_i then b_i, in sample order.
    expected = torch.cat(
        [torch.cat([x, y]) for x, y in zip(packing.split(ta, a_lens), packing.split(tb, b_lens))]
    )
    assert torch.equal(packed, expected)
    assert datum_lens.tolist() == [x + y for x, y in zip(a, b)]
    ra, rb = packing.deinterleave(packed, a_lens, b_lens)
    assert torch.equal(ra, ta) and torch.equal(rb, tb)
    # The two index sets tile the pack exactly once.
    assert sorted(torch.cat([a_idx, b_idx]).tolist()) == list(range(sum(a) + sum(b)))


@PROPS
@given(lens=lens_lists)
def test_segment_reductions_equal_per_sample_loop(lens):
    lt = _lens(lens)
    x = torch.randn(sum(lens), 2, 3, dtype=torch.float64)
    sums = packing.segment_sum(x, lt)
    means = packing.segment_mean(x, lt)
    for i, part in enumerate(packing.split(x, lt)):
        torch.testing.assert_close(sums[i], part.sum(0), rtol=0, atol=1e-12)
        want = part.mean(0) if len(part) else torch.zeros(2, 3, dtype=x.dtype)
        torch.testing.assert_close(means[i], want, rtol=0, atol=1e-12)
    assert packing.cu_seqlens(lt).tolist() == [0, *torch.cumsum(lt, 0).tolist()]
    assert packing.segment_ids(lt).tolist() == [i for i, n in enumerate(lens) for _ in range(n)]
    assert packing.positions_in_segment(lt).tolist() == [j for n in lens for j in range(n)]
    per_sample = torch.arange(len(lens)) * 10
    assert packing.expand_per_token(per_sample, lt).tolist() == [10 * i for i, n in enumerate(lens) for _ in range(n)]


patches = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3))


@PROPS
@given(patch=patches, data=st.data())
def test_patchify_unpatchify_round_trip_on_mixed_sizes(patch, data):
    pf, ph, pw = patch
    c = data.draw(st.integers(1, 3))
    grids = data.draw(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=5))
    # Repeat some sizes so the shape-grouped path runs with groups of several samples.
    grids = grids + grids[: data.draw(st.integers(0, len(grids)))]
    latents = [torch.randn(c, gf * pf, gh * ph, gw * pw) for gf, gh, gw in grids]
    p = Patch3D(Patch3DConfig(patch_size=patch))
    out = p.patchify(latents)
    d = c * pf * ph * pw
    assert out.tokens.shape == (sum(gf * gh * gw for gf, gh, gw in grids), d)
    assert out.lens.tolist() == [gf * gh * gw for gf, gh, gw in grids]
    assert out.pos.dtype == torch.long and out.pos.shape == (out.tokens.shape[0], 3)
    back = p.unpatchify(out.tokens, out.lens, out.shapes)
    assert all(torch.equal(x, y) for x, y in zip(latents, back))
    # Positions are the raster grid of each sample, in patch units.
    for (gf, gh, gw), pos in zip(grids, packing.split(out.pos, out.lens)):
        assert pos.max(0).values.tolist() == [gf - 1, gh - 1, gw - 1]
        assert len({tuple(r) for r in pos.tolist()}) == gf * gh * gw


def test_patch_features_follow_the_flux_layout():
    """For one frame: token (y, x) holds latent[c, y*ph + i, x*pw + j] at feature c*ph*pw + i*pw + j."""
    lat = torch.arange(2 * 1 * 4 * 6, dtype=torch.float32).view(2, 1, 4, 6)
    out = Patch3D().patchify([lat])
    flux = lat[:, 0].view(2, 2, 2, 3, 2).permute(1, 3, 0, 2, 4).reshape(6, 8)  # c (h ph) (w pw) -> (h w) (c ph pw)
    assert torch.equal(out.tokens, flux)
    assert out.pos.tolist() == [[0, y, x] for y in range(2) for x in range(3)]


def test_patchify_keeps_input_order_and_accepts_a_batch_tensor():
    p = Patch3D(Patch3DConfig(patch_size=(1, 2, 2)))
    small, big = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 4, 6)
    out = p.patchify([big, small, big])
    assert out.lens.tolist() == [6, 1, 6]
    assert torch.equal(packing.split(out.tokens, out.lens)[1], p.patchify([small]).tokens)
    batch = torch.randn(2, 3, 1, 4, 4)
    assert torch.equal(p.patchify(batch).tokens, p.patchify(list(batch)).tokens)


def test_indivisible_size_is_a_clear_user_error():
    p = Patch3D(Patch3DConfig(patch_size=(1, 2, 2)))
    with pytest.raises(MinfmError, match=r"sample 1: latent of shape \(4, 1, 5, 4\) is not divisible by patch_size \(1, 2, 2\) \(height 5 % 2"):
        p.patchify([torch.zeros(4, 1, 4, 4), torch.zeros(4, 1, 5, 4)])
    with pytest.raises(MinfmError, match="share their channel count"):
        p.patchify([torch.zeros(4, 1, 4, 4), torch.zeros(3, 1, 4, 4)])
    with pytest.raises(MinfmError, match=r"\(C, F, H, W\)"):
        p.patchify([torch.zeros(4, 4, 4)])


def test_sizes_helpers():
    p = Patch3D(Patch3DConfig(patch_size=(2, 2, 2)))
    assert p.num_tokens((16, 4, 32, 16)) == 2 * 16 * 8
    assert p.token_dim(16) == 128
