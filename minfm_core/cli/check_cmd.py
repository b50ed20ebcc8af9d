"""``minfm check``: validate a recipe without touching data or weights."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import tomli_w

from ..errors import RecipeError, terminal_safe
from ..launch_env import MAX_WORLD_SIZE, launch_env
from ..pretrained import parse_hub_ref
from ..recipe import load_recipe
from ..recipe.checks import job_checks
from ..summary import check_builds, summary_table
from .argtypes import int_in


def register(sub) -> None:
    from .argtypes import add_recipe_args

    p = sub.add_parser("check", help="validate a recipe and print its components with parameter counts")
    add_recipe_args(p)
    p.add_argument("--print", dest="print_recipe", action="store_true", help="print the fully resolved recipe")
    p.add_argument("--world-size", type=int_in("--world-size", 1, MAX_WORLD_SIZE), default=None, help="check against this many ranks (default: $WORLD_SIZE or 1)")
    p.set_defaults(func=run)


def data_path_warnings(resolved) -> list[str]:
    """Missing data folders are warnings: a recipe may be checked on a machine without the data."""
    cfg = resolved.config("data")
    out = []
    if cfg is None:
        return out
    import attrs

    # Fields declared as files (field(..., file="file")); third-party configs that declare
    # none are recognised by their names, as before.
    declared = [a.name for a in attrs.fields(type(cfg)) if a.metadata.get("file") == "file"] if attrs.has(type(cfg)) else []
    names = declared or [n for n in dir(type(cfg)) if not n.startswith("_") and n.endswith(("root", "_dir", "_path"))]
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, str) and value and not Path(value.split("::")[0]).exists():
            out.append(f"data.{name}: {value} does not exist (yet)")
    return out + _latent_split_warnings(resolved, cfg)


def _latent_split_warnings(resolved, cfg) -> list[str]:
    """A latent cache without a split the run reads: `minfm run` stops at start-up on it (the
    documented prepare once encoded train only, and the recipe validates on val)."""
    from ..latents_record import split_index
    from ..protocols import CachedLatentsConfig

    if not (isinstance(cfg, CachedLatentsConfig) and cfg.use_cached_latents and cfg.latents_dir):
        return []
    base = Path(os.path.expanduser(cfg.latents_dir))
    train = resolved.recipe.train
    readers = {"train": "training"}
    if train.val_every or train.fid_every:
        readers["val"] = "train.val_every" if train.val_every else "train.fid_every"
    if not base.is_dir():  # missing: said above
        return []
    return [f"data.latents_dir: {base} has no {split}/index.json, and {who} reads the {split!r} split; write it "
            f"with `minfm cache latents RECIPE --out {base} --split {split}`"
            for split, who in readers.items() if split_index(base, split) is None]


def section_file_warnings(resolved) -> list[str]:
    """Files the recipe's own sections name that this machine lacks (warnings, like the data's)."""
    r = resolved.recipe
    named = [("sample.prompt_file", r.sample.prompt_file)]
    if r.train.fid_every > 0:
        named.append(("train.fid_ref", r.train.fid_ref))
        if r.train.fid_inception and parse_hub_ref(r.train.fid_inception) is None:  # a local file
            named.append(("train.fid_inception", r.train.fid_inception))
    return [f"{path}: {value} does not exist (yet)" for path, value in named if value and not Path(value).exists()]


def run(args) -> int:
    # RANK / WORLD_SIZE / LOCAL_RANK as every command reads them: a malformed one is refused here
    # too (run refuses it; check accepts exactly what run accepts)
    launch_env()
    resolved = load_recipe(args.recipe, args.overrides, world_size=args.world_size)
    # The job's own start-up rules (factories included): check accepts exactly what run accepts.
    problems = job_checks(resolved, resolved.recipe.job, world_size=args.world_size)
    # What the run would build first and cheaply, built: a factory's own refusal fails here too
    # (protocols.CHECK_BUILDS, docs/plugins.md "What minfm check builds").
    counts, refused = check_builds(resolved)
    problems += refused
    if problems:
        raise RecipeError(problems, args.recipe)
    if args.print_recipe:
        print(tomli_w.dumps(resolved.to_dict()))
        return 0
    for w in data_path_warnings(resolved) + section_file_warnings(resolved):
        print(terminal_safe(f"minfm: warning: {w}"), file=sys.stderr)
    print(f"{args.recipe}: ok (job = {resolved.recipe.job!r})")
    print(summary_table(resolved, counts))
    return 0
