"""Every number a command takes has a range, checked as the flag is parsed: before any work,
as one line naming the flag, exit 2. The cases come from the parser tree, plugins' commands
included, so a new flag is covered as soon as it exists."""

from __future__ import annotations

import argparse
import math

import pytest

from minfm_core.cli.main import build_parser, main


def _options(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, (*path, name))
        elif action.option_strings:
            yield path, action


OPTIONS = list(_options(build_parser()))
RANGED = [(path, a) for path, a in OPTIONS if hasattr(a.type, "lo")]


def test_no_number_is_parsed_without_a_range():
    plain = [f"minfm {' '.join(path)} {a.option_strings[0]}" for path, a in OPTIONS if a.type in (int, float)]
    assert not plain, "use minfm_core.cli.argtypes.int_in / finite_float: " + ", ".join(plain)
    assert len(RANGED) >= 20  # the walk reached the commands (run, sample, serve, plugins' own)


def test_every_flag_range_has_both_ends():
    """'>= 1' let `--steps 10**12` or `--world-size 10**15` through to the work itself."""
    open_ended = [f"minfm {' '.join(path)} {a.option_strings[0]}" for path, a in RANGED
                  if a.type.lo is None or a.type.hi is None]
    assert not open_ended, "give these an upper bound (minfm_core.validators has the shared ones): " + ", ".join(open_ended)


def _bad_values(parse) -> list[str]:
    bad = ["x", "nan", "inf"]
    if parse.lo is not None:
        bad.append(str(parse.lo - 1) if isinstance(parse.lo, int) else repr(parse.lo - 0.5))
    if parse.hi is not None:
        bad.append(str(parse.hi + 1) if isinstance(parse.hi, int) else repr(parse.hi + 0.5))
    return bad


@pytest.mark.parametrize("path,action", RANGED, ids=[f"{' '.join(p)} {a.option_strings[0]}" for p, a in RANGED])
def test_out_of_range_is_one_line_naming_the_flag(path, action, capsys):
    parse = action.type
    assert parse.flag in action.option_strings  # the message names this flag, not another's
    n = action.nargs if isinstance(action.nargs, int) else 1  # --text-range MIN MAX
    for text in _bad_values(parse):
        assert main([*path, action.option_strings[0], *[text] * n]) == 2, text
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"minfm: error: {parse.flag}: expected ") and "\n" not in err, (text, err)
    # The bounds themselves are accepted.
    for edge in (parse.lo, parse.hi):
        if edge is not None and not (isinstance(edge, float) and math.isinf(edge)):
            assert parse(str(edge)) == edge


@pytest.mark.parametrize("text", ["\u00b2x16", "\uff11\uff16x16", "16x\u0661\u0666"])
def test_sizes_take_ascii_digits_only(text):
    # str.isdigit() is true for '²' (int() then raised past argparse's handler) and for
    # full-width or Arabic-Indic digits (silently read as 16)
    from minfm_core.cli.argtypes import sample_size
    from minfm_core.errors import MinfmError

    with pytest.raises(MinfmError, match="expected HEIGHTxWIDTH"):
        sample_size("--size")(text)


@pytest.mark.parametrize("text", ["-16x16", "-1x16x16", "-.5"])
def test_a_value_starting_minus_digit_reaches_its_flag(text, capsys):
    """argparse reads only plain negative numbers as values: `--size -16x16` got "argument
    --size: expected one argument" and the usage, not the size's own message."""
    assert main(["sample", "run", "--prompt", "a", "--size", text]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"minfm: error: --size {text!r}: expected HEIGHTxWIDTH or FRAMESxHEIGHTxWIDTH, e.g. 256x256 or 17x256x256"


@pytest.mark.parametrize("text", ["-inf", "-nan", "-Infinity"])
def test_minus_inf_and_nan_reach_their_flag(text, capsys):
    """`--cfg -inf` read as an unknown flag: "argument --cfg: expected one argument" and the
    usage, where `--cfg inf` got the flag's own message."""
    assert main(["sample", "run", "--prompt", "a", "--cfg", text]) == 2
    assert capsys.readouterr().err.strip() == f"minfm: error: --cfg: expected a finite number, got {text}"


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def test_every_ranged_flag_shows_its_range_in_help():
    """The README sends users to `--help` for the ranges; they were enforced but shown nowhere."""
    from minfm_core.cli.argtypes import _num

    missing = []
    for path, parser in _parsers(build_parser()):
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            parse = action.type
            if hasattr(parse, "lo") and action.help != argparse.SUPPRESS:
                shown = f"({_num(parse.lo)}..{_num(parse.hi)}"
                if shown not in text:
                    missing.append(f"minfm {' '.join(path)} {action.option_strings[0]}: {shown}")
        assert " ".join(parser.format_help().split()) == text  # shown once, however often asked
    assert not missing, missing


def test_no_flag_or_argument_takes_an_empty_value(capsys):
    """`sample --prompt-file ''`, `eval --extractor ''` and `data imagenet prepare --encoder ''`
    were read as "not given" (the default used, exit 0): every value of every command's flags
    and arguments, parsed from '', is refused (generated from the parsers, plugins' included)."""
    from minfm_core.errors import MinfmError

    taken = []
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if not isinstance(action, (argparse._StoreAction, argparse._AppendAction)) or action.nargs not in (None, "?"):
                continue
            if action.choices is not None:
                assert "" not in action.choices
                continue
            if (path, action.dest) == (("sample",), "prompt"):
                assert action.type("") == ""  # the empty prompt: unconditional samples
                continue
            try:
                action.type("")
            except (MinfmError, argparse.ArgumentTypeError, ValueError):
                continue
            taken.append(f"{' '.join(path)} {action.option_strings or action.dest}")
    assert taken == []
    assert main(["sample", "run", "--prompt-file", ""]) == 2
    assert capsys.readouterr().err.strip() == "minfm: error: --prompt-file: empty value"


def test_a_command_group_without_its_command_is_a_usage_error(capsys):
    """`minfm`, `minfm hub`, `minfm export` and `minfm balance` printed their whole help on
    stdout (exit 2), `minfm cache` on stderr, `minfm eval` the error: every group (plugins'
    included) now the error on stderr."""
    groups = [(path, action) for path, parser in _parsers(build_parser()) for action in parser._actions
              if isinstance(action, argparse._SubParsersAction)]
    assert len(groups) >= 8
    for path, action in groups:
        assert main(list(path)) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.splitlines()[-1] == f"minfm: error: the following arguments are required: {action.metavar}"


@pytest.mark.parametrize("command", ["serve", "demo"])
@pytest.mark.parametrize("host, shown", [(" ", "' '"), ("a\x1bb", "'a\\x1bb'"), ("h" * 100_000, repr("h" * 80) + "...")])
def test_a_host_that_is_no_host_is_quoted_and_cut(command, host, shown, capsys):
    """`--host ' '` read `--host   --port 8000: cannot listen there`; a 100,000-character host
    was quoted whole in a 100 KB line."""
    assert main([command, "run", "--host", host]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"minfm: error: --host {shown}: expected a host name or address such as 127.0.0.1, ::1 or 0.0.0.0"
