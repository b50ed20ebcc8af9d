"""`minfm balance simulate`: traces with video clips next to images, checked numbers."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT
from minfm_plugins.knapformer import simulate

from minfm_core.cli.main import main
from minfm_core.errors import MinfmError

QUICKSTART = str(ROOT / "recipes" / "quickstart.toml")


def test_video_trace_has_clips_next_to_images():
    """Every step has clips (longer than any image: 256-1024 px is at most 4,608 tokens)
    and images, on the same ranks too."""
    for step in simulate.synthetic("video", 8, steps=3):
        lens = [v for r in step for v in r]
        assert max(lens) > 4608 and min(lens) <= 4608
        assert any(max(r) > 4608 and min(r) <= 4608 for r in step)


def test_simulate_video_and_long_tail(capsys):
    for name in ("video", "long_tail", "near_balanced"):
        assert main(["balance", "simulate", "--synthetic", name, "--world-size", "8", "--bags", "g1n8",
                     "--bags", "g1n2+g2n1+g4n1", "--steps", "1"]) == 0
        out = capsys.readouterr().out
        assert "per GPU" in out and ">= moved" in out and "g1n2+g2n1+g4n1" in out


def test_recipe_samples_become_clips(tmp_path, capsys):
    """--clips 1: every sample is a clip of its own picture size, so every length grows."""
    traces = {}
    for share in ("0", "1"):
        out = tmp_path / f"t{share}.json"
        assert main(["balance", "simulate", QUICKSTART, "--world-size", "2", "--bags", "g1n2", "--steps", "1",
                     "--batch-size", "3", "--clips", share, "--clip-frames", "3", "--trace-out", str(out)]) == 0
        traces[share] = json.loads(out.read_text())
    capsys.readouterr()
    plain = [v for r in traces["0"][0] for v in r]
    clips = [v for r in traces["1"][0] for v in r]
    assert len(plain) == len(clips) == 6
    assert all(c > p for c, p in zip(clips, plain))


def test_dropped_prompts_count_the_empty_prompts_tokens(tmp_path, capsys):
    """The trainer trains a train.text_dropout share on "" (the simulator counted every prompt)."""
    traces = {}
    for p in ("0.0", "1.0"):
        out = tmp_path / f"t{p}.json"
        assert main(["balance", "simulate", QUICKSTART, "--world-size", "2", "--bags", "g1n2", "--steps", "2",
                     "--batch-size", "3", "--set", f"train.text_dropout={p}", "--trace-out", str(out)]) == 0
        traces[p] = [v for step in json.loads(out.read_text()) for r in step for v in r]
    capsys.readouterr()
    assert len(traces["0.0"]) == len(traces["1.0"]) == 12
    # the same samples (same order), each shorter by its prompt's tokens less the empty prompt's
    assert all(dropped < kept for dropped, kept in zip(traces["1.0"], traces["0.0"]))


@pytest.mark.parametrize(
    "args,message",
    [(["--synthetic", "video", "--world-size", "0"], "--world-size: expected a positive integer, got 0"),
     (["--synthetic", "video", "--bags", "g1n2", "--steps", "0"], "--steps: expected a positive integer, got 0"),
     (["--synthetic", "video", "--bags", "g1n2", "--tolerance", "-1"], "--tolerance: expected a number >= 0.0, got -1"),
     (["--synthetic", "video", "--bags", "g1n2", "--clips", "0.5"], "--clips mixes clips into a RECIPE"),
     ([QUICKSTART, "--bags", "g1n2", "--clips", "1.5"], "--clips: expected a number <= 1.0, got 1.5"),
     ([QUICKSTART, "--bags", "g1n2", "--clips", "0.5", "--clip-frames", "0"], "--clip-frames: expected a positive integer, got 0"),
     ([QUICKSTART, "--bags", "g1n2", "--text-range", "9", "3"], "--text-range: MAX 3 is below MIN 9")],
)
def test_numbers_are_checked(args, message, capsys):
    assert main(["balance", "simulate", *args]) == 2
    assert message in capsys.readouterr().err


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minfm: error: "), err
    return err[0]


def test_gamma_has_one_range_for_the_flag_the_recipe_and_the_planner(capsys):
    """gamma 1e-320 crashed the simulator (OverflowError: gamma is exact as a decimal, so
    its denominator was 10^320), from the flag and from a recipe that `minfm check` passed."""
    assert main(["balance", "simulate", "--synthetic", "mixed", "--world-size", "8", "--gamma", "1e-320"]) == 2
    assert "--gamma: expected a number in [1e-06, 100] or 0, got 1e-320" in _one_line_error(capsys)
    assert main(["check", QUICKSTART, "--set", 'balancer.name="knapformer"', "--set", "balancer.gamma=1e-320"]) == 2
    assert "balancer.gamma" in _one_line_error(capsys)
    assert main(["balance", "simulate", QUICKSTART, "--world-size", "2", "--steps", "1", "--batch-size", "2",
                 "--set", 'balancer.name="knapformer"', "--set", "balancer.gamma=1e-320"]) == 2
    assert "balancer.gamma" in _one_line_error(capsys)
    # 0 (linear layers only) and the ends of the range still plan
    for gamma in ("0", "1e-6", "100"):
        assert main(["balance", "simulate", "--synthetic", "mixed", "--world-size", "8", "--steps", "1",
                     "--gamma", gamma]) == 0
        assert f"gamma={float(gamma)}" in capsys.readouterr().out


def _write(path, text: str):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "trace,message",
    [  # one step of one more rank than a launch may have (3 MB: read, not planned)
     ("[[" + ",".join(["[]"] * (simulate.MAX_WORLD_SIZE + 1)) + "]]", "1048577 ranks per step; at most 1048576"),
     # per-rank lists over all steps: each costs a balance group's planning even when empty
     ("[" + ",".join(["[" + ",".join(["[]"] * 2**19) + "]"] * 3) + "]", "3 steps x 524288 ranks = 1572864 per-rank lists"),
     # sequences over all steps and ranks
     ("[[[" + ",".join(["1"] * (simulate.MAX_TRACE_SEQUENCES + 1)) + "]]]", "1048577 sequences; the simulator plans at most 1048576")],
    ids=["ranks", "rank-steps", "sequences"],
)
def test_a_trace_is_bounded_in_work_not_only_bytes(tmp_path, capsys, trace, message):
    """Only the bytes were capped: 20,000 one-sequence ranks (80 KB) took 11 s, hours at the cap."""
    path = _write(tmp_path / "w.json", trace)
    assert main(["balance", "simulate", "--trace", path, "--bags", "g1n1"]) == 2
    err = _one_line_error(capsys)
    assert f"trace {path}: " in err and message in err, err


def test_synthetic_and_recipe_draws_are_bounded_before_any_work(capsys):
    """`--synthetic imagenet --world-size 65536 --steps 100000` allocated until memory ran out."""
    cases = [(["--synthetic", "imagenet", "--world-size", "65536", "--steps", "100000"],
              "--synthetic imagenet --world-size 65536 --steps 100000: 100000 steps x 65536 ranks"),
             (["--synthetic", "imagenet", "--world-size", "65536", "--steps", "1"],  # 32 sequences a rank
              "65536 ranks x 1 steps x up to 32 = 2097152 sequences; the simulator plans at most 1048576"),
             ([QUICKSTART, "--world-size", "1024", "--steps", "100000", "--batch-size", "64"],
              "--world-size 1024 --steps 100000 --batch-size 64: 100000 steps x 1024 ranks")]
    for args, message in cases:
        assert main(["balance", "simulate", *args]) == 2
        assert message in _one_line_error(capsys)
    with pytest.raises(MinfmError, match="2097152 sequences"):
        simulate.synthetic("imagenet", 65536, steps=1)


def test_the_bound_on_a_synthetic_draw_is_an_upper_bound():
    for name, per_rank in simulate.PER_RANK.items():
        for seed in range(3):
            for world in (1, 2, 16):
                for step in simulate.synthetic(name, world, steps=2, seed=seed):
                    assert sum(map(len, step)) <= world * per_rank, name


def test_the_original_rules_scan_is_bounded(capsys):
    """It looks at every bag for every sequence: 65,536 one-GPU bags and 32,768 sequences
    (one step) took 7 minutes; refused before planning, naming the bag spec."""
    assert main(["balance", "simulate", "--synthetic", "few", "--world-size", "65536", "--steps", "1"]) == 2
    err = _one_line_error(capsys)
    assert "--bags g1n65536: --synthetic few has 32768 sequences" in err and "at most 1073741824" in err


@pytest.mark.parametrize("flag", ["--trace-out", "--trace"])
def test_an_empty_path_is_refused(tmp_path, monkeypatch, capsys, flag):
    """`--trace-out ''` was taken as not given: exit 0, nothing written."""
    monkeypatch.chdir(tmp_path)
    assert main(["balance", "simulate", "--synthetic", "mixed", "--world-size", "2", "--steps", "1", flag, ""]) == 2
    assert f"minfm: error: {flag}: empty value" == _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, ignored", [
    (["--synthetic", "few", "--world-size", "2", "--set", "train.lr=5"], "--set would be ignored with --synthetic few"),
    (["--synthetic", "few", "--world-size", "2", "--batch-size", "7", "--text-range", "1", "2"],
     "--batch-size, --text-range would be ignored with --synthetic few"),
    (["--synthetic", "few", "--world-size", "2", "--clip-frames", "9"], "--clip-frames would be ignored"),
    (["--trace", "{trace}", "--steps", "7"], "--steps would be ignored with --trace"),
    (["--trace", "{trace}", "--seed", "0"], "--seed would be ignored with --trace"),
])
def test_a_flag_the_source_does_not_read_is_refused(tmp_path, capsys, args, ignored):
    """They were accepted and ignored (exit 0): a user's --set train.lr=5 even went unchecked."""
    trace = tmp_path / "t.json"
    trace.write_text("[[[64, 32], [96]]]")
    assert main(["balance", "simulate", *(a.format(trace=trace) for a in args)]) == 2
    assert ignored in _one_line_error(capsys)


def test_trace_out_replaces_a_trace_and_nothing_else(tmp_path, capsys):
    """It wrote JSON over whatever it was given: its own recipe, a user's notes, /etc/passwd."""
    recipe = tmp_path / "r.toml"
    recipe.write_text((ROOT / "tests" / "recipes" / "tiny.toml").read_text().replace("../../", f"{ROOT}/"))
    notes, trace = tmp_path / "notes.txt", tmp_path / "t.json"
    notes.write_text("mine\n")
    before = recipe.read_text()
    assert main(["balance", "simulate", str(recipe), "--world-size", "1", "--steps", "1", "--trace-out", str(recipe)]) == 2
    assert f"--trace-out {recipe}: that is the input {recipe}" in _one_line_error(capsys)
    synthetic = ["balance", "simulate", "--synthetic", "few", "--world-size", "2", "--trace-out"]
    assert main([*synthetic, str(notes)]) == 2
    assert "is not a trace this command wrote; refusing to replace it" in _one_line_error(capsys)
    assert recipe.read_text() == before and notes.read_text() == "mine\n"
    assert main([*synthetic, str(trace)]) == 0 and main([*synthetic, str(trace)]) == 0  # a trace: replaced
    assert simulate.read_trace(trace)


@pytest.mark.parametrize("args, line", [
    (["--bags", "g0n1"], "minfm: error: --bags: bag spec 'g0n1': bad term 'g0n1'"),
    (["--bags", "g1n3", "--world-size", "2"], "minfm: error: --bags g1n3: its 3 GPUs do not divide the 2 ranks "
                                              "(--world-size): a rank would be in no bag"),
    (["--world-size", "2", "--trace-out", "/dev/null/x"], "minfm: error: --trace-out /dev/null/x: Not a directory"),
])
def test_a_flags_problem_names_the_flag(args, line, capsys):
    """These named no flag: 'bag spec ...', 'trace step has 2 ranks ...', '/dev/null/x: Not a directory'."""
    from minfm_core.cli.main import main

    assert main(["balance", "simulate", "--synthetic", "few", *args]) == 2
    assert capsys.readouterr().err.strip().startswith(line)


def test_a_recipe_with_multi_gpu_bags_is_simulated_at_their_ranks(tmp_path, capsys):
    """`minfm balance simulate RECIPE` checked the recipe at this process's world size 1, so
    every [balancer] with bags of more than one GPU was refused ('world size 1 is not divisible')."""
    from minfm_core.cli.main import main

    recipe = tmp_path / "bal.toml"
    recipe.write_text('extends = "minfm:quickstart.toml"\n[balancer]\nname = "knapformer"\nbags = "g1n2"\n')
    assert main(["balance", "simulate", str(recipe), "--steps", "1"]) == 0, capsys.readouterr().err
    assert "1 steps x 2 ranks" in capsys.readouterr().out
    assert main(["balance", "simulate", str(recipe), "--steps", "1", "--world-size", "4"]) == 0
    assert "1 steps x 4 ranks" in capsys.readouterr().out
    # the commands that run no training read it in one process too
    assert main(["cache", "models", str(recipe)]) == 0


def test_max_min_of_ranks_that_all_hold_nothing_is_balanced():
    """An all-zero step printed max/min = inf: nothing on every rank is no imbalance."""
    import numpy as np

    from minfm_plugins.knapformer.simulate import _ratios

    assert _ratios(np.zeros(4)) == (1.0, 1.0)
    assert _ratios(np.array([0.0, 2.0])) == (2.0, float("inf"))  # one rank idle while another works
    assert _ratios(np.array([1.0, 3.0])) == (1.5, 3.0)
