"""Every flow component is registered by the `flow` plugin with its config, and builds from it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from minfm_core.config import describe_fields, structure
from minfm_core.registry import get_registry
from minfm_plugins.flow import config as c

EXPECTED = {
    ("patchifier", "patch3d"): c.Patch3DConfig,
    ("path", "rectified"): c.RectifiedConfig,
    ("time_sampler", "uniform"): c.UniformTimeConfig,
    ("time_sampler", "logit_normal"): c.LogitNormalTimeConfig,
    ("time_warper", "resolution_shift"): c.ResolutionShiftConfig,
    ("time_warper", "none"): c.NoWarpConfig,
    ("time_weighter", "uniform"): c.UniformWeightConfig,
    ("time_weighter", "logit_normal"): c.LogitNormalWeightConfig,
    ("sampler", "euler"): c.EulerConfig,
    ("sampler", "ddim_sde"): c.DDIMSDEConfig,
    ("sampler", "heun"): c.HeunConfig,
    ("guidance", "cfg"): c.CFGConfig,
    ("guidance", "ep_cfg"): c.EPCFGConfig,
}


@pytest.mark.parametrize("kind,name", sorted(EXPECTED), ids=lambda v: str(v))
def test_registered_with_config(kind, name):
    comp = get_registry().get(kind, name)
    assert comp.plugin == "flow"
    assert comp.config is EXPECTED[(kind, name)]
    assert comp.doc  # first docstring line shows in `minfm plugins`
    assert all(f["doc"] for f in describe_fields(comp.config))
    obj = comp.build()
    assert obj.cfg == comp.config()
    assert callable(obj) or hasattr(obj, "patchify") or hasattr(obj, "noise")


def test_documented_defaults_and_recipe_tables():
    assert c.Patch3DConfig().patch_size == (1, 2, 2) and c.Patch3DConfig().vae_compression is None
    assert c.RectifiedConfig().compute_dtype == "fp32"
    assert c.ResolutionShiftConfig() == c.ResolutionShiftConfig(base_len=256, base_shift=0.5, max_len=4096, max_shift=1.15)
    assert c.DDIMSDEConfig().eta == 1.0 and c.CFGConfig().scale == 5.0
    # TOML arrays arrive as lists.
    assert structure({"patch_size": [1, 4, 4], "vae_compression": [1, 8, 8]}, c.Patch3DConfig).patch_size == (1, 4, 4)


def test_plugin_loads_without_torch():
    code = "import sys, minfm_plugins.flow, minfm_plugins.flow.config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
