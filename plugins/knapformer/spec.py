"""Bag specs: ``g{G}n{N}`` terms joined by ``+`` (N bags of G GPUs each).

``g1n8`` is eight single-GPU bags; ``g1n2+g2n1+g4n1`` is two single-GPU bags, one
2-GPU bag and one 4-GPU bag, S = 8 ranks in all. Bags take consecutive ranks in
increasing G, so multi-GPU bags sit on neighbouring (usually NVLink-connected) GPUs.
Pure Python: importing this module stays cheap (the config validates with it).
"""

from __future__ import annotations

import re

import attrs

from minfm_core.errors import MinfmError
from minfm_core.launch_env import MAX_WORLD_SIZE

_TERM = re.compile(r"g([1-9][0-9]*)n([1-9][0-9]*)")
FORM = "'g{G}n{N}' terms joined by '+', e.g. 'g1n8' or 'g1n2+g2n1+g4n1' (N bags of G GPUs each)"


@attrs.frozen
class BagSpec:
    """A parsed bag spec: ``terms`` are (G, N) pairs in increasing G."""

    terms: tuple[tuple[int, int], ...]

    @property
    def size(self) -> int:
        """S: ranks in one balance group."""
        return sum(g * n for g, n in self.terms)

    @property
    def bag_sizes(self) -> tuple[int, ...]:
        """G of every bag, in bag order (increasing G)."""
        return tuple(g for g, n in self.terms for _ in range(n))

    @property
    def bag_ranks(self) -> tuple[tuple[int, ...], ...]:
        """The ranks (within the balance group) of every bag: consecutive, in bag order."""
        out, start = [], 0
        for g in self.bag_sizes:
            out.append(tuple(range(start, start + g)))
            start += g
        return tuple(out)

    @property
    def max_gpus(self) -> int:
        """The largest G."""
        return self.terms[-1][0]

    def __str__(self) -> str:
        return "+".join(f"g{g}n{n}" for g, n in self.terms)


def parse_bags(text: str) -> BagSpec:
    """Parse a bag spec strictly (the whole string); raise MinfmError naming the expected form."""
    if not isinstance(text, str) or not text:
        raise MinfmError(f"bag spec {text!r}: expected {FORM}")
    terms: dict[int, int] = {}
    for part in text.split("+"):
        m = _TERM.fullmatch(part)
        if m is None:
            shown = repr(part) if len(part) <= 40 else repr(part[:30]) + f"... ({len(part):,} characters)"
            raise MinfmError(f"bag spec {text[:80]!r}{'...' if len(text) > 80 else ''}: bad term {shown}; expected {FORM}")
        if max(len(m.group(1)), len(m.group(2))) > len(str(MAX_WORLD_SIZE)):  # (int() of 5,000 digits raises)
            raise MinfmError(f"bag spec {text[:80]!r}{'...' if len(text) > 80 else ''}: more than "
                             f"{MAX_WORLD_SIZE} ranks (the most a launch may have)")
        g, n = int(m.group(1)), int(m.group(2))
        if g in terms:
            raise MinfmError(f"bag spec {text!r}: G={g} appears twice; write it once as g{g}n{terms[g] + n}")
        terms[g] = n
        if sum(g * n for g, n in terms.items()) > MAX_WORLD_SIZE:
            raise MinfmError(f"bag spec {text!r}: more than {MAX_WORLD_SIZE} ranks (the most a launch may have)")
    return BagSpec(tuple(sorted(terms.items())))
