"""``minfm run`` / ``train``: run a recipe's job, on one process or many.

``--nproc-per-node N`` re-launches this command through torch.distributed's launcher
on this host; under ``torchrun`` (``LOCAL_RANK`` set) the command runs as it is.
"""

from __future__ import annotations

import os
import subprocess
import sys

from ..errors import MinfmError
from ..recipe import load_recipe


def register(sub) -> None:
    from .main import add_recipe_args

    for name, helptext in (("run", "run the recipe's job (train or sample)"), ("train", "train, whatever the recipe's job")):
        p = sub.add_parser(name, help=helptext)
        add_recipe_args(p)
        p.add_argument("--nproc-per-node", type=int, default=1, metavar="N", help="processes on this host (default 1)")
        p.set_defaults(func=run, job=None if name == "run" else name)


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run ``minfm <argv>`` under torch.distributed.run with ``nproc`` local processes."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "minfm_core.cli.main", *argv,
    ]
    return subprocess.call(cmd)


def strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            out.append(a)
    return out


def run(args) -> int:
    if args.nproc_per_node < 1:
        raise MinfmError(f"--nproc-per-node: expected a positive integer, got {args.nproc_per_node}")
    under_launcher = "LOCAL_RANK" in os.environ
    world = int(os.environ.get("WORLD_SIZE", args.nproc_per_node if not under_launcher else 1))
    resolved = load_recipe(args.recipe, args.overrides, world_size=world)  # fail fast, before spawning
    if args.nproc_per_node > 1 and not under_launcher:
        return relaunch(args.nproc_per_node, strip_nproc(sys.argv[1:]))
    from ..engine import run_job

    return run_job(resolved, job=args.job or resolved.recipe.job)
