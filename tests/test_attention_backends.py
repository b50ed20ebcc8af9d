"""Attention backends on packed sequences: sdpa equals naive masked attention; CPU behaviour."""

import subprocess
import sys

import pytest
import torch

from minfm_core.errors import MinfmError
from minfm_core.packing import cu_seqlens, segment_ids
from minfm_core.registry import get_registry
from minfm_plugins.attention.backends import Auto, Flex, Sdpa, length_buckets


def naive(q, k, v, lens):
    """Full (L, L) attention with a same-sample mask, written out by hand."""
    seg = segment_ids(lens)
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(seg[None, :, None] != seg[None, None, :], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def qkv(lens, heads=3, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = int(sum(lens))
    return [torch.randn(L, heads, dim, generator=g, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize(
    "lens",
    [[5, 1, 9, 3], [4, 4, 4], [7], [40, 17, 41, 16, 40, 90, 18], [0, 3, 0, 5]],
    ids=["mixed", "uniform", "single", "buckets", "empty-samples"],
)
def test_sdpa_equals_naive_masked_attention_with_grads(lens):
    lens_t = torch.tensor(lens)
    q, k, v = qkv(lens)
    out = Sdpa()(q, k, v, cu_seqlens(lens_t), max(lens))
    ref = naive(q, k, v, lens_t)
    assert out.shape == q.shape
    assert (out - ref).abs().max() <= 1e-5
    g_out = torch.autograd.grad(out.square().sum(), (q, k, v))
    g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    assert max((a - b).abs().max().item() for a, b in zip(g_out, g_ref)) <= 1e-4


def test_length_buckets_bound_padding_and_cover_every_sample():
    lens = [40, 17, 41, 16, 40, 90, 18, 45, 46]
    groups = length_buckets(lens, ratio=1.125)
    assert sorted(i for g in groups for i in g) == list(range(len(lens)))
    assert [[lens[i] for i in g] for g in groups] == [[16, 17, 18], [40, 40, 41, 45], [46], [90]]
    assert all(max(lens[i] for i in g) <= 1.125 * min(lens[i] for i in g) for g in groups)


def test_auto_uses_sdpa_on_cpu():
    lens = torch.tensor([3, 8, 2])
    q, k, v = qkv(lens.tolist())
    assert torch.equal(Auto()(q, k, v, cu_seqlens(lens), 8), Sdpa()(q, k, v, cu_seqlens(lens), 8))


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
def test_flex_uncompiled_equals_sdpa_on_cpu():
    from minfm_plugins.attention.config import FlexConfig

    lens = torch.tensor([5, 11, 3])
    q, k, v = (x.detach() for x in qkv(lens.tolist()))
    try:
        out = Flex(FlexConfig(compile=False))(q, k, v, cu_seqlens(lens), 11)
    except (RuntimeError, NotImplementedError) as exc:  # some torch builds have no eager CPU flex
        pytest.skip(f"flex on CPU unavailable: {exc}")
    assert (out - naive(q, k, v, lens)).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["flash_attn", "flash_attn3", "torch_varlen"])
def test_cuda_backends_refuse_cpu_tensors_with_a_clear_error(name):
    backend = get_registry().get("attention", name).build()
    lens = torch.tensor([2, 3])
    q, k, v = qkv([2, 3])
    with pytest.raises(MinfmError, match=f"attention backend '{name}' needs CUDA"):
        backend(q, k, v, cu_seqlens(lens), 3)


def test_registry_lists_every_backend():
    assert {"sdpa", "flash_attn", "flash_attn3", "torch_varlen", "flex", "auto"} <= set(get_registry().names("attention"))


def test_plugins_import_no_torch():
    code = "import sys, minfm_plugins.attention, minfm_plugins.flux; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
