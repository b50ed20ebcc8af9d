"""``minfm balance simulate``: the argument parser (cheap; the work is in simulate.py)."""

from __future__ import annotations

from minfm_core.cli.argtypes import finite_float, int_in
from minfm_core.errors import MinfmError
from minfm_core.launch_env import MAX_WORLD_SIZE
from minfm_core.validators import MAX_BATCH, MAX_FRAMES, MAX_PROMPT_TOKENS, MAX_SEED, MAX_WIDTH

from .config import GAMMA, MAX_GAMMA, MAX_TOLERANCE

#: Steps one simulation draws (each is planned by both planners: seconds per thousand at 512 ranks).
MAX_SIMULATED_STEPS = 100_000

_gamma_number = finite_float("--gamma", 0.0, MAX_GAMMA)


def _gamma(text: str) -> float:
    """--gamma: the recipe field's range (config.GAMMA), 0 or 1e-6 to 100; 1e-320 overflowed the loads."""
    value = _gamma_number(text)
    if not GAMMA.ok(value):
        raise MinfmError(f"--gamma: expected a number {GAMMA.range_text}, got {text}")
    return value


# The ends, readable from the parser tree like every ranged flag's (tests/test_cli_numbers.py).
_gamma.flag, _gamma.lo, _gamma.hi = "--gamma", 0.0, MAX_GAMMA

SYNTHETIC_NAMES = ("bucket", "few", "imagenet", "long_tail", "mixed", "near_balanced", "video", "with2048")


def add_parser(sub) -> None:
    p = sub.add_parser("balance", help="sequence-balancer tools (KnapFormer)")
    inner = p.add_subparsers(dest="balance_command", metavar="COMMAND")
    s = inner.add_parser(
        "simulate",
        help="score bag specs on a recipe's data or a trace: balance, tokens moved, Ulysses bytes, planning time",
        description="Score bag specs before renting GPUs. The lengths come from RECIPE's training data "
        "(per-rank micro-batches as the loader draws them), a JSON trace, or a seeded synthetic trace.",
    )
    s.add_argument("recipe", nargs="?", help="recipe whose [data] (and model, [balancer]) to simulate")
    s.add_argument("--trace", help="JSON trace: a list of steps, each a list of per-rank lists of lengths")
    s.add_argument("--synthetic", choices=SYNTHETIC_NAMES, help="a seeded synthetic trace")
    s.add_argument("--bags", action="append", help="bag spec, e.g. g1n8 (repeatable; default: the recipe's, else g1n{W})")
    s.add_argument("--world-size", type=int_in("--world-size", 1, MAX_WORLD_SIZE), default=None, help="ranks (default: the first bag spec's S)")
    s.add_argument("--steps", type=int_in("--steps", 1, MAX_SIMULATED_STEPS), default=None, help="steps drawn from the recipe or a synthetic trace (default: 4)")
    s.add_argument("--seed", type=int_in("--seed", 0, MAX_SEED), default=None, help="seed of the draw (default: the recipe's run.seed, else 0)")
    s.add_argument("--batch-size", type=int_in("--batch-size", 1, MAX_BATCH), default=None, help="samples per rank per step (default: the recipe's train.batch_size)")
    s.add_argument("--text-range", type=int_in("--text-range", 0, MAX_PROMPT_TOKENS), nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="with RECIPE: text tokens per prompt when the text encoder's tokenizer is unavailable (default: 77 512)")
    s.add_argument("--clips", type=finite_float("--clips", 0.0, 1.0), default=0.0, metavar="SHARE",
                   help="with RECIPE: this share of samples become video clips of their own picture size "
                   "(0-1; the synthetic trace 'video' has clips next to images too)")
    s.add_argument("--clip-frames", type=int_in("--clip-frames", 1, MAX_FRAMES), nargs="+", default=None, metavar="F",
                   help="frames of such a clip, drawn per clip (default 17 33 49), through the VAE's time compression")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="with RECIPE: a recipe override")
    s.add_argument("--d", type=int_in("--d", 1, MAX_WIDTH), default=None, help="hidden width (default: the recipe denoiser's d_model, else 3072)")
    s.add_argument("--gamma", type=_gamma, default=None, help="attention weight in the workload model, 0 or 1e-6 to 100 (default: recipe's, else 0.5)")
    s.add_argument("--tolerance", type=finite_float("--tolerance", 0.0, MAX_TOLERANCE), default=None, help="locality tolerance of our planner (default: recipe's, else 0)")
    s.add_argument("--trace-out", help="write the trace used as JSON (a new file, or a trace file to replace)")
    s.set_defaults(func=_simulate)


def _simulate(args) -> int:
    from .simulate import run

    return run(args)
