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

import weakref

from ..errors import PluginError

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
        action.required = True
        _GROUPS[parser] = action
    elif parser not in _GROUPS:
        raise PluginError(f"'minfm {name}' is a command, not a command group; pick another group name")
    return _GROUPS[parser]

