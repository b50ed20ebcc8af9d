"""``load_pretrained(model, ref, device=None, dtype=None)`` as docs/flux.md documents it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from flux_helpers import random_flux
from minfm_plugins.flux.config import FluxConfig
from minfm_plugins.flux.model import build_flux
from minfm_plugins.flux.state_dict import load_pretrained


@pytest.mark.parametrize(("dtype", "want"), [(None, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_load_pretrained_casts_to_dtype(tmp_path, dtype, want):
    model = random_flux()
    sd = model.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "flux1-dev.safetensors"))
    with torch.device("meta"):
        target = build_flux(FluxConfig(flavor="flux-debug"), load_weights=False, attention=model.attention)
    load_pretrained(target, str(tmp_path / "flux1-dev.safetensors"), dtype=dtype)
    got = target.state_dict()
    assert {t.dtype for t in got.values()} == {want}
    assert all(torch.equal(got[k], sd[k].to(want)) for k in sd)
