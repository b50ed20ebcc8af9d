"""Configs of the balancers (recipe table ``[balancer]``); no torch here."""

from __future__ import annotations

from typing import ClassVar

from minfm_core.config import config, field
from minfm_core.validators import Range
from minfm_core.errors import MinfmError

from .spec import parse_bags

#: The attention term's weight: FLUX-sized models sit near 0.5; beyond 100 attention is all that counts.
MAX_GAMMA = 100.0
#: The smallest non-zero gamma. The attention term is gamma L / (6 d) of the linear one: at
#: 1e-6 that is under 0.02% for 65,536 tokens at d = 64, so a smaller gamma means nothing
#: that 0 (linear layers only) does not say. The planner takes gamma exactly as its decimal
#: (planner.gamma_fraction): 1e-320 made a denominator of 10^320, past any float.
MIN_GAMMA = 1e-6
#: gamma's range, for the recipe field, the ``--gamma`` flag and the planner alike.
GAMMA = Range(MIN_GAMMA, MAX_GAMMA, also=(0,))
#: A load above the longest-first max by more than 100% is no balance at all.
MAX_TOLERANCE = 1.0


def _valid_bags(_inst, attribute, value: str) -> None:
    try:
        parse_bags(value)
    except MinfmError as exc:  # attrs validators speak ValueError; the text is kept
        raise ValueError(f"{attribute.name}: {exc}") from None


@config
class KnapformerConfig:
    """KnapFormer: balance packed-sequence compute across ranks, locality-aware."""

    #: The original minFM's balancer keys: an unknown key answers with its name here (docs/plugins.md).
    former_names: ClassVar[dict[str, str]] = {"dit_balancer_specs": "bags", "dit_balancer_gamma": "gamma",
                                              "use_dit_balancer": "balancer.name"}

    bags: str = field("g1n1", doc="bag spec: 'g{G}n{N}' terms joined by '+', N bags of G GPUs", validator=_valid_bags)
    gamma: float = field(
        0.5, doc="weight of the attention term in w(L) = 24 L d^2 + gamma 4 L^2 d: 0 (linear layers only) or 1e-6 to 100",
        validator=GAMMA,
    )
    tolerance: float = field(
        0.0,
        doc="a plan that keeps tokens in place may be this fraction above the longest-first rule's max load",
        validator=Range(0, MAX_TOLERANCE),
    )


@config
class NoBalancerConfig:
    """No balancing: every rank keeps its own sequences."""

    #: The seed's balancer keys, met here first where balancer.name is left at "none".
    former_names: ClassVar[dict[str, str]] = {"dit_balancer_specs": "balancer.bags",  # (name = "knapformer")
                                              "dit_balancer_gamma": "balancer.gamma",
                                              "use_dit_balancer": "balancer.name"}
