"""``minfm``: entry point, subcommand table and exit codes.

Exit codes (contract): 0 success; 2 bad usage, recipe or input (one clear message,
no traceback); 1 unexpected failure (traceback kept).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import MinfmError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors: exit 2, like ours
        self.print_usage(sys.stderr)
        raise MinfmError(message)


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="path to a TOML recipe")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe value (TOML literal), e.g. --set train.max_steps=100; repeatable",
    )


def build_parser() -> argparse.ArgumentParser:
    from . import cache_cmd, check_cmd, data_cmd, eval_cmd, plugins_cmd, run_cmd

    parser = _Parser(prog="minfm", description="Minimal flow matching: train and sample text-to-image models.")
    parser.add_argument("--version", action="version", version=f"minfm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    plugins_cmd.register(sub)
    check_cmd.register(sub)
    run_cmd.register(sub)
    cache_cmd.register(sub)
    data_cmd.register(sub)
    eval_cmd.register(sub)

    from ..plugins import load_plugins

    load_plugins().pm.hook.register_commands(subparsers=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .run_cmd import ARGV_ENV

    if argv is None and ARGV_ENV in os.environ:  # re-launched by --nproc-per-node
        argv = json.loads(os.environ[ARGV_ENV])
        sys.argv = [sys.argv[0], *argv]
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except MinfmError as exc:
        print(f"minfm: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("minfm: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
