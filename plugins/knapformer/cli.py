"""``minfm balancer simulate``: the argument parser (cheap; the work is in simulate.py)."""

from __future__ import annotations

SYNTHETIC_NAMES = ("bucket", "few", "imagenet", "mixed", "near_balanced", "with2048")


def add_parser(sub) -> None:
    p = sub.add_parser("balancer", help="sequence-balancer tools (KnapFormer)")
    inner = p.add_subparsers(dest="balancer_command", metavar="COMMAND")
    s = inner.add_parser("simulate", help="score bag specs on a trace: balance, tokens moved, planning time")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", help="JSON trace: a list of steps, each a list of per-rank lists of lengths")
    src.add_argument("--synthetic", choices=SYNTHETIC_NAMES, help="a seeded synthetic trace")
    s.add_argument("--bags", action="append", required=True, help="bag spec, e.g. g1n8 (repeatable)")
    s.add_argument("--world-size", type=int, default=None, help="ranks of a synthetic trace (default: the first spec's S)")
    s.add_argument("--steps", type=int, default=4, help="steps of a synthetic trace")
    s.add_argument("--seed", type=int, default=0, help="seed of a synthetic trace")
    s.add_argument("--d", type=int, default=3072, help="hidden width of the denoiser")
    s.add_argument("--gamma", type=float, default=0.5, help="attention weight in the workload model")
    s.add_argument("--tolerance", type=float, default=0.0, help="locality tolerance of our planner")
    s.add_argument("--trace-out", help="write the trace used as JSON")
    s.set_defaults(func=_simulate)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _simulate(args) -> int:
    from .simulate import run

    return run(args)
