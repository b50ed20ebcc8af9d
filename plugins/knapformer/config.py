"""Configs of the balancers (recipe table ``[balancer]``); no torch here."""

from __future__ import annotations

from minfm_core.config import config, field
from minfm_core.validators import Range
from minfm_core.errors import MinfmError

from .spec import parse_bags

#: The attention term's weight: FLUX-sized models sit near 0.5; beyond 100 attention is all that counts.
MAX_GAMMA = 100.0
#: A load above the longest-first max by more than 100% is no balance at all.
MAX_TOLERANCE = 1.0


def _valid_bags(_inst, _attr, value: str) -> None:
    try:
        parse_bags(value)
    except MinfmError as exc:  # attrs validators speak ValueError; the text is kept
        raise ValueError(str(exc)) from None


@config
class KnapformerConfig:
    """KnapFormer: balance packed-sequence compute across ranks, locality-aware."""

    bags: str = field("g1n1", doc="bag spec: 'g{G}n{N}' terms joined by '+', N bags of G GPUs", validator=_valid_bags)
    gamma: float = field(
        0.5, doc="weight of the attention term in w(L) = 24 L d^2 + gamma 4 L^2 d", validator=Range(0, MAX_GAMMA)
    )
    tolerance: float = field(
        0.0,
        doc="a plan that keeps tokens in place may be this fraction above the longest-first rule's max load",
        validator=Range(0, MAX_TOLERANCE),
    )


@config
class NoBalancerConfig:
    """No balancing: every rank keeps its own sequences."""
