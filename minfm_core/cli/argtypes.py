"""argparse helpers shared by every command: the parser class, the recipe arguments, the
pickle opt-in flag, and ``type=`` functions with ranges (a bad number is a one-line
MinfmError, exit 2). Command modules import these from here, never from ``main`` (which
imports them: that would be a circle).

They raise MinfmError rather than argparse's ArgumentTypeError on purpose: argparse would
print its usage block first, and the contract is one line naming the flag. Each factory
takes the flag's name so the message can say which flag was wrong.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable

from ..errors import MinfmError
from ..validators import MAX_FRAMES, MAX_SIDE


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Anything starting "-<digit>", "-inf" or "-nan" is a value, not a flag (no flag of
        # ours looks so): argparse took only plain numbers, so `--size -16x16` and `--cfg -inf`
        # got "expected one argument" instead of the value's own message.
        self._negative_number_matcher = re.compile(r"^-(\.?\d|inf|nan)", re.IGNORECASE)

    def format_help(self) -> str:
        # Each ranged number's help says its range (and its default): the ranges were
        # enforced but shown nowhere, and --help is where the README sends users for them.
        for action in self._actions:
            parse = action.type
            if action.help in (None, argparse.SUPPRESS) or getattr(action, "_range_shown", False) \
                    or not hasattr(parse, "lo"):
                continue
            shown = f"{_num(parse.lo) if parse.lo is not None else ''}..{_num(parse.hi) if parse.hi is not None else ''}"
            if action.default not in (None, argparse.SUPPRESS) and "default" not in action.help:
                shown += f", default {action.default}"
            action.help = f"{action.help} ({shown})"
            action._range_shown = True
        return super().format_help()

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        # A value taken as text is never empty: `--prompt-file ''` or `--extractor ''` read as
        # "not given" (the truthiness test after parsing) and the default was used instead.
        if action.type is None and action.choices is None and action.nargs in (None, "?") \
                and isinstance(action, (argparse._StoreAction, argparse._AppendAction)):
            action.type = non_empty(action.option_strings[0] if action.option_strings
                                    else action.metavar or action.dest.upper())
        return action

    def add_subparsers(self, **kwargs):
        # A group without its command (`minfm hub`) is a usage error, on stderr with exit 2:
        # some groups printed their help on stdout (exit 2), others the error.
        kwargs.setdefault("parser_class", type(self))
        action = super().add_subparsers(**kwargs)
        action.required = True
        return action

    def error(self, message: str):  # argparse's own usage errors: exit 2, like ours
        self.print_usage(sys.stderr)
        raise MinfmError(message)

    def parse_known_args(self, args=None, namespace=None):
        # A command's unknown flag is refused by the command's own parser, with its usage and
        # the flag it may have meant: argparse passed it up to `minfm`'s, which showed
        # `usage: minfm COMMAND` and no suggestion. (No caller wants unknown arguments back.)
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}{self._meant(extras)}")
        return namespace, extras

    def _meant(self, extras: list[str]) -> str:
        import difflib

        flags = [f for f in self._option_string_actions if f.startswith("--")]
        for extra in extras:
            if extra.startswith("--"):
                close = difflib.get_close_matches(extra.partition("=")[0], flags, n=1, cutoff=0.6)
                if close:
                    return f" (did you mean {close[0]}?)"
        return ""


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="path to a TOML recipe, or minfm:NAME.toml for a shipped one")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe value (TOML literal), e.g. --set train.max_steps=100; repeatable",
    )


def non_empty(flag: str) -> Callable[[str], str]:
    """A path or name that must be given as something: ``--out ''`` was taken as "not given"
    and the default used, where other commands refuse it."""
    def parse(text: str) -> str:
        if not text:
            raise MinfmError(f"{flag}: empty value")
        return text

    return parse


def host_arg(text: str) -> str:
    """``--host``: a host name or address, at most 253 characters (DNS's limit), no spaces or
    control characters: `--host ' '` was shown as `--host   --port`, a 100,000-character one
    was quoted whole in a 100 KB error line."""
    if not text:
        raise MinfmError("--host: empty value")
    if len(text) > 253 or any(c.isspace() or not c.isprintable() for c in text):
        raise MinfmError(f"--host {text[:80]!r}{'...' if len(text) > 80 else ''}: expected a host name or address "
                         "such as 127.0.0.1, ::1 or 0.0.0.0")
    return text


def prompt_arg(flag: str) -> Callable[[str], str]:
    """A prompt given on the command line: the rules of a recipe's and a prompt file's
    (validators.prompt_problem: no NUL, at most MAX_PROMPT_CHARS characters)."""
    from ..validators import prompt_problem

    def parse(text: str) -> str:
        if problem := prompt_problem(text):
            raise MinfmError(f"{flag}: {problem}")
        return text

    return parse


#: A number on the command line is ASCII: Python's int() and float() also take full-width and
#: other Unicode digits (``--world-size ３``), ``_`` separators (``1_0``) and surrounding blanks.
_INT = re.compile(r"[+-]?[0-9]+")


def _ascii_number(text: str) -> bool:
    return text.isascii() and "_" not in text and not any(c.isspace() for c in text)


def int_in(flag: str, lo: int, hi: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:  # int() alone also raises past 4300 digits
            if not _INT.fullmatch(text):
                raise ValueError(text)
            value = int(text, 10)
        except ValueError:
            raise MinfmError(f"{flag}: expected an integer, got {text[:80]!r}") from None
        if value < lo:
            want = {0: "a non-negative integer", 1: "a positive integer"}.get(lo, f"an integer >= {lo}")
            raise MinfmError(f"{flag}: expected {want}, got {value}")
        if hi is not None and value > hi:
            raise MinfmError(f"{flag}: expected at most {hi}, got {value}")
        return value

    return _ranged(parse, flag, lo, hi)


def finite_float(flag: str, lo: float | None = None, hi: float | None = None) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            if not _ascii_number(text):
                raise ValueError(text)
            value = float(text)
        except ValueError:
            raise MinfmError(f"{flag}: expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise MinfmError(f"{flag}: expected a finite number, got {text}")
        if lo is not None and value < lo:
            raise MinfmError(f"{flag}: expected a number >= {lo}, got {text}")
        if hi is not None and value > hi:
            raise MinfmError(f"{flag}: expected a number <= {hi}, got {text}")
        return value

    return _ranged(parse, flag, lo, hi)


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _ranged(parse, flag: str, lo, hi):
    # The range, readable from the parser tree: tests go over every numeric flag of every command.
    parse.flag, parse.lo, parse.hi = flag, lo, hi
    return parse


def sample_size(flag: str) -> Callable[[str], tuple[int, int, int]]:
    """``HEIGHTxWIDTH`` (one frame: an image) or ``FRAMESxHEIGHTxWIDTH`` (a clip), as (frames, height, width).

    Only the ranges are checked here; which sizes and frame counts the model can draw is
    checked against its recipe (VAE compression and patch size) before any model is built.
    """

    def parse(text: str) -> tuple[int, int, int]:
        parts = text.lower().split("x")
        if len(parts) not in (2, 3) or not all(p.isascii() and p.isdigit() for p in parts):
            raise MinfmError(f"{flag} {text!r}: expected HEIGHTxWIDTH or FRAMESxHEIGHTxWIDTH, e.g. 256x256 or 17x256x256")
        nums = [int(p) for p in parts]
        f, h, w = nums if len(nums) == 3 else [1, *nums]
        if h < 1 or w < 1:
            raise MinfmError(f"{flag} {text!r}: height and width must be positive")
        if h > MAX_SIDE or w > MAX_SIDE:
            raise MinfmError(f"{flag} {text!r}: height and width must be at most {MAX_SIDE}")
        if not 1 <= f <= MAX_FRAMES:
            raise MinfmError(f"{flag} {text!r}: frames must be in 1..{MAX_FRAMES}")
        return f, h, w

    return parse


#: Addresses only this machine reaches: a server bound elsewhere says so (serve, demo).
def is_loopback(host: str) -> bool:
    """Whether a server bound to ``host`` (a ``--host`` value) is reachable from this machine
    only: ``localhost`` or any loopback address (all of 127.0.0.0/8, ``::1``)."""
    import ipaddress

    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip()).is_loopback
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """The name of an HTTP Host header (``name[:port]``, ``[v6]:port``), lower-cased."""
    name = host_header.strip().lower()
    if name.startswith("["):
        return name[1:].partition("]")[0]
    return name.partition(":")[0] if name.count(":") == 1 else name


def host_allowed(host_header: str, allowed: tuple[str, ...] | list[str] = ()) -> bool:
    """Whether a server on loopback answers a request with this Host header: a loopback name
    (``localhost``, ``*.localhost``, a loopback address) or one of ``allowed`` (the user's
    ``--allowed-host``, e.g. the name a proxy on this machine forwards). A page elsewhere whose
    name an attacker re-points at 127.0.0.1 (DNS rebinding) sends its own name, and is
    refused. None given (an HTTP/1.0 client) passes: browsers always send one."""
    name = host_name(host_header)
    return name == "" or name.endswith(".localhost") or name in {host_name(a) for a in allowed} or is_loopback(name)


def allowed_host(text: str) -> str:
    """An ``--allowed-host`` value: a host name or address as a Host header carries it (an
    empty one, or one with blanks or a path, matched nothing and was taken without a word)."""
    if not text or not re.fullmatch(r"[A-Za-z0-9._:\[\]-]+", text):
        raise MinfmError(f"--allowed-host: {text!r} is not a host name (e.g. myproxy.internal)" if text
                         else "--allowed-host: empty value")
    return text


def add_allowed_host_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allowed-host", dest="allowed_hosts", action="append", default=[], metavar="NAME",
                   type=allowed_host,
                   help="on loopback, also answer requests for this host name (e.g. a proxy's); repeatable. "
                        "Other names are refused: a web page re-pointed at 127.0.0.1 must not read the server")


def listen_family(host: str, port: int | None) -> int:
    """The socket family to listen on ``host`` with (``::1``: AF_INET6); checked now, so that a
    server that would fail to bind says so in one line naming the flags before its model loads.
    ``port`` None or 0: any free port."""
    import socket

    try:
        family = socket.getaddrinfo(host, port or 0, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
            probe.bind((host, port or 0))
    except (OSError, UnicodeError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise MinfmError(f"--host {host} --port {port if port else 'any'}: cannot listen there ({why})") from None
    return family

# Ranges shared by several commands.
MAX_PROCS = 1024  # local processes: more is a typo, not a machine
nprocs = int_in("--nproc-per-node", 1, MAX_PROCS)


def add_allow_pickle_flag(parser) -> None:
    """``--allow-pickle-checkpoint``: the one opt-in for checkpoints without a manifest
    (docs/security.md), on every command that reads a checkpoint."""
    parser.add_argument(
        "--allow-pickle-checkpoint", action="store_true",
        help="also read a checkpoint without manifest.json (older minFM, other tools): its DCP .metadata "
        "is a pickle that can run code; only for checkpoints you trust (never honoured for downloads)",
    )

