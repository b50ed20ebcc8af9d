"""Clips on RoPE's time axis and in the resolution shift: frame index is position t; a clip's
token count (frames x h x w) sets its shift."""

from __future__ import annotations

import torch

from minfm_core.config import structure
from minfm_core.registry import get_registry
from minfm_plugins.flow.config import Patch3DConfig, ResolutionShiftConfig
from minfm_plugins.flow.patchify import Patch3D
from minfm_plugins.flow.time import ResolutionShift
from minfm_plugins.flux.rope import apply_rope, rope_tables


def test_patchify_puts_the_frame_index_on_the_time_axis():
    p = Patch3D(Patch3DConfig(patch_size=(1, 2, 2)))
    image, clip = torch.randn(3, 1, 8, 12), torch.randn(3, 5, 8, 8)
    out = p.patchify([image, clip])
    assert out.lens.tolist() == [1 * 4 * 6, 5 * 4 * 4]
    img_pos, clip_pos = out.pos[:24], out.pos[24:]
    assert img_pos[:, 0].eq(0).all()
    assert clip_pos[:, 0].tolist() == torch.arange(5).repeat_interleave(16).tolist()
    per_frame = clip_pos.view(5, 16, 3)[:, :, 1:]
    assert all(torch.equal(per_frame[0], per_frame[f]) for f in range(5))  # same (y, x) grid every frame
    # the tokens of frame f are that frame's patches
    back = p.unpatchify(out.tokens, out.lens, out.shapes)
    assert torch.equal(back[1], clip)
    assert torch.equal(out.tokens[24:40], p.patchify([clip[:, :1]]).tokens)
    # a temporal patch of 2 frames: position t counts frame pairs
    p2 = Patch3D(Patch3DConfig(patch_size=(2, 2, 2)))
    assert p2.patchify([torch.randn(3, 4, 4, 4)]).pos[:, 0].tolist() == [0] * 4 + [1] * 4


def test_rope_rotates_by_frame_distance_on_its_own_channels():
    axes, theta = (4, 6, 6), 10_000
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 16, generator=g), torch.randn(1, 1, 16, generator=g)

    def score(pq, pk):
        rq = apply_rope(q, rope_tables(torch.tensor([pq]), axes, theta))
        rk = apply_rope(k, rope_tables(torch.tensor([pk]), axes, theta))
        return float((rq * rk).sum())

    # relative: frames (1, 3) score as (0, 2); another frame distance scores differently
    assert abs(score([1, 2, 3], [3, 2, 3]) - score([0, 2, 3], [2, 2, 3])) < 1e-5
    assert abs(score([0, 2, 3], [2, 2, 3]) - score([0, 2, 3], [1, 2, 3])) > 1e-3
    # only the first axes[0] channels move with t
    a = apply_rope(q, rope_tables(torch.tensor([[0, 5, 7]]), axes, theta))
    b = apply_rope(q, rope_tables(torch.tensor([[4, 5, 7]]), axes, theta))
    assert torch.equal(a[..., 4:], b[..., 4:]) and not torch.allclose(a[..., :4], b[..., :4])


def test_the_flux_denoiser_sees_frame_positions():
    """Two frames of identical content get different outputs only through their time position."""
    comp = get_registry().get("denoiser", "flux")
    cfg = structure({"flavor": "flux-debug", "d_model": 32, "d_head": 16, "rope_axes": [4, 6, 6], "n_ds_blocks": 1,
                     "n_ss_blocks": 1, "d_img": 12, "d_txt": 8, "d_vec": 8}, comp.config)
    model = comp.build(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random weights everywhere: FLUX zero-initialises its output layers
        for prm in model.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.2)
    frame = torch.randn(3, 1, 4, 4, generator=g)
    p = Patch3D(Patch3DConfig(patch_size=(1, 2, 2)))
    clip = p.patchify([torch.cat([frame, frame], dim=1)])
    txt, txt_lens, t, vec = torch.randn(2, 8, generator=g), torch.tensor([2]), torch.tensor([0.5]), torch.randn(1, 8, generator=g)
    flat = clip.pos.clone()
    flat[:, 0] = 0  # both frames at t = 0: nothing tells them apart any more
    with torch.no_grad():
        v = model(clip.tokens, clip.pos, clip.lens, txt, txt_lens, t, vec=vec)
        v_flat = model(clip.tokens, flat, clip.lens, txt, txt_lens, t, vec=vec)
    assert float((v[:4] - v[4:]).abs().max()) > 1e-3
    assert torch.allclose(v_flat[:4], v_flat[4:], atol=1e-5)


def test_resolution_shift_counts_video_tokens():
    p = Patch3D(Patch3DConfig(patch_size=(1, 2, 2)))
    lens = p.patchify([torch.zeros(3, 1, 32, 32), torch.zeros(3, 9, 32, 32)]).lens
    assert lens.tolist() == [256, 9 * 256]
    warp = ResolutionShift(ResolutionShiftConfig(base_len=256, base_shift=0.5, max_len=4096, max_shift=1.15))
    mu = warp.mu(lens)
    assert float(mu[0]) == 0.5
    assert abs(float(mu[1]) - (0.5 + 0.65 * (2304 - 256) / (4096 - 256))) < 1e-12
    t = torch.full((2,), 0.5)
    shifted = warp(t, lens)
    assert float(shifted[1]) > float(shifted[0]) > 0.5  # more tokens: noisier
