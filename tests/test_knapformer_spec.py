"""Bag specs, configs, recipe checks and the simulate CLI."""

from __future__ import annotations

import json

import attrs
import pytest

from minfm_core.cli.main import main
from minfm_core.errors import MinfmError
from minfm_core.registry import get_registry
from minfm_plugins.knapformer import check_recipe
from minfm_plugins.knapformer.config import KnapformerConfig
from minfm_plugins.knapformer.spec import parse_bags


@pytest.mark.parametrize(
    "text,size,ranks",
    [("g1n8", 8, ((0,), (1,), (2,), (3,), (4,), (5,), (6,), (7,))),
     ("g2n2", 4, ((0, 1), (2, 3))),
     ("g4n1+g1n2", 6, ((0,), (1,), (2, 3, 4, 5)))],
)
def test_parse(text, size, ranks):
    spec = parse_bags(text)
    assert spec.size == size and spec.bag_ranks == ranks


@pytest.mark.parametrize("text", ["1x4", "g2n4junk", "g0n1", "g1n0", "", "g1n1+", " g1n1", "G1N1", "g1n1+g1n2"])
def test_parse_errors_name_the_form(text):
    with pytest.raises(MinfmError, match=r"g\{G\}n\{N\}|appears twice"):
        parse_bags(text)


def test_a_spec_holds_at_most_a_launch_of_ranks():
    """A spec names ranks one by one (bag_ranks), so a spec of 10**35 ranks used to hang whatever read it."""
    from minfm_core.launch_env import MAX_WORLD_SIZE

    assert parse_bags(f"g{MAX_WORLD_SIZE // 2}n2").size == MAX_WORLD_SIZE
    for text in (f"g{MAX_WORLD_SIZE}n2", "g1000000000000000n100000000000000000000", f"g1n{MAX_WORLD_SIZE}+g2n1"):
        with pytest.raises(MinfmError, match=f"more than {MAX_WORLD_SIZE} ranks"):
            parse_bags(text)


def test_config_validates_bags():
    with pytest.raises(ValueError, match="expected 'g\\{G\\}n\\{N\\}'"):
        KnapformerConfig(bags="1x4")
    assert KnapformerConfig().gamma == 0.5


@pytest.mark.parametrize("gamma", [1e-320, 5e-324, 1e-7, -1e-9, 100.5])
def test_config_gamma_is_0_or_within_its_range(gamma):
    """`[balancer] gamma = 1e-320` passed `minfm check`, then overflowed every load."""
    from minfm_core.config import structure
    from minfm_core.errors import RecipeError

    with pytest.raises(RecipeError, match=r"balancer\.gamma: must be in \[1e-06, 100\] or 0"):
        structure({"gamma": gamma}, KnapformerConfig, "balancer")
    for ok in (0.0, 1e-6, 0.5, 100.0):
        assert structure({"gamma": ok}, KnapformerConfig, "balancer").gamma == ok


def test_registered():
    reg = get_registry()
    assert {"knapformer", "none"} <= set(reg.names("balancer"))
    assert reg.get("balancer", "knapformer").config is KnapformerConfig


@attrs.frozen
class _Den:
    d_model: int = 256
    d_head: int = 64


class _Recipe:
    def __init__(self, bags, den=_Den()):
        self.cfgs = {"balancer": KnapformerConfig(bags=bags), "model.denoiser": den}

    def config(self, path):
        return self.cfgs.get(path)


def test_check_recipe():
    assert check_recipe(_Recipe("g2n2"), 8) == []
    problems = check_recipe(_Recipe("g1n3"), 8)
    assert len(problems) == 1 and "world size 8 is not divisible by the 3 GPUs" in problems[0]
    problems = check_recipe(_Recipe("g1n1+g8n1"), 9)
    assert len(problems) == 1 and "4 attention heads are not divisible by the G = 8 GPUs of a bag in" in problems[0]
    # every bag's G counts, not the largest's alone (3 heads: g3 fits, g2 does not)
    problems = check_recipe(_Recipe("g2n1+g3n1", _Den(d_model=24, d_head=8)), 5)
    assert len(problems) == 1 and "3 attention heads are not divisible by the G = 2 GPUs of a bag" in problems[0]


def test_a_bag_spec_of_thousands_of_digits_is_one_short_line():
    """int() of a 5,000-digit G raised its own ValueError: a traceback, 'a bug in minFM'."""
    with pytest.raises(MinfmError, match=r"more than \d+ ranks") as exc:
        parse_bags("g" + "1" * 5000 + "n1")
    assert len(str(exc.value)) < 400


def test_simulate_cli(tmp_path, capsys):
    out = tmp_path / "trace.json"
    assert main(["balance", "simulate", "--bags", "g1n4", "--bags", "g2n2", "--synthetic", "mixed",
                 "--steps", "2", "--trace-out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "original" in text and "ours" in text and "g2n2" in text
    trace = json.loads(out.read_text())
    assert len(trace) == 2 and len(trace[0]) == 4
    assert main(["balance", "simulate", "--bags", "g1n4", "--trace", str(out)]) == 0


def test_simulate_cli_errors(tmp_path, capsys):
    assert main(["balance", "simulate", "--bags", "1x4", "--synthetic", "mixed"]) == 2
    assert "expected 'g{G}n{N}'" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1}')
    assert main(["balance", "simulate", "--bags", "g1n4", "--trace", str(bad)]) == 2
    bad.write_text("[[[1, 2]], [[3]]]")
    assert main(["balance", "simulate", "--bags", "g1n4", "--trace", str(bad)]) == 2
    capsys.readouterr()


@pytest.mark.parametrize("lengths", ["[10, 100000000000000000000000000000]", "[10, true]", "[10, -1]", "[10, 2.5]",
                                     "[10, 16777217]"])
def test_a_trace_length_is_a_whole_number_of_tokens_within_bounds(tmp_path, capsys, lengths):
    """A length of 1e29 ended in numpy's OverflowError (a traceback); JSON true counted as 1 token."""
    bad = tmp_path / "t.json"
    bad.write_text(f"[[{lengths}, [3]]]")
    assert main(["balance", "simulate", "--bags", "g1n2", "--trace", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(whole numbers from 0 to 16777216)" in err[0], err


def test_simulate_recipe(tmp_path, capsys):
    """`minfm balance simulate RECIPE` draws the recipe's data: shapes images + vocab prompts."""
    from conftest import ROOT

    out = tmp_path / "trace.json"
    assert main(["balance", "simulate", str(ROOT / "recipes" / "quickstart.toml"), "--world-size", "4",
                 "--bags", "g1n4", "--bags", "g2n2", "--steps", "2", "--batch-size", "3", "--trace-out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "g2n2" in text and "ours" in text and "d=128" in text
    trace = json.loads(out.read_text())
    assert len(trace) == 2 and [len(r) for r in trace[0]] == [3, 3, 3, 3]
    # 32x32 .. 48x32 pixels, 2x2 patches: 256-384 image tokens, plus 2-32 vocab tokens, or 1
    # for the empty prompt that train.text_dropout puts in place of some captions
    assert all(257 <= v <= 384 + 32 for step in trace for r in step for v in r)
    assert main(["balance", "simulate", "--trace", str(out)]) == 2  # neither --bags nor --world-size
    assert main(["balance", "simulate", str(ROOT / "recipes" / "quickstart.toml"), "--trace", str(out),
                 "--bags", "g1n4"]) == 2
