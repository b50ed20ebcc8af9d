"""The pure planner: coverage, determinism, balance vs the original rule, locality, edge cases."""

from __future__ import annotations

import random
import re
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from minfm_plugins.knapformer import original, planner, simulate
from minfm_plugins.knapformer.spec import parse_bags

SPECS = ["g1n4", "g2n2", "g1n2+g2n1", "g4n1", "g1n1+g3n1", "g1n2+g2n1+g4n1", "g1n1+g8n1"]


def exact_max(p: planner.Plan) -> tuple[int, int]:
    """Max per-GPU load as an exact fraction (numerator, denominator), from integer workloads."""
    loads = [0] * len(p.spec.bag_sizes)
    for b, w in zip(p.bag_of.tolist(), p.work.tolist()):
        loads[b] += int(w)
    return max(((load, g) for load, g in zip(loads, p.spec.bag_sizes)), key=lambda t: t[0] / t[1])


def not_worse(ours: planner.Plan, ref: planner.Plan, tolerance: float = 0.0) -> bool:
    (a, ga), (b, gb) = exact_max(ours), exact_max(ref)
    return Fraction(a, ga) <= Fraction(b, gb) * (1 + Fraction(tolerance))


def check_cover(p: planner.Plan) -> None:
    """Every token of every sequence is assigned exactly once, in contiguous non-empty chunks."""
    c = p.chunks
    assert (c[:, 4] > 0).all()
    for s, length in enumerate(p.lens.tolist()):
        rows = c[c[:, 0] == s]
        assert rows[:, 4].sum() == length
        assert (rows[:, 3] == np.cumsum(rows[:, 4]) - rows[:, 4]).all()
        if length:
            ranks = p.spec.bag_ranks[int(p.bag_of[s])]
            assert set(rows[:, 2].tolist()) <= set(ranks)
    src = np.repeat(np.arange(p.spec.size), p.counts)
    assert (c[:, 1] == src[c[:, 0]]).all()
    assert p.problems() == []


lens_strategy = st.integers(min_value=1, max_value=6000)


@st.composite
def traces(draw):
    spec = parse_bags(draw(st.sampled_from(SPECS)))
    per_rank = st.lists(lens_strategy, min_size=0, max_size=6)
    return spec, draw(st.lists(per_rank, min_size=spec.size, max_size=spec.size))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(traces(), st.sampled_from([0.0, 0.02]), st.sampled_from([0.0, 0.5, 1.0, 0.0004]))
def test_properties(trace, tolerance, gamma):
    spec, lens = trace
    ours = planner.plan(lens, spec, d=64, gamma=gamma, tolerance=tolerance)
    ref = original.plan(lens, spec, d=64, gamma=gamma)
    check_cover(ours)
    assert not_worse(ours, ref, tolerance)
    # The fast reference pass is the original rule exactly.
    assert (planner.plan(lens, spec, d=64, gamma=gamma, locality=False).bag_of == ref.bag_of).all()
    # Determinism: the same inputs give the same plan (hash), however the lists were built.
    again = planner.plan([list(x) for x in lens], str(spec), d=64, gamma=gamma, tolerance=tolerance)
    assert again.digest() == ours.digest()
    # Per GPU (chunk remainders included) never worse than the original rule (x 1 + tolerance) by 0.1%.
    assert ours.balance_gpu <= ref.balance_gpu * (1 + tolerance) * 1.001 + 1e-12


@pytest.mark.parametrize("name", sorted(simulate.SYNTHETIC))
@pytest.mark.parametrize("bags", ["g1n8", "g2n4", "g1n2+g2n1+g4n1"])
def test_synthetic_traces_at_8_ranks(name, bags):
    for lens in simulate.synthetic(name, 8, steps=2):
        ours, ref = planner.plan(lens, bags, 3072), original.plan(lens, bags, 3072)
        check_cover(ours)
        assert not_worse(ours, ref)
        assert ours.balance_gpu <= ref.balance_gpu * 1.001
        assert ours.moved_fraction <= ref.moved_fraction + 0.01  # chunk boundaries differ slightly
        assert ours.moved_tokens >= planner.lower_bound_moved(ours) - 1e-6


def test_balanced_input_moves_nothing():
    lens = [[257] * 32 for _ in range(8)]
    p = planner.plan(lens, "g1n8", 3072)
    assert p.moved_tokens == 0 and p.balance_after == pytest.approx(1.0)
    assert original.plan(lens, "g1n8", 3072).moved_fraction > 0.85


def test_near_balanced_moves_little():
    for lens in simulate.synthetic("near_balanced", 8, 4):
        p = planner.plan(lens, "g1n8", 3072)
        assert 1.06 <= p.balance_before <= 1.07
        assert p.moved_fraction <= 0.2 and p.balance_after <= 1.01


def test_remainders_rotate_over_a_bags_gpus():
    """257-token sequences on a 4-GPU bag: every GPU of the bag gets the same tokens (+-1),
    so the per-GPU balance is the per-bag one (the original's rolling remainder is not)."""
    lens = [[257] * 32 for _ in range(8)]
    ours, ref = planner.plan(lens, "g1n2+g2n1+g4n1", 3072), original.plan(lens, "g1n2+g2n1+g4n1", 3072)
    tokens = ours.tokens_per_rank()
    assert tokens[4:].max() - tokens[4:].min() <= 1 and tokens[2:4].max() - tokens[2:4].min() <= 1
    assert ours.balance_gpu == pytest.approx(ours.balance_after, abs=1e-4)
    assert ours.balance_gpu < ref.balance_gpu


def test_gamma_is_exact():
    assert planner.gamma_fraction(0.4) == Fraction(2, 5)
    assert planner.gamma_fraction(0.0004) == Fraction(1, 2500)
    # 0.0004 used to round to 0 (limit_denominator(1000)): the attention term now counts.
    assert planner.workload(1000, 64, 0.0004) > planner.workload(1000, 64, 0.0)
    assert planner.workload(1000, 64, 0.0004) == 1000 * (6 * 64 * 2500 + 1 * 1000)
    # A gamma with many digits: exact Python integers (int64 would overflow), same plan rules.
    lens = [[5000, 300, 40], [7000], [1, 2, 3], [2500, 2500]]
    p = planner.plan(lens, "g1n2+g2n1", 3072, gamma=0.123456789012345)
    assert p.work.dtype == object and p.problems() == []
    ref = original.plan(lens, "g1n2+g2n1", 3072, gamma=0.123456789012345)
    assert (planner.plan(lens, "g1n2+g2n1", 3072, gamma=0.123456789012345, locality=False).bag_of == ref.bag_of).all()
    assert not_worse(p, ref)


def test_the_finest_gamma_keeps_every_load_a_finite_float():
    """gamma 1e-320 made denominators of 10^320 (OverflowError in load_before / gpu_load); the
    range's worst case, the smallest gamma with the most digits, at the widest d and longest
    sequences, stays well inside a float."""
    from minfm_core.validators import MAX_TOKENS, MAX_WIDTH

    lens = [[MAX_TOKENS, 3], [MAX_TOKENS - 1], [7, 1, MAX_TOKENS], [2]]
    for gamma in (1.2345678901234567e-06, 1e-6, 0.0, 100.0):
        p = planner.plan(lens, "g1n2+g2n1", MAX_WIDTH, gamma=gamma)
        assert p.problems() == []
        for load in (p.load_before(), p.load_after(), p.gpu_load()):
            assert np.isfinite(load).all() and load.max() > 0
        row = simulate.evaluate([lens], "g1n2+g2n1", MAX_WIDTH, gamma)
        assert all(np.isfinite(v["max_mean"]) for v in row.values())


def shuffled_rows(p: planner.Plan) -> list[tuple[int, ...]]:
    """The plan's chunks without sample ids: (src, sequence length, dst, offset, length), sorted."""
    c = p.chunks
    return sorted(zip(c[:, 1].tolist(), p.lens[c[:, 0]].tolist(), *(c[:, k].tolist() for k in (2, 3, 4))))


@pytest.mark.parametrize("bags", ["g1n8", "g1n2+g2n1+g4n1"])
def test_plan_ignores_the_order_within_a_rank(bags):
    """A rank may list its sequences in any order: the same sequences go to the same places."""
    rng = random.Random(0)
    for name in ("mixed", "imagenet", "video"):
        for lens in simulate.synthetic(name, 8, steps=2):
            shuffled = [rng.sample(r, len(r)) for r in lens]
            a, b = planner.plan(lens, bags, 3072), planner.plan(shuffled, bags, 3072)
            assert shuffled_rows(a) == shuffled_rows(b)
            assert (a.gpu_load() == b.gpu_load()).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [({"d": 0}, "hidden width d must be a whole number > 0, got 0"),
     ({"d": 1.5}, "hidden width d must be a whole number > 0"),
     ({"gamma": -0.5}, "gamma must be in [1e-06, 100] or 0, got -0.5"),
     ({"gamma": float("nan")}, "gamma must be in [1e-06, 100] or 0"),
     # exact as its decimal, 1e-320 is 1 / 10^320: the float loads overflowed (OverflowError)
     ({"gamma": 1e-320}, "gamma must be in [1e-06, 100] or 0, got 1e-320"),
     ({"gamma": 101.0}, "gamma must be in [1e-06, 100] or 0"),
     ({"tolerance": -0.01}, "tolerance must be >= 0"),
     ({"tolerance": float("inf")}, "tolerance must be >= 0")],
)
def test_numbers_are_validated(kwargs, match):
    from minfm_core.errors import MinfmError

    args = {"d": 64, **kwargs}
    with pytest.raises(MinfmError, match=re.escape(match)):
        planner.plan([[10], [20]], "g1n2", **args)


def test_fewer_sequences_than_gpus_and_short_sequences():
    for bags in ("g1n8", "g4n2", "g2n1+g4n1+g2n0".replace("+g2n0", "")):
        spec = parse_bags(bags)
        lens = [[] for _ in range(spec.size)]
        lens[0] = [1, 2, 3]
        p = planner.plan(lens, spec, 64)
        check_cover(p)


def test_sequence_larger_than_any_bag_is_split_over_the_largest():
    lens = [[100_000], [10], [10], [10], [10], [10]]
    p = planner.plan(lens, "g1n2+g4n1", 64)
    check_cover(p)
    assert p.spec.bag_sizes[int(p.bag_of[0])] == 4
    assert sorted(p.chunks[p.chunks[:, 0] == 0, 4].tolist()) == [25_000] * 4


def test_empty_and_zero_length():
    p = planner.plan([[], [], [0, 5], []], "g2n2", 64)
    check_cover(p)
    assert p.chunks[:, 4].sum() == 5
    assert planner.plan([[], []], "g1n2", 64).chunks.shape == (0, 5)


def test_bad_inputs_are_clear():
    from minfm_core.errors import MinfmError

    with pytest.raises(MinfmError, match="covers 4 ranks"):
        planner.plan([[1]], "g1n4", 64)
    with pytest.raises(MinfmError, match=">= 0"):
        planner.plan([[-1]], "g1n1", 64)


def test_workload_is_exact_integer_model():
    # w(L) = 24 L d^2 + gamma 4 L^2 d, scaled by den / (4 d): L (6 d den + num L)
    assert planner.workload(100, 64, 0.5) == 100 * (6 * 64 * 2 + 1 * 100)
    w = planner.workloads(np.array([100, 200]), 64, 0.5)
    ratio = (24 * 200 * 64**2 + 0.5 * 4 * 200**2 * 64) / (24 * 100 * 64**2 + 0.5 * 4 * 100**2 * 64)
    assert w[1] / w[0] == pytest.approx(ratio)



def test_last_resort_is_the_renamed_longest_first_plan(monkeypatch):
    """If every locality strategy got stuck, the longest-first plan with its bags renamed
    (within a bag size) to keep the most tokens home: its balance, fewer tokens moved."""
    from minfm_plugins.knapformer import locality

    monkeypatch.setattr(locality, "settle", lambda *args: None)
    for bags in ("g1n8", "g1n2+g2n1+g4n1"):
        for lens in simulate.synthetic("mixed", 8, steps=2):
            p, ref = planner.plan(lens, bags, 3072), planner.plan(lens, bags, 3072, locality=False)
            assert p.strategy == "longest_first" and p.problems() == []
            assert exact_max(p)[0] * exact_max(ref)[1] == exact_max(ref)[0] * exact_max(p)[1]
            assert p.moved_tokens <= ref.moved_tokens


@pytest.mark.parametrize("kw, why", [(dict(d=np.int64(-5)), "hidden width d must be a whole number > 0"),
                                     (dict(d=64, gamma=np.float32(-1)), "gamma must be in"),
                                     (dict(d=64, gamma=np.float32("nan")), "gamma must be in"),
                                     (dict(d=64, tolerance=np.float32(-0.5)), "tolerance must be >= 0")])
def test_numpy_scalars_are_held_to_the_ranges(kw, why):
    """A range passed every value that was not a Python int or float: np.int64(-5) gave
    negative workloads, a NaN gamma a bare ValueError."""
    from minfm_core.errors import MinfmError

    with pytest.raises(MinfmError, match=why):
        planner.plan([[1, 9, 4], [2]], "g1n2", **kw)
