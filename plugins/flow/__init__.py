"""Built-in plugin 'flow': the flow-matching building blocks every recipe composes.

Patchifier, probability path, time samplers / warpers / weighters, samplers and
guidance. Factories are lazy strings so that loading the plugin does not import torch.
See docs/components.md for the formulas.
"""

from minfm_core import hookimpl

from . import config as c

_PKG = "minfm_plugins.flow"


@hookimpl
def register_patchifiers(register):
    register("patch3d", f"{_PKG}.patchify:Patch3D", c.Patch3DConfig)


@hookimpl
def register_paths(register):
    register("rectified", f"{_PKG}.path:RectifiedPath", c.RectifiedConfig)


@hookimpl
def register_time_samplers(register):
    register("uniform", f"{_PKG}.time:UniformTimeSampler", c.UniformTimeConfig)
    register("logit_normal", f"{_PKG}.time:LogitNormalTimeSampler", c.LogitNormalTimeConfig)


@hookimpl
def register_time_warpers(register):
    register("resolution_shift", f"{_PKG}.time:ResolutionShift", c.ResolutionShiftConfig)
    register("none", f"{_PKG}.time:NoWarp", c.NoWarpConfig)


@hookimpl
def register_time_weighters(register):
    register("uniform", f"{_PKG}.time:UniformWeight", c.UniformWeightConfig)
    register("logit_normal", f"{_PKG}.time:LogitNormalWeight", c.LogitNormalWeightConfig)


@hookimpl
def register_samplers(register):
    register("euler", f"{_PKG}.samplers:Euler", c.EulerConfig)
    register("ddim_sde", f"{_PKG}.samplers:DDIMSDE", c.DDIMSDEConfig)
    register("heun", f"{_PKG}.samplers:Heun", c.HeunConfig)


@hookimpl
def register_guidances(register):
    register("cfg", f"{_PKG}.guidance:CFG", c.CFGConfig)
    register("ep_cfg", f"{_PKG}.guidance:EPCFG", c.EPCFGConfig)
