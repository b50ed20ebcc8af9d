"""Command groups that several plugins share: ``minfm data <dataset> ...``, ``minfm eval <what> ...``.

A plugin's ``register_commands(subparsers)`` hook may add a top-level command, or a
subcommand under a group with :func:`command_group`::

    @hookimpl
    def register_commands(subparsers):
        datasets = command_group(subparsers, "data", help="prepare datasets")
        p = datasets.add_parser("mydata", help="...")

The first plugin to ask for a group makes it; the next ones get the same subparsers, so the
core needs no list of groups and knows nothing of what plugins put under them.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import MinfmError, PluginError

# group parser -> its subparsers action; weak so a parser built in a test goes away with it
_GROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def command_group(subparsers, name: str, help: str | None = None):
    """The subparsers of ``minfm NAME``, made on first use (``help`` then describes the group).

    Raises :class:`PluginError` when ``NAME`` is already a plain command, not a group.
    """
    parser = subparsers.choices.get(name)
    if parser is None:
        parser = subparsers.add_parser(name, help=help)
        # type(parser): the CLI's own parser class, whose usage errors exit 2 like every other error
        action = parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND", parser_class=type(parser))
        _GROUPS[parser] = action
    elif parser not in _GROUPS:
        raise PluginError(f"'minfm {name}' is a command, not a command group; pick another group name")
    return _GROUPS[parser]


def command_paths(subparsers) -> set[tuple[str, ...]]:
    """Every command under ``subparsers``, groups opened: ``("hub",)``, ``("data", "mydata")``, ...

    A group with nothing under it yet is listed as itself.
    """
    paths: set[tuple[str, ...]] = set()
    for name, parser in subparsers.choices.items():
        inner = command_paths(_GROUPS[parser]) if parser in _GROUPS else set()
        paths |= {(name, *p) for p in inner} or {(name,)}
    return paths


def drop_command(subparsers, path: tuple[str, ...]) -> None:
    """Remove the command at ``path``, and a group it leaves empty."""
    parser = subparsers.choices.get(path[0])
    if parser is None:
        return
    if len(path) > 1 and parser in _GROUPS:
        drop_command(_GROUPS[parser], path[1:])
        if _GROUPS[parser].choices:
            return
    # argparse has no API to remove a subcommand: its name table and its help entries.
    subparsers.choices.pop(path[0], None)
    subparsers._choices_actions[:] = [a for a in subparsers._choices_actions if a.dest != path[0]]


def _parser_at(subparsers, path: tuple[str, ...]):
    parser = subparsers.choices.get(path[0])
    if parser is None or len(path) == 1:
        return parser
    return _parser_at(_GROUPS[parser], path[1:]) if parser in _GROUPS else None


def guard_commands(subparsers, paths: Iterable[tuple[str, ...]], plugin: str) -> None:
    """Wrap the ``func`` of each command at ``paths`` (what plugin ``plugin`` added) so that what
    it returns and raises names the plugin (see :func:`guarded_command`)."""
    for path in paths:
        parser = _parser_at(subparsers, path)
        func = parser.get_default("func") if parser is not None else None
        if callable(func) and not getattr(func, "__minfm_guarded__", False):
            parser.set_defaults(func=guarded_command(func, f"'minfm {' '.join(path)}' of plugin {plugin!r}"))


def guarded_command(func: Callable[[Any], Any], who: str) -> Callable[[Any], int]:
    """``func`` (a plugin's command) as the CLI calls it: its return is the exit code, an int or
    None (0); anything else (``"junk"``) is a one-line PluginError naming ``who`` instead of a
    traceback from ``int()``. A bug it raises keeps its traceback, with a note naming ``who``;
    a MinfmError stays the user's one line."""

    @functools.wraps(func)
    def call(args) -> int:
        try:
            code = func(args)
        except MinfmError:
            raise
        except Exception as exc:
            exc.add_note(f"(raised by the command {who})")
            raise
        if code is None:
            return 0
        if isinstance(code, bool) or not isinstance(code, int):  # True is not an exit code either
            text = repr(code)
            raise PluginError(f"the command {who} returned {text if len(text) <= 60 else text[:57] + '...'}, "
                              "not an exit code (an int, or None for 0)")
        return code

    call.__minfm_guarded__ = True  # type: ignore[attr-defined]
    return call
