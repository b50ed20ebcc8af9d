"""A third-party minFM plugin used by the tests: registers a time sampler.

It is a real distribution (see the .dist-info folder beside it): putting this folder
on sys.path makes importlib.metadata find its entry point in group ``minfm``.
"""

import attrs

from minfm_core import config, field, hookimpl


@config
class BetaConfig:
    """Beta(a, b) time sampling."""

    a: float = field(2.0, doc="first shape parameter", validator=attrs.validators.gt(0))
    b: float = field(2.0, doc="second shape parameter", validator=attrs.validators.gt(0))


class BetaSampler:
    def __init__(self, cfg: BetaConfig):
        self.cfg = cfg

    def __call__(self, n, *, generator=None, device=None):
        import torch

        dist = torch.distributions.Beta(torch.tensor(self.cfg.a), torch.tensor(self.cfg.b))
        return dist.sample((n,)).to(device=device)


@hookimpl
def register_time_samplers(register):
    register("beta", BetaSampler, BetaConfig)
