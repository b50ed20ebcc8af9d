"""docs/flux.md matches the code: ``load_pretrained``'s signature and dtype, ``minfm export diffusers``'s flags."""

from __future__ import annotations

import argparse
import inspect
import re

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT
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


DOC = (ROOT / "docs" / "flux.md").read_text()


def test_documented_load_pretrained_signature_is_the_codes():
    params = inspect.signature(load_pretrained).parameters.values()
    code = ", ".join(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}" for p in params)
    assert f"`load_pretrained({code})`" in DOC


def _export_parser() -> argparse.ArgumentParser:
    from minfm_plugins.flux.export_cli import add_export_command

    sub = argparse.ArgumentParser(prog="minfm").add_subparsers()
    add_export_command(sub)
    return sub.choices["export"]._subparsers._group_actions[0].choices["diffusers"]


@pytest.mark.parametrize("flag", ["--flavor", "--dtype"])
def test_documented_export_choices_are_the_parsers(flag):
    (action,) = [a for a in _export_parser()._actions if flag in a.option_strings]
    usage = re.search(r"minfm export diffusers SRC OUT_DIR .*", DOC).group(0)
    readme = (ROOT / "README.md").read_text()
    if flag == "--dtype":
        assert f"[--dtype {'|'.join(action.choices)}]" in usage and f"[--dtype {'|'.join(action.choices)}]" in readme
    else:
        assert f"`--flavor {'|'.join(action.choices)}`" in DOC
        assert f"`--flavor {'|'.join(action.choices)}`" in readme
